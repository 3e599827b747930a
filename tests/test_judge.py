"""ddpm_judge: the classifier trained on the data set, on scikit-learn's real digits at 16x16 (trained once per
session in conftest.digits_judge): what it knows of real images, what it says of wrongly labelled ones, its seed, its
cache, and the one line each bad input gets."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_judge
from conftest import weights_equal, write_grey_folder
from ddpm_data import load_datasets
from ddpm_judge import JudgeNet, judge_path, load_or_train_judge, train_judge

pytest.importorskip("sklearn")
pytest.importorskip("torch_fidelity")


def digits_splits(root: Path):
    """The splits the judge was trained and tested on (its validation split is held out from both)."""
    return load_datasets("folder", root, 16, seed=0, channels=1, val_fraction=ddpm_judge.JUDGE_VAL_FRACTION)


def nhwc(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 2, 3, 1)


def test_the_judge_knows_real_digits_and_their_distance_is_at_the_floor(digits_judge):
    """Trained on 1,213 digits, tested on 450: measured test accuracy 0.998; the 134 held-out validation digits
    (seen neither in training nor in the reference) measured class accuracy 0.993 (0.005 below) and distance 11.40
    against a floor of 11.95 at 134 images (0.95 of it); uniform noise measured 1494, 125 times the floor."""
    root, judge, lines = digits_judge
    data = digits_splits(root)
    assert judge.test_accuracy >= 0.95
    assert (
        lines[-1].startswith("judge trained for 600 steps on 1213 folder images")
        and f"{judge.test_accuracy:.3f}" in lines[-1]
    )
    test = judge.figures(nhwc(data.test.images), data.test.labels)
    assert test["class_accuracy"] == pytest.approx(judge.test_accuracy, abs=1e-12), (
        "the figures read images as training did"
    )
    assert abs(test["distance"]) < 1e-6 * np.trace(judge.test_sigma), "the test images are the reference"
    held_out = judge.figures(nhwc(data.val.images), data.val.labels)
    assert abs(held_out["class_accuracy"] - judge.test_accuracy) <= 0.03
    assert 0.5 * held_out["floor"] <= held_out["distance"] <= 1.5 * held_out["floor"]
    assert held_out["floor"] == pytest.approx(judge.floor(len(data.val)))
    noise = torch.randint(
        0, 256, (len(data.val), 16, 16, 1), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    assert judge.figures(noise, None)["distance"] > 50 * held_out["floor"]


def test_images_drawn_for_the_wrong_labels_get_a_low_class_accuracy(digits_judge):
    root, judge, _ = digits_judge
    data = digits_splits(root)
    right = judge.figures(nhwc(data.test.images), data.test.labels)
    shifted = judge.figures(nhwc(data.test.images), (data.test.labels + 1) % 10)
    assert shifted["class_accuracy"] <= 0.02 and shifted["distance"] == right["distance"], (
        "the labels move only the accuracy"
    )
    threes_as_eights = torch.where(data.test.labels == 3, 8, data.test.labels)
    per_class = judge.figures(nhwc(data.test.images), threes_as_eights)["per_class_accuracy"]
    assert set(per_class) == {str(k) for k in range(10)}
    assert per_class["8"] == pytest.approx(
        (data.test.labels == 8).sum().item() / (threes_as_eights == 8).sum().item(), abs=0.02
    )
    assert per_class["3"] is None, "no sample was drawn for 3"
    assert min(value for key, value in per_class.items() if key not in ("3", "8")) >= 0.95


def test_the_same_seed_gives_the_same_judge_and_the_same_figures(digits_judge):
    root, _, _ = digits_judge
    data = digits_splits(root)
    first, second, other = (train_judge("folder", data, "cpu", seed=seed, steps=20) for seed in (0, 0, 1))
    assert weights_equal(first.net.state_dict(), second.net.state_dict())
    assert not weights_equal(first.net.state_dict(), other.net.state_dict())
    images, labels = nhwc(data.val.images), data.val.labels
    assert first.figures(images, labels) == second.figures(images, labels)
    assert first.figures(images, labels)["distance"] != other.figures(images, labels)["distance"]


def test_a_second_evaluation_reads_the_cache(digits_workspace, monkeypatch):
    cache = judge_path(digits_workspace, "folder", 16, 1, 0)
    stamp = cache.stat().st_mtime_ns
    monkeypatch.setattr(ddpm_judge, "train_judge", lambda *args, **kwargs: pytest.fail("the judge was trained again"))
    lines = []
    judge = load_or_train_judge("folder", digits_workspace, 16, 1, "cpu", report=lines.append)
    assert judge is not None and judge.path == cache and cache.stat().st_mtime_ns == stamp
    assert lines == [f"judge: {cache} (test accuracy {judge.test_accuracy:.3f} on 450 test images)"]


def retrained_after(root: Path, size: int, steps: int) -> list[str]:
    lines = []
    assert load_or_train_judge("folder", root, size, 1, "cpu", steps=steps, report=lines.append) is not None
    assert len(lines) == 2 and lines[1].startswith(f"judge trained for {steps} steps"), lines
    return lines


def test_a_cache_of_other_data_or_cut_short_is_retrained_with_one_line(digits_workspace):
    cache = judge_path(digits_workspace, "folder", 16, 1, 0)
    small = judge_path(digits_workspace, "folder", 8, 1, 0)
    shutil.copy(cache, small)  # a 16-pixel judge where the 8-pixel one belongs
    line = retrained_after(digits_workspace, 8, steps=60)[0]
    assert (
        line == f"judge cache {small} was trained on other data (image_size 16 not 8, steps 600 not 60): retraining it"
    )
    for split in ("train", "test"):
        shutil.rmtree(digits_workspace / split / "9")
    line = retrained_after(digits_workspace, 8, steps=60)[0]
    assert line.startswith(f"judge cache {small} was trained on other data (class_names ['0', ") and line.endswith(
        ": retraining it"
    )
    small.write_bytes(small.read_bytes()[:5000])
    line = retrained_after(digits_workspace, 8, steps=60)[0]
    assert line.startswith(f"judge cache {small} is unreadable (") and line.endswith("): retraining it")
    assert torch.load(small, weights_only=True)["description"]["class_names"] == [str(k) for k in range(9)]


@pytest.mark.parametrize(
    "layout,reason",
    [
        ("flat", "class 'a' has 5 training and 0 test images; a judge needs at least 20 and 5 per class"),
        ("one class", "the data set has no classes (a single class folder), so no judge classifier"),
    ],
)
def test_a_data_set_that_cannot_have_a_judge_says_so_in_one_line(tmp_path, layout, reason):
    root = tmp_path / "images"
    write_grey_folder(root, "flat")
    if layout == "one class":
        shutil.rmtree(root / "b")
    lines = []
    assert load_or_train_judge("folder", root, 8, 1, "cpu", report=lines.append) is None
    assert lines == [f"no judge for folder: {reason}; class accuracy and the judge's distance not measured"]
    assert not list(root.glob("judge_*"))


@pytest.mark.parametrize("size,pools", [(8, 1), (16, 2), (28, 2), (32, 3), (64, 4)])
def test_the_network_halves_the_image_down_to_about_4_pixels(size, pools):
    net = JudgeNet(3, size, 7)
    assert sum(isinstance(layer, torch.nn.MaxPool2d) for layer in net.trunk) == pools
    features, logits = net(torch.zeros(2, 3, size, size))
    assert features.shape == (2, ddpm_judge.FEATURE_DIM) and logits.shape == (2, 7)


def test_steps_are_derived_from_the_number_of_training_images():
    assert ddpm_judge.training_steps(1213) == ddpm_judge.MIN_STEPS
    assert ddpm_judge.training_steps(10_000) == round(30 * 10_000 / 128)
    assert ddpm_judge.training_steps(45_000) == ddpm_judge.MAX_STEPS
