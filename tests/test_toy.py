"""2D toy runs (issue 18): the sliced Wasserstein distance, the samplers on an exact 2D predictor, a short moons run,
its resume, --inference and --evaluate of it, and the refusals of flags that do not fit points."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import MOONS, GaussianMixture2DNoise, run_cli, usage_error, weights_equal
from ddpm_checkpoint import load_checkpoint, load_model
from ddpm_config import DataConfig, ModelConfig, RunConfig, SamplingConfig, check_model_fits_data
from ddpm_data import make_points, point_standardisation
from ddpm_diffusion import Diffusion
from ddpm_kinds import PointKind, kind_of_model
from ddpm_points import distance_report, sliced_wasserstein


def test_sliced_wasserstein_is_zero_for_the_same_points_and_measures_a_shift():
    points = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(points, points[torch.randperm(2000)]) == pytest.approx(0.0, abs=1e-12)
    shift = torch.tensor(
        [0.6, -0.8]
    )  # |c| = 1: a projection on theta moves by <c, theta>, whose mean square is |c|^2 / 2
    assert sliced_wasserstein(points, points + shift) == pytest.approx(1 / math.sqrt(2), rel=0.05)
    with pytest.raises(ValueError):
        sliced_wasserstein(points, points[:10])


@pytest.mark.parametrize("name, make", [("moons", "make_moons"), ("circles", "make_circles")])
def test_the_generators_draw_what_scikit_learn_draws(name, make):
    """Our moons and circles (circles: factor 0.5) against scikit-learn's, standardised alike, per class: as close as
    two draws of ours are to each other (scikit-learn spaces its angles evenly, ours are uniform at random)."""
    datasets = pytest.importorskip("sklearn.datasets")
    kwargs = {"factor": 0.5} if name == "circles" else {}
    theirs, their_labels = getattr(datasets, make)(4000, noise=0.05, random_state=0, **kwargs)
    mean, scale = point_standardisation(name)
    theirs = torch.from_numpy(((theirs - mean) / scale).astype(np.float32))
    ours, second = (torch.from_numpy(make_points(name, their_labels, seed)) for seed in (1, 2))
    for k in (0, 1):
        chosen = torch.from_numpy(their_labels == k)
        floor = sliced_wasserstein(ours[chosen], second[chosen])
        assert sliced_wasserstein(ours[chosen], theirs[chosen]) < 2 * floor + 0.01, (name, k)
    other_class = torch.from_numpy(make_points(name, 1 - their_labels, 1))
    assert sliced_wasserstein(other_class[their_labels == 0], theirs[their_labels == 0]) > 0.3, (
        "the classes are told apart"
    )


MIXTURE = [[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]  # outside [-1, 1]: a sampler that clips x_0 there cannot reach it


@pytest.mark.parametrize("sampler, steps", [("ddpm", 100), ("ddim", 50), ("dpm++2m", 20)])
def test_the_samplers_recover_a_2d_gaussian_mixture_from_its_exact_noise_predictor(sampler, steps):
    """With the exact E[eps | x_t] of a 2D mixture, the unclipped samples of each class match that component as
    closely as fresh draws do, and the unconditional samples the mixture (weights 1/3 each, each component's shape);
    clipping x_0 to [-1, 1], or the predictor
    of components half as wide again, is caught."""
    diffusion = Diffusion(100, "linear")
    model = GaussianMixture2DNoise(diffusion, MIXTURE, std=0.2)
    labels = torch.arange(1500) % 3

    def distance(predictor, clip, guidance_scale=1.0, given=labels):
        settings = SamplingConfig(sampler=sampler, steps=steps, guidance_scale=guidance_scale)
        samples = diffusion.sample(
            predictor,
            (1500, 2),
            settings,
            labels=given,
            null_label=3,
            generator=torch.Generator().manual_seed(0),
            clip_denoised=clip,
        )
        return sliced_wasserstein(samples, model.draw(labels, seed=1))

    floor = sliced_wasserstein(model.draw(labels, seed=2), model.draw(labels, seed=1))
    assert distance(model, clip=False) < 2 * floor
    assert distance(model, clip=True) > 5 * floor
    assert distance(GaussianMixture2DNoise(diffusion, MIXTURE, std=0.3), clip=False) > 3 * floor
    unconditional = diffusion.sample(
        model,
        (1500, 2),
        SamplingConfig(sampler=sampler, steps=steps, guidance_scale=1.0),
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    nearest = torch.cdist(unconditional.double(), model.means).argmin(1)
    assert torch.bincount(nearest, minlength=3).div(1500).sub(1 / 3).abs().max() < 0.05, (
        "the mixture's weights, 1/3 each"
    )
    assert sliced_wasserstein(unconditional, model.draw(nearest, seed=1)) < 2 * floor


def test_a_short_moons_run_reaches_its_distance_and_records_it(trained_moons):
    """150 steps at a fixed seed: the samples at w = 1 within 0.16 of the moons (measured 0.119, floor 0.068), every
    epoch in the loss history and the metrics log, per class; the scatter pictures written."""
    history = json.loads((trained_moons / "out_moons/loss_history_moons.json").read_text())
    assert history["steps"] == [126, 150]
    assert len(history["sliced_wasserstein"]) == len(history["sliced_wasserstein_floor"]) == 2
    assert history["sliced_wasserstein"][-1] < 0.16
    assert history["sliced_wasserstein_floor"][-1] < 0.09
    assert set(history["sliced_wasserstein_per_class"][-1]) == {"upper", "lower"}
    epochs = [json.loads(line) for line in (trained_moons / "out_moons/metrics_moons.jsonl").read_text().splitlines()]
    assert [line["sliced_wasserstein"] for line in epochs if line["kind"] == "epoch"] == history["sliced_wasserstein"]
    for picture in (
        "forward_process_moons.png",
        "progression_moons.png",
        "samples_moons_epoch0001.png",
        "samples_moons_epoch0002.png",
    ):
        assert (trained_moons / "out_moons" / picture).stat().st_size > 1000, picture


def test_an_untrained_mlp_is_far_from_the_moons(tmp_path):
    """The bar the trained run clears is not one that any network clears: no steps to speak of, far off."""
    assert run_cli(f"{MOONS} --max_steps 1 --sample_every 0 --run_name m --save_dir out", tmp_path) == 0
    history = json.loads((tmp_path / "out/loss_history_m.json").read_text())
    assert history["sliced_wasserstein"][-1] > 0.3


def test_a_moons_checkpoint_describes_the_mlp_and_samples_the_training_points(trained_moons):
    loaded = load_model(trained_moons / "models/moons/ckpt.pt")
    assert isinstance(kind_of_model(loaded.description), PointKind) and kind_of_model(
        loaded.description
    ).sample_shape == (2,)
    assert loaded.description.model_config == {
        "architecture": "mlp",
        "dim": 2,
        "width": 64,
        "depth": 3,
        "num_classes": 2,
    }
    assert type(loaded.model).__name__ == "MLPDenoiser"
    assert load_model(trained_moons / "models/moons/ckpt.safetensors").description == loaded.description


def test_inference_on_a_moons_run_writes_points_and_pictures(trained_moons, tmp_path):
    model = trained_moons / "models/moons/ckpt.pt"
    assert (
        run_cli(
            f"--inference --model_path {model} --sampler dpm++2m --sampling_steps 20 --num_samples 300 "
            f"--batch_size 300 --save_dir inf",
            tmp_path,
        )
        == 0
    )
    arrays = np.load(tmp_path / "inf/points.npz")
    assert arrays["points"].shape == (300, 2) and arrays["points"].dtype == np.float32
    assert arrays["labels"].tolist() == [i % 2 for i in range(300)]
    assert np.abs(arrays["points"]).max() > 1, "points are not clipped to [-1, 1]"
    record = json.loads((tmp_path / "inf/samples.json").read_text())
    assert record["guidance_scale"] == 1.0, "a 2D model's guidance scale is derived: plain conditional sampling"
    assert record["sliced_wasserstein"] < 0.2 and set(record["sliced_wasserstein_per_class"]) == {"upper", "lower"}
    for picture in ("samples.png", "reverse_process.png", "forward_process.png"):
        assert (tmp_path / "inf" / picture).stat().st_size > 1000, picture
    assert (
        run_cli(
            f"--inference --model_path {model} --sampler dpm++2m --sampling_steps 20 --guidance_scale 1 "
            "--num_samples 300 --batch_size 300 --save_dir again",
            tmp_path,
        )
        == 0
    )
    assert np.array_equal(np.load(tmp_path / "again/points.npz")["points"], arrays["points"]), (
        "the seed and batch size fix the points, and the derived scale is --guidance_scale 1"
    )


def test_evaluate_on_a_moons_run_reports_the_distance_per_guidance_scale(trained_moons, tmp_path, capsys):
    model = trained_moons / "models/moons/ckpt.pt"
    assert (
        run_cli(
            f"--evaluate --model_path {model} --sampler dpm++2m --sampling_steps 10 --guidance_sweep 1,4 "
            "--fid_num_samples 400 --batch_size 400 --save_dir ev",
            tmp_path,
        )
        == 0
    )
    rows = json.loads((tmp_path / "ev/guidance_sweep.json").read_text())
    assert [row["guidance_scale"] for row in rows] == [1.0, 4.0]
    assert rows[0]["sliced_wasserstein"] < rows[1]["sliced_wasserstein"], "strong guidance empties the moon tips"
    assert "fid" not in json.loads((tmp_path / "ev/scale_1/evaluation.json").read_text())
    assert (tmp_path / "ev/guidance_sweep.png").stat().st_size > 1000
    assert "sliced Wasserstein" in capsys.readouterr().out


def test_resume_of_a_moons_run_is_bit_identical_to_a_straight_run(tmp_path):
    """12 steps, stop, resume for 12 more (crossing the epoch end at 15) == 24 steps straight, for the MLP too."""
    fast = f"{MOONS} --batch_size 2048 --warmup_steps 3 --num_samples 100 --sample_every 1 --save_model --save_dir out"
    assert run_cli(f"{fast} --max_steps 24 --run_name straight", tmp_path) == 0
    assert run_cli(f"{fast} --max_steps 12 --run_name split", tmp_path) == 0
    halfway = load_checkpoint(tmp_path / "models/split/ckpt.pt")
    assert run_cli(f"{fast} --max_steps 24 --run_name split --resume", tmp_path) == 0
    straight, resumed = (load_checkpoint(tmp_path / f"models/{name}/ckpt.pt") for name in ("straight", "split"))
    assert resumed["train_state"]["step"] == straight["train_state"]["step"] == 24
    assert weights_equal(straight["model"], resumed["model"]) and weights_equal(straight["ema"], resumed["ema"])
    assert not weights_equal(halfway["model"], resumed["model"])
    history = {
        name: json.loads((tmp_path / f"out/loss_history_{name}.json").read_text()) for name in ("straight", "split")
    }
    assert history["straight"] == history["split"]
    assert history["straight"]["steps"] == [15, 24] and len(history["straight"]["sliced_wasserstein"]) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--dataset synthetic --model_size mlp", "--dataset synthetic needs an image model"),
        ("--dataset moons --model_size tiny", "--dataset moons needs --model_size mlp"),
        ("--dataset moons --model_size mlp --image_size 16", "--image_size: image settings"),
        ("--dataset circles --model_size mlp --channels 3 --base_dim 8", "--channels, --base_dim: image settings"),
    ],
)
def test_flags_that_do_not_fit_the_data_are_refused_in_one_line(tmp_path, capsys, flags, message):
    assert run_cli(f"{flags} --max_steps 1 --save_model", tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "models").exists(), "refused before anything is written"


def test_check_model_fits_data_is_typed_configuration():
    config = RunConfig(data=DataConfig(dataset="swissroll"), model=ModelConfig(preset="mlp"))
    check_model_fits_data(config)
    assert "needs --model_size mlp" in usage_error(
        check_model_fits_data, RunConfig(data=DataConfig(dataset="gaussians"))
    )


def test_the_distance_report_has_a_class_each_for_conditional_samples_and_none_for_one_class():
    labels = torch.arange(800) % 8
    report = distance_report(torch.from_numpy(make_points("gaussians", labels.numpy(), 5)), labels, "gaussians")
    assert len(report["sliced_wasserstein_per_class"]) == 8
    assert report["sliced_wasserstein"] < 2 * report["sliced_wasserstein_floor"]
    swiss = distance_report(
        torch.from_numpy(make_points("swissroll", np.zeros(500, dtype=np.int64), 5)), None, "swissroll"
    )
    assert "sliced_wasserstein_per_class" not in swiss
