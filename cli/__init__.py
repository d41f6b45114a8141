"""The ``targetgen`` command line (typer)."""
