"""targetgen's presets, installed as the package ``targetgen.configs``: ``targetgen train -c mnist5k``
finds ``mnist5k.yaml`` here, ``targetgen compare -c toy2d_compare`` finds ``compare/toy2d_compare.yaml``."""
