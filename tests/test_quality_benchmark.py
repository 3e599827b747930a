"""scripts/quality_benchmark.py: a smoke run (what it reports, not what it measures) and its judge."""
import importlib.util
import json
import math

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")
spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "scripts" / "quality_benchmark.py")
quality_benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality_benchmark)


def test_the_judge_knows_real_digits():
    """The classifier that scores the samples must itself be right on the real test digits (and the data split
    must be the real one: 1,347 training and 450 test digits)."""
    splits = quality_benchmark.digits(image_size=8)
    assert len(splits["train"][1]) == 1347 and len(splits["test"][1]) == 450
    assert splits["train"][0].dtype == np.uint8 and splits["train"][0].shape[1:] == (1, 8, 8)
    classifier = quality_benchmark.train_classifier(*splits["train"], seed=0, epochs=10)
    test_features = quality_benchmark.classifier_features(classifier, splits["test"][0])
    real = quality_benchmark.judge(classifier, *splits["test"], test_features)
    assert real["class_accuracy"] > 0.85 and real["frechet_distance"] < 1e-6  # 8x8, 10 epochs: a rough but real judge
    noise = np.random.default_rng(0).integers(0, 256, splits["test"][0].shape, dtype=np.uint8)
    assert quality_benchmark.judge(classifier, noise, splits["test"][1], test_features)["frechet_distance"] > 10 * \
        quality_benchmark.judge(classifier, *splits["train"], test_features)["frechet_distance"]


def test_smoke_run_writes_a_row_per_trainer_and_budget(tmp_path):
    out = tmp_path / "bench"
    argv = ["--budgets", "2,3", "--rows", "ours,diffusers", "--image_size", "8", "--batch_size", "16", "--model_flags", "--model_size tiny --base_dim 32",
            "--num_samples", "10", "--sampling_steps", "2", "--classifier_epochs", "2", "--out", str(out)]
    assert quality_benchmark.main(argv) == 0
    report = json.loads((out / "quality_benchmark.json").read_text())
    assert [(row["steps"], row["trainer"]) for row in report["results"]] == [(2, "ours"), (2, "diffusers"), (3, "ours"), (3, "diffusers")]
    for row in report["results"]:
        assert 0 <= row["class_accuracy"] <= 1 and math.isfinite(row["frechet_distance"]) and row["train_seconds"] > 0
    table = (out / "quality_benchmark.md").read_text()
    assert "| 3 | diffusers UNet2DModel + DDPMScheduler |" in table and "| 2 | ours |" in table
    assert (out / "samples_ours_3.png").is_file() and (out / "digits/train/7").is_dir() and (out / "digits/test/7").is_dir()


def test_sampling_study_smoke_run_reports_every_part(tmp_path):
    out = tmp_path / "study"
    argv = ["--sampling_study", "--budgets", "8", "--image_size", "8", "--batch_size", "16", "--model_flags",
            "--model_size tiny --base_dim 32 --timesteps 20", "--num_samples", "10", "--classifier_epochs", "2", "--out", str(out)]
    assert quality_benchmark.main(argv) == 0
    rows = json.loads((out / "sampling_study.json").read_text())["rows"]
    parts = [row["part"] for row in rows if row["part"] != "sweep"]
    assert parts == ["default", "ode reference", "solver", "solver", "solver", "solver", "post-hoc EMA alone (CFG w=3)", "autoguidance alone (EMA)",
                     "the sweep's best"]
    sweep = [row for row in rows if row["part"] == "sweep"]
    assert len(sweep) == 5 * 6, "EMA (own + 4 lengths) x (3 CFG + 3 autoguidance scales)"
    assert rows[-1]["frechet_distance"] == min(row["frechet_distance"] for row in sweep)
    assert all(math.isfinite(row["distance_to_1000_steps"]) and math.isfinite(row["distance_to_ode"]) for row in rows if row["part"] == "solver")
    assert rows[1]["setting"].startswith("dpm++2m 20 steps") and "distance_to_ode" not in rows[1], "the ODE reference: min(100, T) steps"
    assert "| 8 | the sweep's best |" in (out / "sampling_study.md").read_text()
