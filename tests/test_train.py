"""ddpm_train: what a run writes, and training that survives real runs: exact resume, signals, crashes, non-finite
losses, EMA, accumulation. The optimizer, LR schedule and EMA themselves are in test_optim.py."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_diffusion
from conftest import REPO, run_cli, weights_equal
from ddpm_checkpoint import load_checkpoint, save_checkpoint
from ddpm_config import GUIDANCE_SCALE, SamplingConfig
from ddpm_runtime import EXIT_PREEMPTED

# 4,860 synthetic training images at batch 256: 18 steps per epoch.
FAST = (
    "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --batch_size 256 --warmup_steps 3 "
    "--log_interval 1 --num_samples 4 --sampler ddim --sampling_steps 4 --dropout 0.1 --lr 2e-3 --ema_decay 0.99"
)


def test_training_writes_checkpoint_history_metrics_and_images(trained_runs):
    checkpoint = load_checkpoint(trained_runs / "models/U/ckpt.pt")
    assert checkpoint["conditional"] is False
    assert checkpoint["diffusion"] == {
        "timesteps": 20,
        "schedule": "linear",
        "prediction_type": "v",
        "variance": "fixed_small",
    }
    assert checkpoint["data"]["image_size"] == 16 and checkpoint["data"]["channels"] == 3
    assert checkpoint["train_state"]["step"] == 3
    history = json.loads((trained_runs / "out_U/loss_history_U.json").read_text())
    assert set(history) >= {"train_loss", "val_loss", "test_loss", "epochs"}
    assert (history["epochs"], history["steps"]) == ([0], [3]), "a partial epoch cut by --max_steps gets its entry"
    assert all(np.isfinite(history[key][0]) for key in ("train_loss", "val_loss", "test_loss"))
    assert history["eval_examples"] == [363], "1.5 x 5% of an epoch of 303 steps x 16 images, per split"
    [full] = history["full"]
    assert (
        (full["step"], full["at"]) == (3, "end")
        and np.isfinite(full["val_loss"])
        and full["val_loss"] != history["val_loss"][0]
    )
    lines = (trained_runs / "out_U/metrics_U.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["step", "step", "step", "epoch", "end"]
    assert (trained_runs / "out_U/loss_curve_U.png").stat().st_size > 0
    assert list((trained_runs / "out_U").glob("samples_U_epoch*.png")), "a sample grid at the end of training"


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    """12 steps, stop, resume for 12 more (crossing the epoch end at 18) == 24 steps straight."""
    assert (
        run_cli(
            f"{FAST} --conditional --max_steps 24 --eval_every 1 --save_model --run_name straight --save_dir out",
            tmp_path,
        )
        == 0
    )
    assert (
        run_cli(
            f"{FAST} --conditional --max_steps 12 --eval_every 1 --save_model --run_name split --save_dir out", tmp_path
        )
        == 0
    )
    halfway = load_checkpoint(tmp_path / "models/split/ckpt.pt")
    assert halfway["train_state"]["step"] == 12
    assert (
        run_cli(
            f"{FAST} --conditional --max_steps 24 --eval_every 1 --save_model --run_name split --save_dir out --resume",
            tmp_path,
        )
        == 0
    )

    straight = load_checkpoint(tmp_path / "models/straight/ckpt.pt")
    resumed = load_checkpoint(tmp_path / "models/split/ckpt.pt")
    assert resumed["train_state"]["step"] == straight["train_state"]["step"] == 24
    assert weights_equal(straight["model"], resumed["model"])
    assert weights_equal(straight["ema"], resumed["ema"])
    assert not weights_equal(halfway["model"], resumed["model"])
    history = {
        name: json.loads((tmp_path / f"out/loss_history_{name}.json").read_text()) for name in ("straight", "split")
    }
    assert history["straight"] == history["split"]
    straight = history["straight"]
    assert (straight["epochs"], straight["steps"]) == ([0, 1], [18, 24]), "one entry per epoch, the last one cut short"
    assert all(math.isfinite(straight[key][i]) for key in ("train_loss", "val_loss", "test_loss") for i in (0, 1))
    assert [(entry["step"], entry["at"]) for entry in straight["full"]] == [(18, "every"), (24, "end")]


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    assert run_cli(f"{FAST} --max_steps 2 --save_model --run_name R", tmp_path) == 0
    checkpoint = load_checkpoint(tmp_path / "models/R/ckpt.pt")
    for key in (
        "model",
        "ema",
        "optimizer",
        "lr_scheduler",
        "scaler",
        "train_state",
        "config",
        "rng",
        "model_config",
        "diffusion",
        "data",
    ):
        assert checkpoint[key] is not None, key
    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch"}
    assert checkpoint["train_state"]["history"]["train_loss"]
    config = checkpoint["config"]
    assert config["version"] == 2 and set(config) == {"version", "data", "model", "diffusion", "train", "sampling"}
    assert config["train"]["lr"] == 2e-3 and config["model"]["preset"] == "tiny" and config["sampling"]["steps"] == 4
    flat = {name for section in config.values() if isinstance(section, dict) for name in section}
    assert not flat & {"device", "world_size", "data_on_device", "model_config", "inference"}, (
        "run-time facts are not configuration"
    )
    assert checkpoint["runtime"] == {"world_size": 1, "global_batch": 256}


V1_CHECKPOINT = REPO / "tests/data/checkpoint_v1_tiny.pt"


def test_a_checkpoint_of_the_first_format_still_samples_the_same_images_and_resumes(tmp_path):
    """tests/data/checkpoint_v1_tiny.pt was written by the tool before typed configuration (its "config" is the flat
    flags), by `--dataset synthetic --image_size 8 --model_size tiny --base_dim 8 --conditional --max_steps 3
    --batch_size 16 --warmup_steps 2 --sample_every 0 --save_model --run_name v1`; the .npz beside it holds what
    `--inference --num_samples 4 --sampler ddim --sampling_steps 10 --guidance_scale 2` gave then."""
    old = load_checkpoint(V1_CHECKPOINT)
    assert "version" not in old["config"] and old["config"]["world_size"] == 1
    assert (
        run_cli(
            f"--inference --model_path {V1_CHECKPOINT} --num_samples 4 --sampler ddim --sampling_steps 10 "
            "--guidance_scale 2 --save_dir inf --device cpu",
            tmp_path,
        )
        == 0
    )
    expected = np.load(REPO / "tests/data/checkpoint_v1_tiny_ddim10.npz")
    now = np.load(tmp_path / "inf/samples.npz")
    assert np.array_equal(now["images"], expected["images"]) and np.array_equal(now["labels"], expected["labels"])

    run_dir = tmp_path / "models/v1"
    run_dir.mkdir(parents=True)
    (run_dir / "ckpt.pt").write_bytes(V1_CHECKPOINT.read_bytes())
    resume = (
        "--dataset synthetic --image_size 8 --model_size tiny --base_dim 8 --conditional --batch_size 16 "
        "--warmup_steps 2 --sample_every 0 --save_model --run_name v1 --resume --device cpu"
    )
    assert run_cli(f"{resume} --model_size small", tmp_path) == 2, "the old format's fixed flags are still checked"
    assert run_cli(f"{resume} --max_steps 5", tmp_path) == 0
    resumed = load_checkpoint(run_dir / "ckpt.pt")
    assert resumed["train_state"]["step"] == 5 and resumed["config"]["version"] == 2
    assert resumed["ema_num_updates"] == 5
    assert (resumed["config"]["diffusion"]["prediction_type"], resumed["config"]["diffusion"]["snr_gamma"]) == (
        "eps",
        0.0,
    ), "a resumed run keeps its own objective, not the new runs' default"
    assert run_cli(f"{resume} --max_steps 6 --prediction_type v", tmp_path) == 2, "and refuses another prediction type"


@pytest.fixture(scope="module")
def one_step_template(tmp_path_factory) -> Path:
    """`{FAST} --max_steps 1 --save_model --run_name R`, trained once for the tests that resume it."""
    root = tmp_path_factory.mktemp("one_step")
    assert run_cli(f"{FAST} --max_steps 1 --save_model --run_name R", root) == 0
    return root


@pytest.fixture
def one_step_run(one_step_template, tmp_path) -> Path:
    """This test's own copy of the one-step run R (models/R, outputs/), as if it had just trained it."""
    return Path(shutil.copytree(one_step_template, tmp_path, dirs_exist_ok=True))


