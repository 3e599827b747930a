"""scripts/gpu_check.py: the --quick run end to end (every step reports real figures) and the profile arithmetic of the
GPU path."""

import importlib.util
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

pytest.importorskip("diffusers")
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)

STEPS = ["throughput", "profile", "training", "sampling", "nonfinite_skip", "torchrun"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `gpu_check.py --quick` run as a user starts it; (its output folder, its report)."""
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), "--quick"],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_step_ran_in_order_without_error(quick):
    out, report = quick
    assert list(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["error"] is None, (name, step["error"])
        assert positive(step["elapsed_s"]) and step["budget_s"] == gpu_check.STEP_BUDGET_S[name]
    assert report["quick"] and "--quick" in report["command"] and report["environment"]["torch"]
    assert sum(gpu_check.STEP_BUDGET_S.values()) < 8 * 60, "the full run's plan fits in 8 minutes"


def test_throughput_has_every_model_and_the_targets(quick):
    step = quick[1]["steps"]["throughput"]
    assert set(step["models"]) == {gpu_check.OURS, gpu_check.CHANNELS_LAST, gpu_check.COMPILED, gpu_check.DIFFUSERS}
    for name, model in step["models"].items():
        for key in (
            "images_per_s",
            "step_ms",
            "peak_memory_mb",
            "first_step_s",
            "gflop_per_image_forward",
            "speedup_vs_unet2dmodel",
        ):
            assert positive(model[key]), (name, key)
        assert model["mfu"] is None, "no MFU on a CPU"
    assert step["models"][gpu_check.DIFFUSERS]["speedup_vs_unet2dmodel"] == 1.0
    speedup = step["targets"]["speedup_vs_unet2dmodel"]
    assert speedup["value"] == step["models"][step["best"]]["speedup_vs_unet2dmodel"] and speedup["met"] == (
        speedup["value"] >= 1.5
    )
    assert step["targets"]["mfu"] == {"value": None, "goal": 0.4, "met": None}


def test_profile_writes_the_top_ops_table(quick):
    out, report = quick
    step = report["steps"]["profile"]
    assert positive(step["step_ms"]) and step["gpu_idle_share"] is None and "no GPU" in step["note"]
    table = (out / step["table"]).read_text()
    assert "aten::" in table and len([line for line in table.splitlines() if "aten::" in line]) <= gpu_check.TOP_KERNELS


def test_training_run_figures_and_resume(quick):
    out, report = quick
    step = report["steps"]["training"]
    assert step["steps"] == step["max_steps"] == gpu_check.QUICK.train_steps
    for key in (
        "wall_s",
        "images_per_s_logged_median",
        "images_per_s_in_steps",
        "seconds_per_checkpoint_write",
        "seconds_in_steps",
        "seconds_outside_steps",
        "peak_memory_mb",
        "final_train_loss",
        "checkpoint_writes",
    ):
        assert positive(step[key]), key
    assert 0 < step["outside_steps_share"] < 1 and step["nonfinite_skipped"] == 0 and step["nonfinite_ok"]
    assert step["command"].startswith("python ddpm_main.py --dataset synthetic") and "--conditional" in step["command"]
    assert step["resume"] == {
        **step["resume"],
        "resumed_at_step": step["steps"],
        "final_step": step["steps"] + gpu_check.QUICK.resume_steps,
        "continued": True,
    }
    assert (out / step["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampling_bf16_against_fp32_and_compiled(quick):
    step = quick[1]["steps"]["sampling"]
    assert [(run["sampler"], run["network"]) for run in step["runs"]] == [
        ("dpm++2m", "bf16"),
        ("dpm++2m", "fp32"),
        ("ddim", "bf16"),
        ("ddim", "fp32"),
    ]
    for run in step["runs"]:
        assert positive(run["images_per_s"]) and run["samples"] > 0
    for run in step["runs"][::2]:  # the bf16 rows hold the comparison with fp32 from the same noise
        assert 0 <= run["max_pixel_diff"] <= 255 and run["images_compared"] == gpu_check.QUICK.variant_count
    compiled, graphs = step["compiled"]
    assert (
        positive(compiled["images_per_s"])
        and positive(compiled["first_batch_s"])
        and 0 <= compiled["max_pixel_diff"] <= 255
    )
    assert "skipped" in graphs, "no CUDA graphs on a CPU"


def test_nonfinite_step_leaves_everything_bit_identical(quick):
    step = quick[1]["steps"]["nonfinite_skip"]
    assert step["skip_flag"] and step["bit_identical"] and step["next_finite_step_moves_weights"]
    assert step["weights_bit_identical"] and step["optimizer_state_bit_identical"] and step["ema_bit_identical"]
    assert step["optimizer"] == "AdamW(fused=True)" and step["tensors_compared"] > 0


def test_torchrun_trains_and_writes_a_checkpoint(quick):
    step = quick[1]["steps"]["torchrun"]
    assert step["steps"] == step["planned_steps"] == gpu_check.QUICK.torchrun_steps and step["world_size"] == 1
    assert step["process_group"] == {"backend": "gloo", "all_reduce_ok": True} and positive(step["seconds"])


def test_markdown_has_every_table(quick):
    out, _ = quick
    text = (out / "gpu_check.md").read_text()
    for header in (
        "| model | images/s | vs UNet2DModel |",
        "| step ms | device busy ms per step |",
        "| figure | value |",
        "| sampler | network | samples | images/s |",
        "| variant | images/s | vs eager bf16 |",
        "| step | status | seconds |",
    ):
        assert header in text, header
    assert "failed" not in text and "bit-identical: yes, yes, yes" in text


def test_a_failing_step_is_recorded_in_the_markdown():
    """A failed step shows its one-line error where its table would be, and the others still report."""
    report = {
        "environment": {"gpu": None, "cpu": "cpu", "driver": None, "cuda": None, "torch": "x"},
        "command": "c",
        "total_s": 1.0,
        "steps": {
            "profile": {"error": "RuntimeError: boom", "elapsed_s": 0.1, "budget_s": 15},
            "nonfinite_skip": {
                "error": None,
                "elapsed_s": 0.1,
                "budget_s": 5,
                "optimizer": "AdamW(fused=True)",
                "device": "cpu",
                "amp": "float32",
                "skip_flag": True,
                "weights_bit_identical": True,
                "optimizer_state_bit_identical": True,
                "ema_bit_identical": True,
                "tensors_compared": 3,
            },
        },
    }
    text = gpu_check.markdown(report)
    assert (
        "profile: failed: `RuntimeError: boom`" in text
        and "| profile | failed |" in text
        and "bit-identical: yes, yes, yes" in text
    )


def test_gpu_idle_share_counts_overlapping_kernels_once():
    """The CUDA path, which no CPU run reaches: busy time is the union of the device events' intervals."""
    assert gpu_check.busy_microseconds([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert gpu_check.busy_microseconds([]) == 0


def test_kernel_table_ranks_kernels_by_total_time():
    event = lambda name, start, end: SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))  # noqa: E731
    events = [event("gemm", 0, 100), event("gemm", 200, 300), event("norm", 100, 250), event("copy", 300, 301)]
    lines = gpu_check.kernel_table(events, 2, "title").splitlines()
    assert lines[0] == "title" and len(lines) == 4, "title, header, the 2 longest"
    assert lines[2].split()[:3] == ["gemm", "2", "0.200"] and lines[3].split()[0] == "norm"


def test_full_run_plans_its_steps_from_the_measured_rate_and_checkpoint_time():
    """TRAIN_STEPS_S of steps and checkpoints (one per epoch, one per 500 steps) at step 1's rate; a fixed count without
    one."""
    steps, why = gpu_check.planned_steps(
        gpu_check.FULL, {"train_images_per_s": 3200.0}, checkpoint_s=1.0, steps_per_epoch=37
    )
    per_step = 128 / 3200 + 1.0 * (1 / 37 + 1 / 500)
    assert steps == int(gpu_check.TRAIN_STEPS_S / per_step) and "3200 images/s" in why
    assert gpu_check.planned_steps(gpu_check.FULL, {}, 1.0, 37) == (
        gpu_check.FULL.fallback_train_steps,
        "fallback: step 1 measured no images/s",
    )
    assert (
        gpu_check.planned_steps(gpu_check.QUICK, {"train_images_per_s": 1.0}, 1.0, 37)[0] == gpu_check.QUICK.train_steps
    )
