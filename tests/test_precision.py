"""The numeric format: bf16 autocast and channels-last (chosen by train.precision / channels_last: auto), and
cudnn.benchmark; their code paths exercised on CPU, exact resume in bf16."""

import json
import platform
import warnings

import pytest
import torch

from targetgen import Batch
from targetgen.config import load_config
from targetgen.distributed import Autocast
from targetgen.errors import ConfigError
from targetgen.models import MatmulConv2d, MatmulConvTranspose2d
from targetgen.training import build_run, builder, config_of_run, plan_run_dir, train
from targetgen.training.checkpoint import load_checkpoint


def test_bf16_runs_the_networks_in_bf16_and_keeps_inverse_examples_float32(tiny_config):
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
    # the discriminator step and the inversion's pass run under autocast (bf16 inside); x and x' are float32
    assert seen[-1] == (torch.float32, torch.bfloat16)
    assert any(out == torch.bfloat16 for _, out in seen[:-1])
    trained = train(config, plan_run_dir(config, False), progress=False)  # and trains end to end
    assert all(torch.isfinite(p).all() for p in trained.generator.parameters())
    assert next(trained.generator.parameters()).dtype == torch.float32  # the weights stay float32


def test_channels_last_layout_for_images(tiny_config):
    config = tiny_config("train.steps=2", "train.channels_last=true", targets="inversion")
    run = train(config, plan_run_dir(config, False), progress=False)
    convs = [m.weight for m in run.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.cudnn_benchmark=true", "train.device=cpu"], "train.cudnn_benchmark: needs a CUDA device"),
        (["data.name=toy2d", "train.channels_last=true"], "train.channels_last: a memory layout for images"),
        (["train.precision=fp16"], "train.precision: expected one of 'auto', 'fp32', 'bf16'"),
    ],
)
def test_gpu_options_refuse_what_they_cannot_do(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_run(tiny_config(*overrides))


@pytest.mark.parametrize(
    "units, data, expected",
    [
        ("AMX", "digits", ("bf16", True)),
        ("AVX512-BF16", "digits", ("bf16", True)),
        (None, "digits", ("fp32", True)),
        ("AMX", "toy2d", ("fp32", False)),  # the MLPs: too small for bf16 to pay
    ],
)
def test_auto_chooses_bf16_where_the_hardware_computes_it_and_records_it(tmp_path, monkeypatch, units, data, expected):
    monkeypatch.setattr(builder, "native_bf16", lambda device: units)
    extra = ["data.name=toy2d", "data.num_points=256"] if data == "toy2d" else []
    config = load_config(
        None,
        [
            "train.steps=1",
            f"train.out_dir={tmp_path}",
            "train.name=auto",
            "model.ngf=8",
            "model.ndf=8",
            "data.image_size=16",
            "train.loggers=jsonl",
            *extra,
        ],
    )
    assert (config.train.precision, config.train.channels_last) == ("auto", "auto")
    run = train(config, plan_run_dir(config), progress=False)
    assert (run.config.train.precision, run.config.train.channels_last) == expected
    saved = config_of_run(tmp_path / "auto").train
    assert (saved.precision, saved.channels_last) == expected  # config.yaml records the choice, not "auto"
    assert expected[0] in run.runtime and ("channels-last" in run.runtime) == expected[1]
    # on AMX, bf16 computes the layers on the 4×4 side by matmul (oneDNN's bf16 kernels are slow there)
    matmul = units == "AMX" and data == "digits"
    assert any(isinstance(m, MatmulConvTranspose2d) for m in run.generator.modules()) == matmul
    assert ("4×4 layers by matmul" in run.runtime) == matmul


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu amx_bf16 avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu amx_bf16 avx512_bf16\n"
    )
    assert builder.cpu_model(str(cpuinfo)) == "Intel(R) Xeon(R) Processor"
    assert builder.cpu_model(str(tmp_path / "absent")) == (platform.processor() or "unknown")
    assert builder._cpuinfo("flags", str(cpuinfo)) == ["fpu amx_bf16 avx512_bf16"] * 2