@pytest.mark.parametrize(
    "flag",
    [
        "--model_size small",
        "--base_dim 32",
        "--schedule cosine",
        "--timesteps 30",
        "--dataset mnist",
        "--conditional",
        "--prediction_type x0",
        "--val_fraction 0.2",
    ],
)
def test_resume_refuses_flags_that_change_the_model_or_data(one_step_run, capsys, flag):
    before = (one_step_run / "models/R/ckpt.pt").read_bytes()
    capsys.readouterr()
    assert run_cli(f"{FAST} --max_steps 2 --save_model --run_name R --resume {flag}", one_step_run) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert (one_step_run / "models/R/ckpt.pt").read_bytes() == before


def test_resume_accepts_a_new_learning_rate_and_length(one_step_run):
    assert (
        run_cli(
            f"{FAST} --max_steps 3 --save_model --run_name R --resume --lr 1e-3 --log_interval 2 --epochs 5",
            one_step_run,
        )
        == 0
    )
    checkpoint = load_checkpoint(one_step_run / "models/R/ckpt.pt")
    assert checkpoint["train_state"]["step"] == 3
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_sigint_writes_a_resumable_checkpoint(tmp_path):
    command = [
        sys.executable,
        str(REPO / "ddpm_main.py"),
        *FAST.split(),
        "--max_steps",
        "100000",
        "--save_model",
        "--run_name",
        "S",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "outputs/metrics_S.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert "checkpoint saved to" in stderr and "the same command continues the run" in stderr
    step = load_checkpoint(tmp_path / "models/S/ckpt.pt")["train_state"]["step"]
    assert step >= 2
    assert run_cli(f"{FAST} --max_steps {step + 2} --save_model --run_name S --resume", tmp_path) == 0
    assert load_checkpoint(tmp_path / "models/S/ckpt.pt")["train_state"]["step"] == step + 2


def test_a_process_killed_mid_write_leaves_the_old_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"weights": torch.arange(5.0)}, path)
    before = path.read_bytes()
    killer = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(REPO)!r})
