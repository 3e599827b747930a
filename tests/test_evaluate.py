"""Evaluation: the Frechet distance against closed forms, Inception Score, the synthetic-data classifier,
and --evaluate / --guidance_sweep / --compare_checkpoints end to end on tiny models, with small feature
extractors (no Inception weights are downloaded; the offline message is checked with the download mocked)."""
import hashlib
import json
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_evaluate
import ddpm_metrics
from conftest import run_cli as run
from ddpm_metrics import (FEATURE_EXTRACTORS, INCEPTION_FILE, RandomConvFeatures, classify_synthetic, feature_statistics,
                           frechet_distance, inception_score, load_inception)
from ddpm_checkpoint import load_checkpoint, save_checkpoint
from ddpm_data import SYNTHETIC_CLASS_NAMES, load_datasets
from ddpm_model import UNet, preset_config

FAST = "--fid_features random-conv --sampler ddim --sampling_steps 2"


def tree_fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def write_checkpoint(path: Path, conditional: bool) -> None:
    """A tiny 16x16 model for the synthetic data set in the checkpoint format, with random weights
    (perturbed so that its output, and its conditional and unconditional branches, differ), at training step 3."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, image_size=16, num_classes=10 if conditional else None, **preset_config("tiny", 16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_checkpoint({
        "model_config": model.config, "model": model.state_dict(), "ema": model.state_dict(),
        "diffusion": {"timesteps": 20, "schedule": "linear"}, "conditional": conditional,
        "data": {"dataset": "synthetic", "class_names": list(SYNTHETIC_CLASS_NAMES), "image_size": 16, "channels": 3},
        "train_state": {"step": 3}, "config": {},
    }, path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory with an unconditional (models/U/ckpt.pt) and a conditional (models/C/ckpt.pt) tiny model."""
    root = tmp_path_factory.mktemp("evaluate")
    write_checkpoint(root / "models/U/ckpt.pt", conditional=False)
    write_checkpoint(root / "models/C/ckpt.pt", conditional=True)
    return root


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
    assert mean == pytest.approx(4.0, rel=0.02) and std < 0.05  # each shuffled split of 100 holds the 4 classes about evenly
    assert inception_score(torch.zeros(1000, 1008))[0] == pytest.approx(1.0)


# Class consistency


def test_synthetic_classifier_names_the_class_of_real_training_images():
    data = load_datasets("synthetic", "unused", 16)
    predicted = classify_synthetic(data.train.images)
    assert (predicted == data.train.labels).float().mean().item() > 0.99
    blank = torch.full((1, 3, 16, 16), 20, dtype=torch.uint8)
    assert classify_synthetic(blank).tolist() == [-1]


# Inception weights: offline message, and the file it names is the one that is used


