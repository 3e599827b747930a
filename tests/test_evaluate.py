"""ddpm_evaluate: --evaluate / --guidance_sweep / --compare_checkpoints end to end on tiny models with small feature
extractors (random-conv, or a test extractor with logits), and the evaluation loss that training logs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_judge
import ddpm_metrics
from conftest import run_cli as run
from conftest import tree_fingerprint, write_random_checkpoint
from ddpm_checkpoint import load_checkpoint, save_checkpoint
from ddpm_data import load_datasets
from ddpm_diffusion import Diffusion
from ddpm_evaluate import evaluation_loss
from ddpm_judge import judge_path
from ddpm_metrics import FEATURE_EXTRACTORS, RandomConvFeatures
from ddpm_model import UNet
from ddpm_runtime import Runtime
from ddpm_train import EVAL_SEEDS

FAST = "--fid_features random-conv --sampler ddim --sampling_steps 2 --no_judge"  # the judge has its own tests


@pytest.fixture(scope="module")
def random_models(tmp_path_factory) -> Path:
    """An unconditional (models/U/ckpt.pt) and a conditional (models/C/ckpt.pt) tiny model with random weights, to
    read."""
    root = tmp_path_factory.mktemp("evaluate")
    write_random_checkpoint(root / "models/U/ckpt.pt", conditional=False)
    write_random_checkpoint(root / "models/C/ckpt.pt", conditional=True)
    return root


@pytest.fixture
def workspace(random_models, tmp_path) -> Path:
    """This test's own copy of random_models, to write into (results, the reference statistics cache, extra
    checkpoints)."""
    return Path(shutil.copytree(random_models, tmp_path / "workspace"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_evaluate_writes_results_json_samples_npz_and_grid(workspace):
    assert (
        run(
            f"--evaluate --model_path models/C/ckpt.pt {FAST} --fid_num_samples 10 --guidance_scale 2 --save_dir ev_C",
            workspace,
        )
        == 0
    )
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
    monkeypatch.setattr(
        ddpm_metrics, "load_datasets", lambda *args, **kwargs: pytest.fail("the data set was loaded again")
    )
    assert run(f"{command} --save_dir cache_2", workspace) == 0
    np.savez(cache, mu=mu, sigma=sigma, num_images=count)
    first, second = (read_json(workspace / name / "evaluation.json")["fid"] for name in ("cache_1", "cache_2"))
    assert second > first + 1.0


def test_evaluate_draws_the_same_images_as_inference_for_the_same_seed(workspace):
    common = "--model_path models/C/ckpt.pt --sampler ddim --sampling_steps 2 --guidance_scale 2 --seed 4"
    assert (
        run(
            f"--evaluate {common} --fid_features random-conv --fid_num_samples 3 --no_judge --save_dir same_ev",
            workspace,
        )
        == 0
    )
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
    common = (
        "--inference --model_path models/C/ckpt.pt --sampler ddim --sampling_steps 2 --guidance_scale 2 --num_samples 4"
    )
    assert run(f"{common} --amp bf16 --save_dir amp_bf16", workspace) == 0
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    seen.clear()
    assert run(f"{common} --amp none --save_dir amp_none", workspace) == 0
    assert seen and all(not enabled and dtype == torch.float32 for enabled, dtype in seen)
    bf16, fp32 = (np.load(workspace / name / "samples.npz")["images"].astype(int) for name in ("amp_bf16", "amp_none"))
    assert 0 < np.abs(bf16 - fp32).mean() < 8
    assert read_json(workspace / "amp_bf16/samples.json")["network_autocast"] == "torch.bfloat16"


@pytest.mark.parametrize(
    "mode",
    [
        "--inference --num_samples 2",
        "--evaluate --fid_num_samples 2 --fid_features random-conv",
        "--compare_checkpoints models/C/ckpt.pt models/C/ckpt.pt --num_samples 2",
    ],
)
def test_compile_flag_compiles_the_sampling_network(workspace, monkeypatch, mode):
    """--compile reaches every sampling mode (torch.compile itself is stubbed: compiling takes minutes on this CPU)."""
    compiled = []
    monkeypatch.setattr(UNet, "compile", lambda self, *args, **kwargs: compiled.append(self.training))
    model = "" if mode.startswith("--compare") else "--model_path models/C/ckpt.pt"
    assert (
        run(f"{mode} {model} --sampler ddim --sampling_steps 2 --compile --no_judge --save_dir compiled", workspace)
        == 0
    )
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
    command = (
        "--evaluate --model_path models/C/ckpt.pt --fid_features with-logits --sampler ddim --sampling_steps 2 "
        "--no_judge"
    )
    assert run(f"{command} --fid_num_samples 10 --guidance_sweep 0,4 --save_dir sweep", workspace) == 0
    rows = read_json(workspace / "sweep/guidance_sweep.json")
    assert [row["guidance_scale"] for row in rows] == [0.0, 4.0]
    assert all(np.isfinite(row["fid"]) and row["inception_score"] is not None for row in rows)  # logits give an IS
    assert rows[0]["fid"] != rows[1]["fid"]
    assert (
        "| guidance_scale | num_samples | fid | inception_score | class_consistency |"
        in (workspace / "sweep/guidance_sweep.md").read_text()
    )
    assert (workspace / "sweep/guidance_sweep.png").stat().st_size > 0
    unguided, guided = (np.load(workspace / f"sweep/scale_{w}/samples.npz") for w in (0, 4))
    assert np.array_equal(unguided["labels"], guided["labels"]) and not np.array_equal(
        unguided["images"], guided["images"]
    )
    names = load_checkpoint(workspace / "models/C/ckpt.pt")["data"]["class_names"]
    grids = sorted((workspace / "sweep").glob("guidance_class*.png"))
    assert len(grids) == len(names)
    with Image.open(workspace / f"sweep/guidance_class3_{names[3]}.png") as grid:
        assert grid.height == 2 * 64  # one row per scale, 16-pixel images shown at 64


def read_like_the_adm_evaluator(path: Path, name: str) -> np.ndarray:
    """guided-diffusion's evaluations/evaluator.py opens `name`.npy inside the .npz as a zip member and streams it
    after reading its header (open_npz_array, StreamingNpzArrayReader); a missing key is its `missing arr_0 in npz
    file`."""
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
    assert (
        np.isfinite(results["kid"]["mean"]) and results["kid"]["subset_size"] == 12 and results["kid"]["subsets"] == 100
    )
    assert 0 <= results["precision_recall"]["precision"] <= 1 and results["precision_recall"]["neighborhood"] == 3
    summary = capsys.readouterr().out
    assert summary.count("12 samples") == 3, summary  # FID, KID, precision/recall: each with its sample count
    images = read_like_the_adm_evaluator(workspace / "ev_kid/samples.npz", "arr_0")
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 3)
    assert read_like_the_adm_evaluator(workspace / "ev_kid/samples.npz", "arr_1").tolist() == [
        i % 10 for i in range(12)
    ]
    pngs = sorted((workspace / "ev_kid/samples").glob("*.png"))
    assert len(pngs) == 12 and np.array_equal(np.asarray(Image.open(pngs[5])), images[5])


def test_unconditional_npz_has_no_labels_for_the_adm_evaluator(workspace):
    assert (
        run(f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_num_samples 4 --save_dir ev_U_adm", workspace) == 0
    )
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


def test_checkpoint_comparison_uses_the_same_noise_in_rows_ordered_by_step(workspace):
    checkpoint = load_checkpoint(workspace / "models/C/ckpt.pt")
    checkpoint["train_state"]["step"] = 10
    save_checkpoint(
        {key: value for key, value in checkpoint.items() if key not in ("format", "format_version")},
        workspace / "models/C/later.pt",
    )
    command = (
        "--compare_checkpoints models/C/later.pt models/C/ckpt.pt --num_samples 2 --sampler ddim --sampling_steps 2 "
        "--no_judge"
    )
    assert run(f"{command} --save_dir compare", workspace) == 0
    assert read_json(workspace / "compare/checkpoint_comparison.json")["training_steps"] == [3, 10]
    with Image.open(workspace / "compare/checkpoint_comparison.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] == 2 * 64, "one row per checkpoint, 16-pixel images shown at 64"
    image_columns = slice(pixels.shape[1] - 2 * 64, None)
    # Identical weights under two step numbers: identical rows, so every row starts from the same noise.
    assert np.array_equal(pixels[:64, image_columns], pixels[64:, image_columns])


@pytest.mark.parametrize(
    "command,message",
    [
        (
            "--inference --model_path models/C/ckpt.pt --guidance_rescale 1.5",
            "--guidance_rescale must be between 0 and 1",
        ),
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
        (
            f"--evaluate --model_path models/U/ckpt.pt {FAST} --fid_ref models/missing_stats.npz",
            "--fid_ref file not found",
        ),
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


# The evaluation loss, and the validation loss a training run logs


def test_validation_loss_is_deterministic_for_fixed_weights(trained_runs):
    """Two evaluations of the same weights give the same number, whatever the batch size and the global random state, so
    loss curves compare across epochs; and it is the number the run logged: the loss history's val_loss is the loss of
    the checkpoint's (EMA) weights, under the run's own objective (v prediction, min-SNR-5: the checkpoint's "diffusion"
    and its configuration's snr_gamma), on the first `eval_examples` examples of the validation split with
    EVAL_SEEDS["val"]; its `full` entry is the same on the whole split."""
    checkpoint = load_checkpoint(trained_runs / "models/C/ckpt.pt")
    model = UNet(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["ema"])
    data = load_datasets("synthetic", "unused", 16)
    diffusion = Diffusion(**checkpoint["diffusion"], snr_gamma=checkpoint["config"]["diffusion"]["snr_gamma"])
    assert (diffusion.prediction_type, diffusion.snr_gamma) == ("v", 5.0), (
        "the objective of new runs, which this one is"
    )
    history = json.loads((trained_runs / "out_C/loss_history_C.json").read_text())
    [count] = history["eval_examples"]
    assert count < len(data.val), "a subset: the count matters"
    cpu = Runtime(torch.device("cpu"))

    def evaluate(batch_size, count):
        return evaluation_loss(
            model, diffusion, data.val, cpu, seed=EVAL_SEEDS["val"], batch_size=batch_size, loss_type="l2", count=count
        )

    first = evaluate(32, count)
    torch.manual_seed(123)
    second = evaluate(7, count)
    assert first == pytest.approx(second, rel=1e-6)
    assert history["val_loss"][0] == pytest.approx(first, rel=1e-6)
    [full] = history["full"]
    assert full["val_loss"] == pytest.approx(evaluate(16, None), rel=1e-6)


# The judge (ddpm_judge) in --evaluate --guidance_sweep and --compare_checkpoints, on a tiny run of the real digits

DIGITS_RUN = (
    "--dataset folder --data_dir digits --image_size 16 --model_size tiny --timesteps 20 --batch_size 16 "
    "--warmup_steps 1 --max_steps 3 --sample_every 0 --conditional --save_model --run_name D --save_dir out_D"
)


def test_guidance_sweep_and_comparison_report_the_judge_of_each_scale_and_checkpoint(
    digits_workspace, digits_judge, monkeypatch, capsys
):
    root, judge = digits_workspace.parent, digits_judge[1]
    assert run(DIGITS_RUN, root) == 0
    monkeypatch.setattr(
        ddpm_judge, "train_judge", lambda *args, **kwargs: pytest.fail("the cached judge was trained again")
    )
    capsys.readouterr()
    common = "--data_dir digits --sampler ddim --sampling_steps 2"
    assert (
        run(
            f"--evaluate --model_path models/D/ckpt.pt {common} --fid_features random-conv --fid_num_samples 20 "
            "--guidance_sweep 1,3 --save_dir sweep",
            root,
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = read_json(root / "sweep/guidance_sweep.json")
    for row in rows:
        results = read_json(root / f"sweep/scale_{row['guidance_scale']:g}/evaluation.json")
        with np.load(root / f"sweep/scale_{row['guidance_scale']:g}/samples.npz") as samples:
            expected = judge.figures(samples["images"], samples["labels"])  # the figures are of these very samples
        assert results["judge"] == {**expected, "cache": str(judge_path("digits", "folder", 16, 1, 0))}
        assert (row["judge_class_accuracy"], row["judge_distance"], row["judge_floor"]) == (
            expected["class_accuracy"],
            expected["distance"],
            expected["floor"],
        )
        assert row["judge_test_accuracy"] == judge.test_accuracy
        assert results["class_consistency"] is None and not any("no classifier" in note for note in results["notes"])
        assert (
            f"judge class accuracy {expected['class_accuracy']:.3f}, distance {expected['distance']:.3f} (floor "
            f"{expected['floor']:.3f}) on 20 samples (its test accuracy {judge.test_accuracy:.3f}: the ceiling)"
            in printed
        )
    assert rows[0]["judge_distance"] != rows[1]["judge_distance"]
    assert (
        "| judge_class_accuracy | judge_distance | judge_floor | judge_test_accuracy |"
        in (root / "sweep/guidance_sweep.md").read_text()
    )
    assert (
        run(f"--compare_checkpoints models/D/ckpt.pt models/D/ckpt.pt --num_samples 10 {common} --save_dir cmp", root)
        == 0
    )
    compared = read_json(root / "cmp/checkpoint_comparison.json")["judge"]
    assert len(compared) == 2 and compared[0] == compared[1] and compared[0]["num_samples"] == 10
    assert capsys.readouterr().out.count("step 3: judge class accuracy") == 2