import ddpm_checkpoint

def dying_save(obj, f):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
ddpm_checkpoint.save_checkpoint({{"weights": torch.zeros(10_000)}}, {str(path)!r})
"""
    for _ in range(3):  # killed again and again: one temporary at most, never a growing pile
        result = subprocess.run([sys.executable, "-c", killer], capture_output=True, timeout=120)
        assert result.returncode == -signal.SIGKILL
        assert path.read_bytes() == before
        assert torch.equal(load_checkpoint(path)["weights"], torch.arange(5.0))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.tmp"]


def test_the_next_training_start_removes_what_killed_writers_left(tmp_path):
    assert run_cli(f"{FAST} --max_steps 1 --save_model --run_name K", tmp_path) == 0
    run_dir = tmp_path / "models/K"
    leftovers = [
        "ckpt.pt.tmp",
        "best.pt.tmp",
        "ckpt_epoch0010.pt.tmp",
        "ckpt.safetensors.tmp",
        "ckpt.pt.tmp-999999999",
    ]  # the last: an earlier version's, its process gone
    for name in leftovers:
        (run_dir / name).write_bytes(b"half a checkpoint")
    (run_dir / "notes.tmp").write_text("not the tool's")
    (run_dir / f"ckpt.pt.tmp-{os.getpid()}").write_bytes(b"a live writer's")
    assert run_cli(f"{FAST} --max_steps 2 --save_model --run_name K --resume", tmp_path) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [
            ".lock",
            "best.pt",
            "best.safetensors",
            "ckpt.pt",
            "ckpt.safetensors",
            "notes.tmp",
            f"ckpt.pt.tmp-{os.getpid()}",
            "phema",
        ]
    )


def test_training_grids_are_the_images_inference_gives_with_the_same_sampling_flags(tmp_path):
    """The grids go through --inference's sampling path: every sampling flag, --amp included, applies to them."""
    sampling = (
        "--sampler ddim --sampling_steps 4 --eta 0.5 --guidance_scale 2.5 --guidance_rescale 0.7 "
        "--guidance_interval 0.5,80 --amp bf16"
    )
    assert (
        run_cli(
            f"{FAST} --conditional --num_samples 6 --batch_size 128 --max_steps 3 --sample_every 1 {sampling} "
            "--save_model --run_name G --save_dir out",
            tmp_path,
        )
        == 0
    )
    assert (
        run_cli(
            f"--inference --model_path models/G/ckpt.pt --num_samples 6 --batch_size 128 {sampling} --save_dir inf",
            tmp_path,
        )
        == 0
    )
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "out/samples_G_epoch0001.png"))
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "inf/grid.png")))
    assert (
        run_cli(
            "--inference --model_path models/G/ckpt.pt --num_samples 6 --batch_size 128 "
            f"{sampling.replace('bf16', 'none')} --save_dir inf_fp32",
            tmp_path,
        )
        == 0
    )
    assert not np.array_equal(grid, np.asarray(Image.open(tmp_path / "inf_fp32/grid.png"))), (
        "--amp must change these images"
    )


