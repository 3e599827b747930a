"""ddpm_quality: the sample quality curve during training, its derived schedule, best_fid.pt, and resume."""

import json
import math

import pytest

from conftest import run_cli
from ddpm_checkpoint import load_checkpoint
from ddpm_quality import FORWARD_COST, QUALITY_BUDGET, QualitySchedule

DIGITS = (
    "--dataset folder --data_dir digits --image_size 16 --model_size tiny --timesteps 50 --batch_size 64 --conditional "
    "--sample_every 0 --quality_samples 40 --sampler ddim --sampling_steps 4 --save_model --run_name Q --save_dir out"
)


def test_the_derived_schedule_keeps_the_curve_within_its_budget_of_training_time():
    """First point a priori: 40 samples x 4 steps x 2 branches x a third of a training step, over 10%; then the point
    measured: 3 s of curve per 0.01 s of training per image is due after 3 / (0.1 x 0.01) = 3,000 images, never
    sooner than an epoch; a given interval is kept as it is."""
    derived = QualitySchedule(None, samples=40, steps=4, branches=2)
    assert derived.first() == math.ceil(40 * 4 * 2 * FORWARD_COST / QUALITY_BUDGET) == 1067
    assert derived.next(1000, seconds=3.0, seconds_per_image=0.01, epoch_examples=500) == 1000 + 3000
    assert derived.next(1000, seconds=0.1, seconds_per_image=0.01, epoch_examples=500) == 1000 + 500, (
        "at most once an epoch"
    )
    given = QualitySchedule(2048, samples=40, steps=4, branches=2)
    assert given.first() == 2048 and given.next(4096, 3.0, 0.01, 500) == 6144


def test_a_digits_run_records_its_curve_keeps_the_best_and_resume_keeps_both(digits_workspace, capsys):
    root = digits_workspace.parent
    assert run_cli(f"{DIGITS} --max_steps 40", root) == 0
    printed = capsys.readouterr().out
    assert "quality curve: first after 1067 images, then at most 10% of the time in optimizer steps (derived" in printed
    assert "measured by the judge's Frechet distance" in printed
    history = json.loads((root / "out/loss_history_Q.json").read_text())
    points = history["quality"]
    assert [point["metric"] for point in points] == ["judge"] * len(points) and len(points) >= 2
    assert points[0]["images"] >= 1067 and points[-1]["step"] == 40, "the first when due, the last at the end"
    epoch_images = 64 * (history["steps"][0])
    assert all(b["images"] - a["images"] >= epoch_images or b["step"] == 40 for a, b in zip(points, points[1:]))
    assert all(0 <= point["class_accuracy"] <= 1 and point["value"] > 0 for point in points)
    best = min(points, key=lambda point: point["value"])
    assert load_checkpoint(root / "models/Q/best_fid.pt")["train_state"]["step"] == best["step"]
    metrics = [json.loads(line) for line in (root / "out/metrics_Q.jsonl").read_text().splitlines()]
    assert [m["value"] for m in metrics if m["kind"] == "quality"] == [point["value"] for point in points]
    assert (root / "out/quality_curve_Q.png").stat().st_size > 0
    share = float(printed.split("quality curve: ")[-1].split("% of the time")[0].split(", ")[-1])
    print(f"quality curve share of the time in optimizer steps: {share}%")
    state = load_checkpoint(root / "models/Q/ckpt.pt")["train_state"]
    assert state["best_quality"] == best["value"] and state["quality_due"] > points[-1]["images"]

    assert run_cli(f"{DIGITS} --max_steps 50", root) == 0
    continued = json.loads((root / "out/loss_history_Q.json").read_text())["quality"]
    assert continued[: len(points)] == points and continued[-1]["step"] == 50, "resume keeps the curve and adds to it"
    kept = load_checkpoint(root / "models/Q/ckpt.pt")["train_state"]["best_quality"]
    assert kept == min(point["value"] for point in continued)


@pytest.mark.parametrize(
    "flags, reason",
    [
        ("--max_steps 2", "the run is shorter than one derived interval"),
        ("--max_steps 2 --quality_every 0", "--quality_every 0"),
    ],
)
def test_a_short_run_or_quality_every_0_records_no_curve_and_says_why(digits_workspace, capsys, flags, reason):
    assert run_cli(f"{DIGITS} {flags}", digits_workspace.parent) == 0
    assert f"quality curve: off ({reason}" in capsys.readouterr().out
    assert "quality" not in json.loads((digits_workspace.parent / "out/loss_history_Q.json").read_text())
