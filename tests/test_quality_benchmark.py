"""scripts/quality_benchmark.py: a smoke run (what it reports, not what it measures) and its judge."""

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest

from conftest import REPO, tree_fingerprint
from ddpm_judge import judge_path

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")
spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "scripts" / "quality_benchmark.py")
quality_benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality_benchmark)


def test_the_benchmark_digits_are_the_real_split_and_its_judge_is_the_tools(tmp_path, digits_judge):
    """The real data split (1,347 training and 450 test digits, those of conftest.write_digits_folder, on which
    tests/test_judge.py measures the judge), and the judge the benchmark loads is ddpm_judge's, read from its cache."""
    splits = quality_benchmark.digits(image_size=16)
    assert len(splits["train"][1]) == 1347 and len(splits["test"][1]) == 450
    assert splits["train"][0].dtype == np.uint8 and splits["train"][0].shape[1:] == (1, 16, 16)
    root = quality_benchmark.write_folder(splits, tmp_path / "digits", flat=False)
    assert tree_fingerprint(root) == {
        name: digest for name, digest in tree_fingerprint(digits_judge[0]).items() if not name.startswith("judge_")
    }, "the same PNGs as the tests' digits"
    shutil.copy(judge_path(digits_judge[0], "folder", 16, 1, 0), judge_path(root, "folder", 16, 1, 0))
    args = quality_benchmark.parse_args(["--image_size", "16"])
    judge = quality_benchmark.load_judge(root, args)
    assert judge.test_accuracy == digits_judge[1].test_accuracy
    images, labels = splits["test"]
    assert quality_benchmark.judge_figures(judge, images, labels) == pytest.approx(
        {"class_accuracy": judge.test_accuracy, "frechet_distance": 0.0, "floor": digits_judge[1].floor(450)}, abs=1e-6
    )


def test_smoke_run_writes_a_row_per_trainer_and_budget(tmp_path):
    out = tmp_path / "bench"
    argv = [
        "--budgets",
        "2,3",
        "--rows",
        "ours,diffusers",
        "--image_size",
        "8",
        "--batch_size",
        "16",
        "--model_flags",
        "--model_size tiny --base_dim 32",
        "--num_samples",
        "10",
        "--sampling_steps",
        "2",
        "--judge_steps",
        "20",
        "--out",
        str(out),
    ]
    assert quality_benchmark.main(argv) == 0
    report = json.loads((out / "quality_benchmark.json").read_text())
    assert [(row["steps"], row["trainer"]) for row in report["results"]] == [
        (2, "ours"),
        (2, "diffusers"),
        (3, "ours"),
        (3, "diffusers"),
    ]
    for row in report["results"]:
        assert 0 <= row["class_accuracy"] <= 1 and math.isfinite(row["frechet_distance"]) and row["train_seconds"] > 0
    table = (out / "quality_benchmark.md").read_text()
    assert "| 3 | diffusers UNet2DModel + DDPMScheduler |" in table and "| 2 | ours |" in table
    assert (
        (out / "samples_ours_3.png").is_file()
        and (out / "digits/train/7").is_dir()
        and (out / "digits/test/7").is_dir()
    )


def test_sampling_study_smoke_run_reports_every_part(tmp_path):
    out = tmp_path / "study"
    argv = [
        "--sampling_study",
        "--budgets",
        "8",
        "--image_size",
        "8",
        "--batch_size",
        "16",
        "--model_flags",
        "--model_size tiny --base_dim 32 --timesteps 20",
        "--num_samples",
        "10",
        "--judge_steps",
        "20",
        "--out",
        str(out),
        "--study_solvers",
        "unipc,ipndm",
        "--study_spacings",
        "logsnr,edm",
        "--study_evaluations",
        "5,30",
        "--study_stochastic_evaluations",
        "20,100",
    ]
    assert quality_benchmark.main(argv) == 0
    rows = json.loads((out / "sampling_study.json").read_text())["rows"]
    grid = [
        (row["solver"], row["spacing"], row["evaluations"])
        for row in rows
        if row["part"] in ("ode limit", "solver grid")
    ]
    assert grid == [
        ("dpm++3m", "logsnr", 20),
        ("unipc", "logsnr", 5),
        ("unipc", "logsnr", 20),
        ("unipc", "edm", 5),
        ("unipc", "edm", 20),
        ("ipndm", "logsnr", 5),
        ("ipndm", "logsnr", 20),
        ("ipndm", "edm", 5),
        ("ipndm", "edm", 20),
        ("dpm++2m-sde", "logsnr", 20),
        ("ddpm", "time", 20),
    ], "evaluations at most T = 20, without repeats"
    assert all(math.isfinite(row["distance_to_ode_limit"]) for row in rows if row["part"] == "solver grid")
    table = (out / "solver_table.md").read_text()
    assert "| 8 | ipndm | edm | 5 |" in table and "| 8 | dpm++3m | logsnr | 20 |" in table and "(the limit)" in table
    parts = [row["part"] for row in rows if row["part"] not in ("sweep", "ode limit", "solver grid")]
    assert parts == [
        "default",
        "ode reference",
        "solver",
        "solver",
        "solver",
        "solver",
        "post-hoc EMA alone (CFG w=3)",
        "autoguidance alone (EMA)",
        "the sweep's best",
    ]
    sweep = [row for row in rows if row["part"] == "sweep"]
    assert len(sweep) == 5 * 6, "EMA (own + 4 lengths) x (3 CFG + 3 autoguidance scales)"
    assert rows[-1]["frechet_distance"] == min(row["frechet_distance"] for row in sweep)
    assert all(
        math.isfinite(row["distance_to_1000_steps"]) and math.isfinite(row["distance_to_ode"])
        for row in rows
        if row["part"] == "solver"
    )
    old_ode = next(row for row in rows if row["part"] == "ode reference")
    assert old_ode["setting"].startswith("dpm++2m 20 steps") and "distance_to_ode" not in old_ode, (
        "the ODE reference: min(100, T) steps"
    )
    assert "| 8 | the sweep's best |" in (out / "sampling_study.md").read_text()