def nan_training_losses(monkeypatch, good_steps: int, bad_steps: int):
    """Let `good_steps` training losses through, then make the next `bad_steps` non-finite (evaluation losses are
    untouched)."""
    original = ddpm_diffusion.Diffusion.p_losses
    calls = {"train": 0}

    def p_losses(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if good_steps < calls["train"] <= good_steps + bad_steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ddpm_diffusion.Diffusion, "p_losses", p_losses)


def test_a_non_finite_loss_skips_its_step(tmp_path, monkeypatch):
    assert run_cli(f"{FAST} --max_steps 1 --save_model --run_name one --ema_decay 0", tmp_path) == 0
    nan_training_losses(monkeypatch, good_steps=1, bad_steps=3)
    assert run_cli(f"{FAST} --max_steps 4 --save_model --run_name skipped --ema_decay 0", tmp_path) == 0
    one = load_checkpoint(tmp_path / "models/one/ckpt.pt")
    skipped = load_checkpoint(tmp_path / "models/skipped/ckpt.pt")
    assert skipped["train_state"]["nonfinite_skipped"] == 3
    assert weights_equal(one["model"], skipped["model"]), "a skipped step must not change the weights"
    assert all(torch.isfinite(v).all() for v in skipped["model"].values() if v.is_floating_point())
    lines = [json.loads(line) for line in (tmp_path / "outputs/metrics_skipped.jsonl").read_text().splitlines()]
    assert [line["nonfinite_skipped"] for line in lines if line["kind"] == "step"] == [0, 1, 2, 3]


def test_too_many_non_finite_losses_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_cli(f"{FAST} --max_steps 1 --save_model --run_name N", tmp_path) == 0
    before = load_checkpoint(tmp_path / "models/N/ckpt.pt")
    nan_training_losses(monkeypatch, good_steps=0, bad_steps=10_000)
    capsys.readouterr()
    assert run_cli(f"{FAST} --max_steps 60 --save_model --run_name N --resume", tmp_path) == 2
    assert "non-finite losses in a row" in capsys.readouterr().err
    after = load_checkpoint(tmp_path / "models/N/ckpt.pt")  # rewritten at the epoch end, with the same good weights
    assert weights_equal(before["model"], after["model"]) and weights_equal(before["ema"], after["ema"])