def test_offline_inception_says_which_file_to_place_where_and_that_file_is_used(workspace, tmp_path, monkeypatch, capsys):
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
        layout = FeatureExtractorInceptionV3("layout", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(layout.state_dict(), Path(placed.group(2)) / placed.group(1))
    features, logits = load_inception("cpu")(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)


# --evaluate end to end


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_evaluate_writes_results_json_samples_npz_and_grid(workspace):
    assert run(f"--evaluate --model_path models/C/ckpt.pt {FAST} --fid_num_samples 10 --guidance_scale 2 --save_dir ev_C", workspace) == 0
    results = read_json(workspace / "ev_C/evaluation.json")
    assert np.isfinite(results["fid"]) and results["fid"] > 0
    assert results["num_samples"] == 10 and results["checkpoint"] == "models/C/ckpt.pt" and results["step"] == 3
    assert (results["sampler"], results["sampling_steps"], results["guidance_scale"]) == ("ddim", 2, 2.0)
    assert results["feature_extractor"] == "random-conv" and results["comparable_to_published_fid"] is False
    assert results["inception_score"] is None and any("Inception Score" in note for note in results["notes"])
    assert 0 <= results["class_consistency"] <= 1
    assert results["reference_images"] == 5400  # train + validation split of the 6000 synthetic images
    npz = np.load(workspace / "ev_C/samples.npz")
    assert npz["images"].dtype == np.uint8 and npz["images"].shape == (10, 16, 16, 3)
    assert npz["labels"].tolist() == list(range(10))
    assert (workspace / "ev_C/grid.png").stat().st_size > 0
    assert (workspace / "data/fid_stats_synthetic_16_random-conv.npz").is_file()


def test_unconditional_evaluate_has_no_labels_guidance_or_class_consistency(workspace):
    assert run(f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_num_samples 6 --save_dir ev_U", workspace) == 0
    results = read_json(workspace / "ev_U/evaluation.json")
    assert results["guidance_scale"] is None and results["class_consistency"] is None
    assert np.load(workspace / "ev_U/samples.npz")["labels"].tolist() == [-1] * 6


def test_reference_statistics_are_computed_once_then_read_from_the_cache(workspace, monkeypatch):
    command = f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_num_samples 6"
    assert run(f"{command} --save_dir cache_1", workspace) == 0
    cache = workspace / "data/fid_stats_synthetic_16_random-conv.npz"
    with np.load(cache) as stats:
        mu, sigma, count = stats["mu"], stats["sigma"], stats["num_images"]
    np.savez(cache, mu=mu + 1.0, sigma=sigma, num_images=count)  # a cache that is read must change the FID
    monkeypatch.setattr(ddpm_metrics, "load_datasets", lambda *args, **kwargs: pytest.fail("the data set was loaded again"))
    assert run(f"{command} --save_dir cache_2", workspace) == 0
    np.savez(cache, mu=mu, sigma=sigma, num_images=count)
    first, second = (read_json(workspace / name / "evaluation.json")["fid"] for name in ("cache_1", "cache_2"))
    assert second > first + 1.0


def test_evaluate_draws_the_same_images_as_inference_for_the_same_seed(workspace):
    common = "--model_path models/C/ckpt.pt --sampler ddim --sampling_steps 2 --guidance_scale 2 --seed 4"
    assert run(f"--evaluate {common} --fid_features random-conv --fid_num_samples 3 --save_dir same_ev", workspace) == 0
    assert run(f"--inference {common} --num_samples 3 --save_dir same_inf", workspace) == 0
    evaluated, inferred = (np.load(workspace / name / "samples.npz") for name in ("same_ev", "same_inf"))
    assert np.array_equal(evaluated["images"], inferred["images"])
    assert np.array_equal(evaluated["labels"], inferred["labels"])


def test_amp_runs_the_network_under_autocast_and_the_sampler_in_float32(workspace, monkeypatch):
    """--amp bf16: the network's convolutions run in bf16 (seen by a hook), its output is cast back to float32,
    and the images stay close to the float32 ones (within a few grey levels) without being identical."""
    seen = []
    original_forward = UNet.forward

    def forward(self, x, t, labels=None):
        out = original_forward(self, x, t, labels)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(UNet, "forward", forward)
    common = "--inference --model_path models/C/ckpt.pt --sampler ddim --sampling_steps 2 --guidance_scale 2 --num_samples 4"
    assert run(f"{common} --amp bf16 --save_dir amp_bf16", workspace) == 0
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    seen.clear()
    assert run(f"{common} --amp none --save_dir amp_none", workspace) == 0
    assert seen and all(not enabled and dtype == torch.float32 for enabled, dtype in seen)
    bf16, fp32 = (np.load(workspace / name / "samples.npz")["images"].astype(int) for name in ("amp_bf16", "amp_none"))
    assert 0 < np.abs(bf16 - fp32).mean() < 8
    assert read_json(workspace / "amp_bf16/samples.json")["network_autocast"] == "torch.bfloat16"


@pytest.mark.parametrize("mode", ["--inference --num_samples 2", "--evaluate --fid_num_samples 2 --fid_features random-conv",
                                  "--compare_checkpoints models/C/ckpt.pt models/C/ckpt.pt --num_samples 2"])
def test_compile_flag_compiles_the_sampling_network(workspace, monkeypatch, mode):
    """--compile reaches every sampling mode (torch.compile itself is stubbed: compiling takes minutes on this CPU)."""
    compiled = []
    monkeypatch.setattr(UNet, "compile", lambda self, *args, **kwargs: compiled.append(self.training))
    model = "" if mode.startswith("--compare") else "--model_path models/C/ckpt.pt"
    assert run(f"{mode} {model} --sampler ddim --sampling_steps 2 --compile --save_dir compiled", workspace) == 0
    assert compiled and not any(compiled), "compiled once per loaded model, in eval mode"


class FeaturesWithLogits(torch.nn.Module):
    """A test extractor that also gives class logits, so the Inception Score path runs without Inception."""

    def __init__(self):
        super().__init__()
        self.features = RandomConvFeatures()

    def forward(self, images):
        features, _ = self.features(images)
        return features, 10 * features[:, :10]


def test_guidance_sweep_writes_a_table_a_plot_and_one_grid_per_class(workspace, monkeypatch):
    monkeypatch.setitem(FEATURE_EXTRACTORS, "with-logits", lambda device: FeaturesWithLogits())
    command = "--evaluate --model_path models/C/ckpt.pt --fid_features with-logits --sampler ddim --sampling_steps 2"
    assert run(f"{command} --fid_num_samples 10 --guidance_sweep 0,4 --save_dir sweep", workspace) == 0
    rows = read_json(workspace / "sweep/guidance_sweep.json")
    assert [row["guidance_scale"] for row in rows] == [0.0, 4.0]
    assert all(np.isfinite(row["fid"]) and row["inception_score"] is not None for row in rows)  # logits give an IS
    assert rows[0]["fid"] != rows[1]["fid"]
    assert "| guidance_scale | num_samples | fid | inception_score | class_consistency |" in (workspace / "sweep/guidance_sweep.md").read_text()
    assert (workspace / "sweep/guidance_sweep.png").stat().st_size > 0
    unguided, guided = (np.load(workspace / f"sweep/scale_{w}/samples.npz") for w in (0, 4))
    assert np.array_equal(unguided["labels"], guided["labels"]) and not np.array_equal(unguided["images"], guided["images"])
    names = load_checkpoint(workspace / "models/C/ckpt.pt")["data"]["class_names"]
    grids = sorted((workspace / "sweep").glob("guidance_class*.png"))
    assert len(grids) == len(names)
    with Image.open(workspace / f"sweep/guidance_class3_{names[3]}.png") as grid:
        assert grid.height == 2 * 64  # one row per scale, 16-pixel images shown at 64


# KID, precision/recall, --fid_ref, the ADM evaluator's samples.npz


def test_kid_and_precision_recall_separate_shifted_sets_and_not_identical_ones():
    from ddpm_metrics import kernel_inception_distance, precision_recall

    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    same, shifted = kernel_inception_distance(fake, real), kernel_inception_distance(fake + 2.0, real)
    assert abs(same["mean"]) < 0.05 < shifted["mean"] and same["subset_size"] == 300
    assert precision_recall(real, real)["precision"] == precision_recall(real, real)["recall"] == 1.0
    far = precision_recall(real + 100.0, real)
    assert far["precision"] == far["recall"] == 0.0


def read_like_the_adm_evaluator(path: Path, name: str) -> np.ndarray:
    """guided-diffusion's evaluations/evaluator.py opens `name`.npy inside the .npz as a zip member and streams it
    after reading its header (open_npz_array, StreamingNpzArrayReader); a missing key is its `missing arr_0 in npz file`."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        assert archive.namelist()[0] == "arr_0.npy", "arr_0 comes first"
        with archive.open(f"{name}.npy") as member:
            assert np.lib.format.read_magic(member) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            assert not fortran and not dtype.hasobject
            return np.frombuffer(member.read(), dtype=dtype).reshape(shape)


def test_evaluate_reports_kid_precision_recall_writes_pngs_and_an_adm_npz(workspace, tmp_path, capsys):
    command = f"--evaluate --model_path models/C/ckpt.pt {FAST} --fid_num_samples 12 --data_dir {tmp_path}"
    assert run(f"{command} --save_pngs --save_dir ev_kid", workspace) == 0
    results = read_json(workspace / "ev_kid/evaluation.json")
    assert np.isfinite(results["kid"]["mean"]) and results["kid"]["subset_size"] == 12 and results["kid"]["subsets"] == 100
    assert 0 <= results["precision_recall"]["precision"] <= 1 and results["precision_recall"]["neighborhood"] == 3
    summary = capsys.readouterr().out
    assert summary.count("12 samples") == 3, summary  # FID, KID, precision/recall: each with its sample count
    images = read_like_the_adm_evaluator(workspace / "ev_kid/samples.npz", "arr_0")
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 3)
    assert read_like_the_adm_evaluator(workspace / "ev_kid/samples.npz", "arr_1").tolist() == [i % 10 for i in range(12)]
    pngs = sorted((workspace / "ev_kid/samples").glob("*.png"))
    assert len(pngs) == 12 and np.array_equal(np.asarray(Image.open(pngs[5])), images[5])


def test_unconditional_npz_has_no_labels_for_the_adm_evaluator(workspace):
    assert run(f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_num_samples 4 --save_dir ev_U_adm", workspace) == 0
    with np.load(workspace / "ev_U_adm/samples.npz") as npz:
        assert list(npz.keys())[0] == "arr_0" and "arr_1" not in npz


def test_fid_ref_statistics_replace_the_training_set(workspace, tmp_path):
    """pytorch-fid --save-stats writes np.savez_compressed(path, mu=mu, sigma=sigma); with the training set's own mu
    and sigma the FID is the training-set one, with shifted ones it grows; KID and precision/recall need features."""
    command = f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_num_samples 6 --data_dir {tmp_path}"
    assert run(f"{command} --save_dir ref_0", workspace) == 0
    with np.load(tmp_path / "fid_stats_synthetic_16_random-conv.npz") as stats:
        mu, sigma = stats["mu"], stats["sigma"]
    np.savez_compressed(tmp_path / "same.npz", mu=mu, sigma=sigma)
    np.savez_compressed(tmp_path / "shifted.npz", mu=mu + 1.0, sigma=sigma)
    for name in ("same", "shifted"):
        assert run(f"{command} --fid_ref {tmp_path / name}.npz --save_dir ref_{name}", workspace) == 0
    own, same, shifted = (read_json(workspace / f"ref_{name}/evaluation.json") for name in ("0", "same", "shifted"))
    assert same["fid"] == pytest.approx(own["fid"], rel=1e-9) and shifted["fid"] > own["fid"] + 1.0
    assert same["reference_images"] is None and same["reference_statistics"] == str(tmp_path / "same.npz")
    assert same["kid"] is None and any("mu and sigma only" in note for note in same["notes"])
    np.savez(tmp_path / "wide.npz", mu=np.zeros(10), sigma=np.eye(10))
    assert run(f"{command} --fid_ref {tmp_path / 'wide.npz'} --save_dir ref_wide", workspace) == 2


# --compare_checkpoints


def test_checkpoint_comparison_uses_the_same_noise_in_rows_ordered_by_step(workspace):
    checkpoint = load_checkpoint(workspace / "models/C/ckpt.pt")
    checkpoint["train_state"]["step"] = 10
    save_checkpoint({key: value for key, value in checkpoint.items() if key not in ("format", "format_version")},
                    workspace / "models/C/later.pt")
    command = "--compare_checkpoints models/C/later.pt models/C/ckpt.pt --num_samples 2 --sampler ddim --sampling_steps 2"
    assert run(f"{command} --save_dir compare", workspace) == 0
    assert read_json(workspace / "compare/checkpoint_comparison.json")["training_steps"] == [3, 10]
    with Image.open(workspace / "compare/checkpoint_comparison.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] == 2 * 64, "one row per checkpoint, 16-pixel images shown at 64"
    image_columns = slice(pixels.shape[1] - 2 * 64, None)
    # Identical weights under two step numbers: identical rows, so every row starts from the same noise.
    assert np.array_equal(pixels[:64, image_columns], pixels[64:, image_columns])


# Bad input


@pytest.mark.parametrize(
    "command,message",
    [
        ("--inference --model_path models/C/ckpt.pt --guidance_rescale 1.5", "--guidance_rescale must be between 0 and 1"),
        ("--inference --model_path models/C/ckpt.pt --guidance_interval 3", "--guidance_interval expects LO,HI"),
        ("--inference --model_path models/C/ckpt.pt --guidance_interval 2,1", "0 <= LO < HI"),
        ("--evaluate --model_path models/C/ckpt.pt --fid_num_samples 1", "at least 2"),
        ("--evaluate --model_path models/C/ckpt.pt --guidance_sweep 1,x", "--guidance_sweep expects"),
        ("--inference --model_path models/C/ckpt.pt --guidance_sweep 1,3", "works with --evaluate"),
        ("--evaluate --inference --model_path models/C/ckpt.pt", "choose one of"),
        ('--evaluate --model_path models/C/ckpt.pt --sample_classes "0"', "every class in turn"),
        (f"--evaluate --model_path models/U/ckpt.pt {FAST} --guidance_sweep 1,3", "unconditional"),
        (f"--evaluate --model_path models/C/ckpt.pt {FAST} --sampling_steps 50", "cannot exceed"),
        ("--evaluate --model_path models/missing.pt", "not found"),
        ("--compare_checkpoints models/C/ckpt.pt models/U/ckpt.pt", "not from one run"),
        (f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_ref models/missing_stats.npz", "--fid_ref file not found"),
        (f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_ref models/U/ckpt.pt", "no `mu` and `sigma`"),
        ("--inference --model_path models/U/ckpt.pt --fid_ref stats.npz", "--fid_ref works with --evaluate"),
        ("--inference --model_path models/U/ckpt.pt --sampler ddim --variance fixed_large", "ancestral"),
    ],
)
def test_bad_evaluation_input_gives_one_line_and_touches_nothing(workspace, capsys, command, message):
    before = tree_fingerprint(workspace)
    capsys.readouterr()
    assert run(command, workspace) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert tree_fingerprint(workspace) == before


def test_inception_file_name_is_the_one_torch_fidelity_downloads():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3.rsplit("/", 1)[-1] == INCEPTION_FILE
