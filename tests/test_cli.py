"""The command line end to end on CPU: tiny models trained for a few steps on the synthetic data."""
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_main
from conftest import REPO, run_cli as run, write_grey_folder
from ddpm_checkpoint import load_checkpoint

TINY = "--dataset synthetic --image_size 16 --model_size tiny --timesteps 20 --batch_size 16 --warmup_steps 1 --log_interval 1 --num_samples 4"


def tree_fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory with one unconditional (U) and one conditional (C) tiny run, trained for 3 steps."""
    root = tmp_path_factory.mktemp("cli")
    assert run(f"{TINY} --max_steps 3 --save_model --run_name U --save_dir out_U", root) == 0
    assert run(f"{TINY} --max_steps 3 --save_model --run_name C --save_dir out_C --conditional --p_uncond 0.2 --lr 0.003", root) == 0
    return root


def test_training_writes_checkpoint_history_metrics_and_images(workspace):
    checkpoint = load_checkpoint(workspace / "models/U/ckpt.pt")
    assert checkpoint["conditional"] is False
    assert checkpoint["diffusion"] == {"timesteps": 20, "schedule": "linear", "prediction_type": "v", "variance": "fixed_small"}
    assert checkpoint["data"]["image_size"] == 16 and checkpoint["data"]["channels"] == 3
    assert checkpoint["train_state"]["step"] == 3
    history = json.loads((workspace / "out_U/loss_history_U.json").read_text())
    assert set(history) >= {"train_loss", "val_loss", "test_loss", "epochs"}
    assert (history["epochs"], history["steps"]) == ([0], [3]), "a partial epoch cut by --max_steps gets its entry"
    assert all(np.isfinite(history[key][0]) for key in ("train_loss", "val_loss", "test_loss"))
    assert history["eval_examples"] == [363], "1.5 x 5% of an epoch of 303 steps x 16 images, per split"
    [full] = history["full"]
    assert (full["step"], full["at"]) == (3, "end") and np.isfinite(full["val_loss"]) and full["val_loss"] != history["val_loss"][0]
    lines = (workspace / "out_U/metrics_U.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["step", "step", "step", "epoch", "end"]
    assert (workspace / "out_U/loss_curve_U.png").stat().st_size > 0
    assert list((workspace / "out_U").glob("samples_U_epoch*.png")), "a sample grid at the end of training"


def test_conditional_checkpoint_knows_its_classes(workspace):
    checkpoint = load_checkpoint(workspace / "models/C/ckpt.pt")
    assert checkpoint["conditional"] is True
    assert len(checkpoint["data"]["class_names"]) == 10
    assert checkpoint["model_config"]["num_classes"] == 10


def test_validation_loss_is_deterministic_for_fixed_weights(workspace):
    """Two evaluations of the same weights give the same number, so loss curves compare across epochs."""
    from ddpm_diffusion import Diffusion
    from ddpm_data import load_datasets
    from ddpm_model import UNet
    from ddpm_runtime import Runtime
    from ddpm_evaluate import evaluation_loss as evaluate

    checkpoint = load_checkpoint(workspace / "models/C/ckpt.pt")
    model = UNet(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["ema"])
    data = load_datasets("synthetic", "unused", 16)
    diffusion = Diffusion(20)
    first = evaluate(model, diffusion, data.val, Runtime(torch.device("cpu")), seed=5, batch_size=32, loss_type="l2")
    torch.manual_seed(123)
    second = evaluate(model, diffusion, data.val, Runtime(torch.device("cpu")), seed=5, batch_size=7, loss_type="l2")
    assert first == pytest.approx(second, rel=1e-6)


def test_inference_unconditional_writes_grid_pngs_and_npz(workspace):
    assert run("--inference --model_path models/U/ckpt.pt --num_samples 5 --save_dir inf_U --sampler ddim --sampling_steps 5", workspace) == 0
    out = workspace / "inf_U"
    assert (out / "grid.png").exists()
    assert len(list((out / "samples").glob("*.png"))) == 5
    npz = np.load(out / "samples.npz")
    assert npz["images"].dtype == np.uint8 and npz["images"].shape == (5, 16, 16, 3)
    assert npz["labels"].tolist() == [-1] * 5


def test_inference_repeats_classes_in_order_and_accepts_names(workspace):
    assert run('--inference --conditional --model_path models/C/ckpt.pt --num_samples 5 --sample_classes "0,1,2" --save_dir inf_C --sampling_steps 5 --sampler ddim', workspace) == 0
    assert np.load(workspace / "inf_C/samples.npz")["labels"].tolist() == [0, 1, 2, 0, 1]
    names = load_checkpoint(workspace / "models/C/ckpt.pt")["data"]["class_names"]
    assert run(f'--inference --model_path models/C/ckpt.pt --num_samples 2 --sample_classes "{names[3]},{names[7]}" --save_dir inf_names --sampling_steps 5', workspace) == 0
    assert np.load(workspace / "inf_names/samples.npz")["labels"].tolist() == [3, 7]


def test_conditional_inference_without_classes_cycles_through_all(workspace):
    assert run("--inference --model_path models/C/ckpt.pt --num_samples 12 --save_dir inf_all --sampling_steps 3 --sampler ddim", workspace) == 0
    assert np.load(workspace / "inf_all/samples.npz")["labels"].tolist() == list(range(10)) + [0, 1]


def test_same_seed_same_images_other_seed_other_images(workspace):
    common = "--inference --model_path models/C/ckpt.pt --num_samples 3 --guidance_scale 2 --sampling_steps 5"
    assert run(f"{common} --seed 1 --save_dir s1", workspace) == 0
    assert run(f"{common} --seed 1 --save_dir s1b", workspace) == 0
    assert run(f"{common} --seed 2 --save_dir s2", workspace) == 0
    first, again, other = (np.load(workspace / name / "samples.npz")["images"] for name in ("s1", "s1b", "s2"))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


class RunsCode:
    """Unpickling this would call os.system; torch.load(weights_only=True) must refuse it, and the tool must say
    that the file is unsafe (not that it is corrupt)."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


