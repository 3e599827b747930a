"""scripts/benchmark.py: a smoke run on the tiny preset (what it reports, not how fast), and what its figures rest
on."""

import importlib.util
import json

import pytest
import torch

from conftest import REPO
from ddpm_model import PRESETS, UNet, count_parameters, preset_config

spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

RESULT_FIELDS = {
    "model",
    "params",
    "gflop_per_image_forward",
    "train_step_s_rounds",
    "train_images_per_s",
    "train_ratio_ours_over_this",
    "first_step_s",
    "eval_images_per_s",
    "eval_ratio_ours_over_this",
    "sampler_images_per_s",
    "peak_memory_mb",
    "mfu",
}


def test_smoke_run_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--model_size",
        "tiny",
        "--image_size",
        "16",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--iters",
        "1",
        "--sampling_steps",
        "2",
        "--timesteps",
        "20",
        "--out",
        str(out),
    ]
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["model_size"] == "tiny" and report["environment"]["cpu_threads"] >= 1
    [ours] = report["results"]
    assert set(ours) == RESULT_FIELDS
    assert ours["params"] == count_parameters(UNet(image_size=16, **preset_config("tiny", 16)))
    for key in ("train_images_per_s", "eval_images_per_s", "sampler_images_per_s", "peak_memory_mb", "first_step_s"):
        assert ours[key] > 0, key
    assert len(ours["train_step_s_rounds"]) == 2, "one time per round"
    assert ours["train_ratio_ours_over_this"] == 1.0 and ours["mfu"] is None, "no MFU without a known GPU"
    assert "ours (tiny)" in capsys.readouterr().out, "the table is printed"


def test_ddpm_preset_forward_is_about_12_4_gflop():
    """The MFU figure rests on this count (the issue quotes 12.4 GFLOP per image)."""
    with torch.device("meta"):
        model = UNet(**PRESETS["ddpm"])
    assert benchmark.forward_flops(model, 32, torch.device("meta")) / 1e9 == pytest.approx(12.4, rel=0.01)


def test_diffusers_comparison_model_has_our_architecture():
    """The comparison is only fair if UNet2DModel is built to the same network: parameter counts agree."""
    pytest.importorskip("diffusers")
    for preset in ("ddpm", "ddpm-large"):
        with torch.device("meta"):  # shapes only: nothing to compute
            ours = UNet(**PRESETS[preset])
            theirs = benchmark.diffusers_unet(ours.config)
        assert count_parameters(theirs) == count_parameters(ours), preset


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_bf16_by_gpu_name(name, peak):
    """An H100 PCIe must not get the SXM peak; an unknown GPU gets no MFU rather than a guessed one."""
    assert benchmark.peak_tflops(name) == peak
