"""ddpm_metrics: the Frechet distance against closed forms, Inception Score, KID and precision/recall, the
synthetic-data classifier, and the Inception weights (none are downloaded: the offline message is checked with the
download mocked)."""

import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli as run
from conftest import tree_fingerprint, write_random_checkpoint
from ddpm_data import load_datasets
from ddpm_metrics import (
    INCEPTION_FILE,
    classify_synthetic,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_inception,
    precision_recall,
)

# Frechet distance and Inception Score


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    generator = np.random.default_rng(0)
    mu1, mu2 = generator.normal(size=5), generator.normal(size=5)
    var1, var2 = generator.uniform(0.1, 2, 5), generator.uniform(0.1, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_proportional_full_covariances():
    """sigma1 = c^2 sigma2 gives (sigma1 sigma2)^(1/2) = c sigma2, so d = ||mu1 - mu2||^2 + (1 - c)^2 Tr(sigma2)."""
    generator = np.random.default_rng(1)
    root = generator.normal(size=(6, 6))
    sigma2 = root @ root.T + 0.1 * np.eye(6)
    mu1, mu2, c = generator.normal(size=6), generator.normal(size=6), 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(sigma2)
    assert frechet_distance(mu1, c**2 * sigma2, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("count,dim", [(500, 16), (40, 64)])  # the second has a singular covariance, as small FIDs do
def test_frechet_distance_of_identical_sets_is_zero(count, dim):
    features = np.random.default_rng(2).normal(size=(count, dim)) * np.linspace(0.5, 3, dim)
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    shifted = feature_statistics(features + 0.5)
    assert frechet_distance(*shifted, mu, sigma) == pytest.approx(0.25 * dim, rel=1e-6)


def test_fid_of_two_gaussian_samples_approaches_the_closed_form():
    generator = np.random.default_rng(3)
    var1, var2 = np.array([0.5, 1.0, 2.0]), np.array([1.0, 1.0, 0.5])
    first = generator.normal(size=(100_000, 3)) * np.sqrt(var1)
    second = generator.normal(size=(100_000, 3)) * np.sqrt(var2) + np.array([1.0, 0.0, -1.0])
    expected = 2.0 + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))  # = 2.0 + 0.5858
    measured = frechet_distance(*feature_statistics(first), *feature_statistics(second))
    assert measured == pytest.approx(expected, rel=0.02)


def test_inception_score_is_the_number_of_confidently_and_evenly_predicted_classes():
    confident = torch.nn.functional.one_hot(torch.arange(1000) % 4, 1008).float() * 50
    mean, std = inception_score(confident)
    assert (
        mean == pytest.approx(4.0, rel=0.02) and std < 0.05
    )  # each shuffled split of 100 holds the 4 classes about evenly
    assert inception_score(torch.zeros(1000, 1008))[0] == pytest.approx(1.0)


# KID and precision/recall


def test_kid_and_precision_recall_separate_shifted_sets_and_not_identical_ones():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    same, shifted = kernel_inception_distance(fake, real), kernel_inception_distance(fake + 2.0, real)
    assert abs(same["mean"]) < 0.05 < shifted["mean"] and same["subset_size"] == 300
    assert precision_recall(real, real)["precision"] == precision_recall(real, real)["recall"] == 1.0
    far = precision_recall(real + 100.0, real)
    assert far["precision"] == far["recall"] == 0.0


# Class consistency


def test_synthetic_classifier_names_the_class_of_real_training_images():
    data = load_datasets("synthetic", "unused", 16)
    predicted = classify_synthetic(data.train.images)
    assert (predicted == data.train.labels).float().mean().item() > 0.99
    blank = torch.full((1, 3, 16, 16), 20, dtype=torch.uint8)
    assert classify_synthetic(blank).tolist() == [-1]


# Inception weights: offline message, and the file it names is the one that is used


def test_offline_inception_says_which_file_to_place_where_and_that_file_is_used(tmp_path, monkeypatch, capsys):
    workspace = tmp_path / "workspace"
    write_random_checkpoint(workspace / "models/C/ckpt.pt", conditional=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, destination, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    before = tree_fingerprint(workspace)
    capsys.readouterr()
    assert run("--evaluate --model_path models/C/ckpt.pt --fid_num_samples 4 --save_dir ev_offline", workspace) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert tree_fingerprint(workspace) == before
    placed = re.search(r"place (\S+) \(from https://\S+\) in (\S+)/$", err)
    assert placed and placed.group(1) == INCEPTION_FILE, err
    assert Path(placed.group(2)) == tmp_path / "torch_home/hub/checkpoints"

    # Weights of the right layout (random values) placed there are loaded, with no download attempted.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.save({}, tmp_path / "empty.pth")
        layout = FeatureExtractorInceptionV3(
            "layout", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth")
        )
    torch.save(layout.state_dict(), Path(placed.group(2)) / placed.group(1))
    features, logits = load_inception("cpu")(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)


def test_inception_file_name_is_the_one_torch_fidelity_downloads():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3.rsplit("/", 1)[-1] == INCEPTION_FILE