def test_this_machines_choice_follows_its_cpu_flags():
    flags = builder._cpu_flags()
    found = builder.native_bf16(torch.device("cpu"))
    assert (found == "AMX") == ("amx_bf16" in flags or "amx_tile" in flags)
    assert (found is None) == ("amx_bf16" not in flags and "amx_tile" not in flags and "avx512_bf16" not in flags)


def test_emulated_bf16_says_what_it_costs(tiny_config, monkeypatch):
    monkeypatch.setattr(builder, "native_bf16", lambda device: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_run(tiny_config("train.precision=bf16"))
    assert any("train.precision: bf16 on cpu, which computes bf16 only by emulation" in str(w.message) for w in caught)


@pytest.mark.parametrize("units", ["AMX", "AVX512-BF16"])
def test_a_bf16_run_resumes_exactly(tiny_config, monkeypatch, units):
    monkeypatch.setattr(builder, "native_bf16", lambda device: units)  # with and without the matmul layers
    options = ["train.precision=bf16", "train.channels_last=true", "train.checkpoint_every=3"]
    whole_config = tiny_config(*options, "train.steps=6", targets="inversion", name="whole")
    whole_dir = plan_run_dir(whole_config)
    whole = train(whole_config, whole_dir, progress=False)
    first = tiny_config(*options, "train.steps=3", targets="inversion", name="split")
    split_dir = plan_run_dir(first)
    train(first, split_dir, progress=False)
    resumed = train(config_of_run(split_dir, ["train.steps=6"]), split_dir, resume=True, progress=False)
    assert resumed.config.train.precision == "bf16"
    matmul = [isinstance(m, MatmulConv2d) for m in resumed.strategy.source.plain_netD.modules()]
    assert any(matmul) == (units == "AMX")
    for p, q in zip(whole.generator.parameters(), resumed.generator.parameters(), strict=True):
        assert torch.equal(p, q)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["strategy"] for d in (whole_dir, split_dir))
    assert all(torch.equal(a["source"]["netD"][k], b["source"]["netD"][k]) for k in a["source"]["netD"])
    assert [json.loads(line) for line in (whole_dir / "metrics.jsonl").read_text().splitlines()] == [
        {**json.loads(line), "train_s": json.loads(w)["train_s"], "images_per_s": json.loads(w)["images_per_s"]}
        for line, w in zip(
            (split_dir / "metrics.jsonl").read_text().splitlines(),
            (whole_dir / "metrics.jsonl").read_text().splitlines(),
        )
    ]


def test_imle_generates_its_pool_in_bf16_in_a_bf16_run(tiny_config):
    run = build_run(tiny_config("train.precision=bf16", "targets.options.samples_factor=1", targets="imle"))
    assert run.source.context.precision == "bf16"
    seen = []
    real_autocast = torch.autocast

    def spying(*args, **kwargs):
        seen.append(kwargs.get("enabled", True) and kwargs.get("dtype") == torch.bfloat16)
        return real_autocast(*args, **kwargs)

    torch.autocast, original = spying, torch.autocast
    try:
        run.source.on_epoch_start(0)
    finally:
        torch.autocast = original
    assert seen and all(seen) and run.source.matched_z.dtype == torch.float32


def test_samples_of_a_bf16_run_come_back_in_float32(tiny_config):
    from targetgen.samples import generate

    run = build_run(tiny_config("train.precision=bf16"))
    out = generate(run.generator, run.fixed_noise[:5], chunk=2, bf16=True)
    fp32 = generate(run.generator, run.fixed_noise[:5], chunk=2)
    assert out.dtype == torch.float32 and out.shape == fp32.shape
    assert 0 < (out - fp32).abs().max() < 0.1  # computed in bf16: close, not equal