@pytest.mark.parametrize(
    "command,message",
    [
        ('--inference --model_path models/C/ckpt.pt --sample_classes "0,10"', "out of range"),
        ('--inference --model_path models/C/ckpt.pt --sample_classes "unicorn"', "unknown class"),
        ('--inference --model_path models/C/ckpt.pt --sample_classes ","', "empty"),
        ('--inference --model_path models/U/ckpt.pt --sample_classes "0"', "unconditional"),
        ("--inference --conditional --model_path models/U/ckpt.pt", "unconditional"),
        ("--inference --model_path models/missing.pt", "not found"),
        ("--inference --model_path truncated.pt", "truncated or corrupt"),
        ("--inference --model_path foreign.pt", "not a checkpoint written by this tool"),
        ("--inference --model_path models/C/ckpt.pt --num_samples 0", "--num_samples must be positive"),
        ("--inference --model_path models/C/ckpt.pt --guidance_scale nan", "finite"),
        ("--inference --model_path models/C/ckpt.pt --guidance_scale inf", "finite"),
        ("--inference --model_path models/C/ckpt.pt --sampling_steps 500", "cannot exceed"),
        (f"{TINY} --batch_size 0", "--batch_size must be positive"),
        (f"{TINY} --epochs 0", "--epochs must be positive"),
        (f"{TINY} --epochs -3", "--epochs must be positive"),
        (f"{TINY} --p_uncond 1.5", "--p_uncond must be between 0 and 1"),
        (f"{TINY} --timesteps 5", "at least 10"),
        (f"{TINY} --run_name U --save_model --save_dir out_U", "exists: pass --resume"),
        ("--dataset folder --data_dir empty_dir --model_size tiny", "empty_dir"),
        ("--dataset synthetic --model_size ddpm --image_size 20", "does not fit"),
        (f"{TINY} --save_model --run_name ../../escaped", "--run_name must be a plain name"),
        (f"{TINY} --save_model --run_name a/b", "--run_name must be a plain name"),
        (f"{TINY} --save_model --run_name ..", "--run_name must be a plain name"),
        ("--inference --model_path unsafe.pt", "refusing to load it"),
    ],
)
def test_bad_input_gives_one_line_and_touches_nothing(workspace, capsys, command, message):
    (workspace / "truncated.pt").write_bytes((workspace / "models/C/ckpt.pt").read_bytes()[:2000])
    torch.save({"weights": torch.zeros(2)}, workspace / "foreign.pt")
    torch.save({"format": "ddpm-checkpoint", "payload": RunsCode()}, workspace / "unsafe.pt")
    (workspace / "empty_dir").mkdir(exist_ok=True)
    before = tree_fingerprint(workspace)
    capsys.readouterr()
    assert run(command, workspace) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("error: ")
    assert tree_fingerprint(workspace) == before


def test_a_real_process_reports_bad_input_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "ddpm_main.py"), "--inference", "--model_path", "nowhere.pt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: checkpoint not found: nowhere.pt"


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_shortest_chain_trains_and_samples_without_nan(tmp_path, schedule):
    args = "--dataset synthetic --image_size 16 --model_size tiny --batch_size 8 --warmup_steps 1 --num_samples 2 --sample_every 1"
    assert run(f"{args} --timesteps 10 --schedule {schedule} --max_steps 2 --save_model --run_name N --lr 0.003", tmp_path) == 0
    history = json.loads((tmp_path / "outputs/loss_history_N.json").read_text())
    assert np.isfinite(history["train_loss"] + history["val_loss"] + history["test_loss"]).all()
    assert run("--inference --model_path models/N/ckpt.pt --num_samples 2 --save_dir inf", tmp_path) == 0
    assert np.load(tmp_path / "inf/samples.npz")["images"].shape == (2, 16, 16, 3)


def test_readme_commands_parse():
    """Every `python ddpm_main.py ...` line of the README uses flags the parser knows."""
    parser = ddpm_main.build_parser()
    commands = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.strip().startswith("python ddpm_main.py")]
    assert len(commands) >= 5
    for command in commands:
        parser.parse_args(shlex.split(command)[2:])


