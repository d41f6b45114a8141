"""GPU options (bf16 autocast, channels-last, cudnn.benchmark): their code paths, exercised on CPU."""

import pytest
import torch

from targetgen.distributed import Autocast
from targetgen.errors import ConfigError
from targetgen.training import build_run, plan_run_dir, train
from targetgen import Batch


def test_bf16_runs_the_networks_in_bf16_and_inverts_in_float32(tiny_config):
    config = tiny_config("train.steps=2", "train.precision=bf16", targets="inversion")
    run = build_run(config)
    source = run.source
    assert isinstance(source.netD, Autocast) and not isinstance(source.plain_netD, Autocast)
    seen = []
    source.plain_netD.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    images = run.data.dataset.images[:8]
    batch = Batch(images, torch.arange(8))
    source.update(batch, 0)
    targets = source.propose(batch, 0)
    assert targets.prediction.dtype == torch.float32 and targets.x.dtype == torch.float32
    # the discriminator step runs under autocast (bf16 inside), the inversion in float32
    assert seen[-1] == (torch.float32, torch.float32)
    assert any(out == torch.bfloat16 for _, out in seen[:-1])
    trained = train(config, plan_run_dir(config, False), progress=False)  # and trains end to end
    assert all(torch.isfinite(p).all() for p in trained.generator.parameters())
    assert next(trained.generator.parameters()).dtype == torch.float32  # the weights stay float32


def test_channels_last_layout_for_images(tiny_config):
    config = tiny_config("train.steps=2", "train.channels_last=true", targets="inversion")
    run = train(config, plan_run_dir(config, False), progress=False)
    convs = [m.weight for m in run.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.mark.parametrize("overrides, message", [
    (["train.cudnn_benchmark=true", "train.device=cpu"], "train.cudnn_benchmark: needs a CUDA device"),
    (["data.name=toy2d", "train.channels_last=true"], "train.channels_last: a memory layout for images"),
    (["train.precision=fp16"], "train.precision: expected one of 'fp32', 'bf16'"),
])
def test_gpu_options_refuse_what_they_cannot_do(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_run(tiny_config(*overrides))