def test_ema_differs_from_raw_weights_and_is_what_sampling_and_evaluation_use(tmp_path):
    assert run_cli(f"{FAST} --conditional --max_steps 6 --save_model --run_name E --save_dir out", tmp_path) == 0
    checkpoint = load_checkpoint(tmp_path / "models/E/ckpt.pt")
    assert not weights_equal(checkpoint["ema"], checkpoint["model"])
    common = "--inference --model_path models/E/ckpt.pt --num_samples 3 --sampler ddim --sampling_steps 4 --seed 7"
    assert run_cli(f"{common} --save_dir ema", tmp_path) == 0
    assert run_cli(f"{common} --save_dir raw --no_ema", tmp_path) == 0
    assert json.loads((tmp_path / "ema/samples.json").read_text())["weights"] == "ema"

    from ddpm_model import UNet

    diffusion = ddpm_diffusion.Diffusion(**checkpoint["diffusion"])
    samples = {}
    for name in ("ema", "model"):
        model = UNet(**checkpoint["model_config"])
        model.load_state_dict(checkpoint[name])
        settings = SamplingConfig(sampler="ddim", steps=4, guidance_scale=GUIDANCE_SCALE)
        images = diffusion.sample(
            model.eval(),
            (3, 3, 8, 8),
            settings,
            labels=torch.tensor([0, 1, 2]),
            generator=torch.Generator().manual_seed(7),
        )
        samples[name] = ((images + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(tmp_path / "ema/samples.npz")["images"], samples["ema"])
    assert np.array_equal(np.load(tmp_path / "raw/samples.npz")["images"], samples["model"])
    assert not np.array_equal(samples["ema"], samples["model"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    """2 micro-batches of 8 == 1 batch of 16: same loss, same gradient norm, same weights after the step.

    Timesteps and noise are pinned to functions of each example (not of the batch it is in), so both
    runs see the same per-example terms; the gradient norm is compared because Adam's step alone would
    hide a wrongly scaled gradient."""
    monkeypatch.setattr(
        torch, "randint", lambda low, high, size, **kw: torch.arange(size[0], device=kw.get("device")) % 8
    )
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.sin(x * 37.0 + 1.0))
    common = f"{FAST} --max_steps 1 --save_model --dropout 0 --no_hflip --ema_decay 0 --grad_clip 0 --warmup_steps 1"
    assert run_cli(f"{common} --batch_size 16 --grad_accum 1 --run_name big", tmp_path) == 0
    assert run_cli(f"{common} --batch_size 8 --grad_accum 2 --run_name accumulated", tmp_path) == 0
    big, accumulated = (
        [json.loads(line) for line in (tmp_path / f"outputs/metrics_{name}.jsonl").read_text().splitlines()][0]
        for name in ("big", "accumulated")
    )
    assert accumulated["train_loss"] == pytest.approx(big["train_loss"], rel=1e-5)
    assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    weights = {name: load_checkpoint(tmp_path / f"models/{name}/ckpt.pt")["model"] for name in ("big", "accumulated")}
    for key in weights["big"]:
        torch.testing.assert_close(weights["accumulated"][key], weights["big"][key], rtol=1e-4, atol=1e-6)


def test_snapshots_keep_the_last_k_and_best_follows_validation(tmp_path):
    assert (
        run_cli(
            f"{FAST} --epochs 3 --eval_every 1 --save_every 1 --keep_checkpoints 2 --sample_every 1 --save_model "
            "--run_name K",
            tmp_path,
        )
        == 0
    )
    run_dir = tmp_path / "models/K"
    assert sorted(p.name for p in run_dir.glob("ckpt_epoch*.pt")) == ["ckpt_epoch0002.pt", "ckpt_epoch0003.pt"]
    history = json.loads((tmp_path / "outputs/loss_history_K.json").read_text())
    assert history["epochs"] == [0, 1, 2]
    best_epoch = int(np.argmin(history["val_loss"]))
    assert (
        load_checkpoint(run_dir / "best.pt")["train_state"]["history"]["val_loss"][-1]
        == history["val_loss"][best_epoch]
    )
    assert (tmp_path / "outputs/progression_K.png").exists()
    assert len(list((tmp_path / "outputs").glob("samples_K_epoch*.png"))) == 3
    assert not list(run_dir.glob("*.tmp-*"))
    # A checkpoint taken at an epoch's end resumes at the next epoch, without repeating the last one.
    assert load_checkpoint(run_dir / "ckpt.pt")["train_state"]["epoch"] == 3
    assert (
        run_cli(
            f"{FAST} --epochs 4 --eval_every 1 --save_every 1 --keep_checkpoints 2 --sample_every 1 --save_model "
            "--run_name K --resume",
            tmp_path,
        )
        == 0
    )
    history = json.loads((tmp_path / "outputs/loss_history_K.json").read_text())
    assert history["epochs"] == [0, 1, 2, 3]
    resumed = load_checkpoint(run_dir / "ckpt.pt")["train_state"]
    assert resumed["best_val_loss"] == min(history["val_loss"]), "ckpt.pt must carry the best validation loss so far"
    assert load_checkpoint(run_dir / "best.pt")["train_state"]["history"]["val_loss"][-1] == min(history["val_loss"])


def test_a_default_run_derives_its_warmup_ema_and_grids_and_reports_its_time_split(tmp_path, capsys):
    command = (
        "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --batch_size 256 --log_interval 5 "
        "--conditional --max_steps 40 --save_model --run_name D --save_dir out"
    )
    assert run_cli(command, tmp_path) == 0
    out = capsys.readouterr().out
    assert "warm-up: 2 steps (derived from the run)" in out and "half-life 5% of the steps so far" in out
    assert (
        "grids every 10 epochs and at the end: 20 images by dpm++2m 20 steps, guidance 1.5 (derived for images" in out
    )
    assert "random flips: on" in out
    checkpoint = load_checkpoint(tmp_path / "models/D/ckpt.pt")
    assert checkpoint["lr_scheduler"]["base_lrs"] == [2e-4]
    assert (
        checkpoint["config"]["train"]["warmup_steps"] is None
        and checkpoint["config"]["sampling"]["sampler"] == "dpm++2m"
    )
    records = [json.loads(line) for line in (tmp_path / "out/metrics_D.jsonl").read_text().splitlines()]
    last_epoch, end = [line for line in records if line["kind"] == "epoch"][-1], records[-1]
    assert end["kind"] == "end" and end["step"] == 40
    assert (
        0 < last_epoch["seconds_in_steps"] <= end["seconds_in_steps"]
        and 0 <= last_epoch["seconds_outside_steps"] <= end["seconds_outside_steps"]
    )
    from PIL import Image

    with Image.open(tmp_path / "out/samples_D_epoch0003.png") as grid:  # 20 images, 5 per row
        assert grid.size == (2 + 5 * (64 + 2), 2 + 4 * (64 + 2)), "8x8 images enlarged to 64 px"


def test_no_validation_split_means_no_validation_loss_and_no_best_checkpoint(tmp_path):
    assert run_cli(f"{FAST} --max_steps 2 --val_fraction 0 --save_model --run_name N --save_dir out", tmp_path) == 0
    history = json.loads((tmp_path / "out/loss_history_N.json").read_text())
    assert math.isnan(history["val_loss"][-1]) and math.isfinite(history["test_loss"][-1])
    assert sorted(p.name for p in (tmp_path / "models/N").iterdir()) == [
        ".lock",
        "ckpt.pt",
        "ckpt.safetensors",
        "phema",
    ], "phema/: the post-hoc EMA snapshots that --save_model keeps"


def test_training_steps_never_wait_for_the_device(tmp_path, tensor_reads):
    """No host-device sync per step, counted on the CPU by the tensor_reads fixture: a run of 12 steps makes
    no more reads than a run of 3; what remains is per run (final evaluation, log line, checkpoint). The post-hoc EMA
    is tracked at every step, but its snapshots (one read each, every --phema_every steps: every step of a run this
    short when derived) are kept out of the 12 steps."""
    counts = {}
    for steps in (3, 12):
        tensor_reads["count"] = 0
        assert (
            run_cli(
                f"{FAST} --conditional --max_steps {steps} --log_interval 1000 --phema_every 1000 --save_model "
                f"--run_name R{steps}",
                tmp_path,
            )
            == 0
        )
        counts[steps] = tensor_reads["count"]
    assert counts[3] > 0, "the counting itself works"
    assert counts[12] == counts[3], f"{(counts[12] - counts[3]) / 9:.1f} tensor reads per training step"


PINNED = REPO / "tests/data/pinned_run_samples.npz"


def test_a_seeded_run_trains_and_samples_the_pinned_images(tmp_path):
    """tests/data/pinned_run_samples.npz holds what this 6-step run and its three samplers gave before the modules were
    reorganised (issue 15); moving code must not change a single pixel of training or sampling."""
    train = (
        "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --batch_size 64 --conditional "
        "--max_steps 6 --sample_every 0 --save_model --run_name pin --save_dir out --device cpu --seed 3"
    )
    assert run_cli(train, tmp_path) == 0
    expected = np.load(PINNED)
    for sampler, steps in (("ddpm", 20), ("ddim", 8), ("dpm++2m", 8)):
        assert (
            run_cli(
                f"--inference --model_path models/pin/ckpt.pt --num_samples 6 --sampler {sampler} "
                f"--sampling_steps {steps} --guidance_scale 2.5 --seed 5 --save_dir inf_{sampler} --device cpu",
                tmp_path,
            )
            == 0
        )
        now = np.load(tmp_path / f"inf_{sampler}/samples.npz")
        assert np.array_equal(now["arr_0"], expected[sampler]), sampler
        assert np.array_equal(now["arr_1"], expected["labels"])
    assert len({expected[s].tobytes() for s in ("ddpm", "ddim", "dpm++2m")}) == 3


def test_sigusr1_writes_a_checkpoint_and_exits_with_the_requeue_status(tmp_path):
    """SLURM's advance warning (--signal=USR1@120): finish the step, write ckpt.pt, exit 75 (EX_TEMPFAIL)."""
    command = [
        sys.executable,
        str(REPO / "ddpm_main.py"),
        *FAST.split(),
        "--max_steps",
        "100000",
        "--save_model",
        "--run_name",
        "P",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "outputs/metrics_P.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED == 75 and "SIGUSR1 received: stopped after step" in stderr
    step = load_checkpoint(tmp_path / "models/P/ckpt.pt")["train_state"]["step"]
    assert run_cli(f"{FAST} --max_steps {step + 1} --save_model --run_name P", tmp_path) == 0
    assert load_checkpoint(tmp_path / "models/P/ckpt.pt")["train_state"]["step"] == step + 1