def test_a_grey_folder_trains_a_one_channel_model_that_writes_grey_pngs(tmp_path, capsys):
    write_grey_folder(tmp_path / "grey", "split")
    assert run("--dataset folder --data_dir grey --image_size 8 --model_size tiny --timesteps 20 --batch_size 4 --max_steps 2 "
               "--conditional --save_model --run_name G --save_dir out_G", tmp_path) == 0
    out = capsys.readouterr().out
    assert "7 train / 1 val / 4 test images of 1x8x8" in out and "random flips: off" in out
    checkpoint = load_checkpoint(tmp_path / "models/G/ckpt.pt")
    assert checkpoint["data"]["channels"] == 1 and checkpoint["model_config"]["in_channels"] == 1
    assert run("--inference --model_path models/G/ckpt.pt --num_samples 2 --sampler ddim --sampling_steps 3 --save_dir inf_G", tmp_path) == 0
    from PIL import Image

    with Image.open(tmp_path / "inf_G/samples/00000.png") as image:
        assert image.mode == "L" and image.size == (8, 8)
    assert np.load(tmp_path / "inf_G/samples.npz")["images"].shape == (2, 8, 8, 1)
    assert run("--dataset folder --data_dir grey --image_size 8 --model_size tiny --timesteps 20 --batch_size 4 --max_steps 3 "
               "--conditional --save_model --run_name G --save_dir out_G --resume --channels 3", tmp_path) == 2
    assert "add --channels 1" in capsys.readouterr().err


def test_readme_python_example_samples_what_inference_writes(workspace, capsys):
    """The README's Python block, run on the conditional workspace model, gives the pixels of --inference."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0].replace("models/synthetic_tiny/ckpt.pt", str(workspace / "models/C/ckpt.pt"))
    namespace = {}
    exec(block, namespace)
    assert run("--inference --model_path models/C/ckpt.pt --num_samples 8 --batch_size 8 --sampler dpm++2m --sampling_steps 20 "
               "--guidance_scale 3 --save_dir readme_inf --device cpu", workspace) == 0
    assert np.array_equal(namespace["images"].numpy(), np.load(workspace / "readme_inf/samples.npz")["images"])


def test_guidance_sweep_script_makes_one_labelled_image(workspace):
    """The script runs the interpreter named by PYTHON, here the one running the tests; a `python` first on PATH
    that is not it (as from a virtual environment that is not activated) must not be used."""
    script = REPO / "scripts/guidance_sweep.sh"
    decoy = workspace / "decoy_bin"
    decoy.mkdir(exist_ok=True)
    (decoy / "python").write_text("#!/bin/sh\necho 'the decoy python ran' >&2\nexit 97\n")
    (decoy / "python").chmod(0o755)
    env = {**os.environ, "NUM_SAMPLES": "3", "PYTHON": sys.executable, "PATH": f"{decoy}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(script), "models/C/ckpt.pt", "2", "0 3", "sweep", "--sampler", "ddim", "--sampling_steps", "3", "--no_ema"],
        cwd=workspace, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    with Image.open(workspace / "sweep/guidance_sweep.png") as image:
        assert image.height == 2 * 64 and image.width > 3 * 64, "16-pixel images shown 4x: at least 64 px wide"
    unguided = np.load(workspace / "sweep/scale_0/samples.npz")
    guided = np.load(workspace / "sweep/scale_3/samples.npz")
    assert unguided["labels"].tolist() == guided["labels"].tolist() == [2, 2, 2]
    assert not np.array_equal(unguided["images"], guided["images"])


def test_every_checkpoint_has_its_sampling_weights_as_safetensors(workspace):
    """ckpt.safetensors: the EMA weights and the model's description, a fraction of ckpt.pt, sampling the same images."""
    weights, full = workspace / "models/C/ckpt.safetensors", workspace / "models/C/ckpt.pt"
    assert weights.stat().st_size < full.stat().st_size / 2
    from_weights, from_full = load_checkpoint(weights), load_checkpoint(full)
    assert all(torch.equal(from_weights["ema"][key], value) for key, value in from_full["ema"].items())
    for name, path in (("w", weights), ("f", full)):
        assert run(f"--inference --model_path {path.relative_to(workspace)} --num_samples 2 --sampler ddim --sampling_steps 2 --save_dir st_{name}", workspace) == 0
    assert np.array_equal(np.load(workspace / "st_w/samples.npz")["arr_0"], np.load(workspace / "st_f/samples.npz")["arr_0"])


def test_tensorboard_logger_writes_losses_lr_throughput_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(f"{TINY} --max_steps 2 --logger tensorboard --run_name tb --save_dir out_tb", tmp_path) == 0
    events = EventAccumulator(str(tmp_path / "out_tb/tensorboard/tb"), size_guidance={"images": 0}).Reload()
    assert {"step/train_loss", "step/lr", "step/images_per_s", "epoch/val_loss", "epoch/test_loss"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("step/train_loss")] == [1, 2]
    assert events.Tags()["images"] == ["samples"]
    assert (tmp_path / "out_tb/metrics_tb.jsonl").is_file(), "the JSON lines are still written"
