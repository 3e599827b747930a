"""ddpm_checkpoint: the one reader of the tool's files, the model description, one process per run folder, and the
checkpoint a training command continues from (the same command for the whole life of a run)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli, tree_fingerprint, usage_error, weights_equal
from ddpm_checkpoint import ModelDescription, RunLock, load_checkpoint, load_model, save_checkpoint


class NotATensor:
    """Pickled into a file to check that load_checkpoint refuses to unpickle classes."""


# ----------------------------------------------------------------------------- the file format


def test_checkpoint_round_trip_is_tagged_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "runs" / "model.pt"
    save_checkpoint({"model": {"weight": torch.arange(6.0).view(2, 3)}, "step": 7, "config": {"lr": 1e-4}}, path)
    state = load_checkpoint(path)
    assert (state["format"], state["format_version"], state["step"], state["config"]) == (
        "ddpm-checkpoint",
        1,
        7,
        {"lr": 1e-4},
    )
    assert torch.equal(state["model"]["weight"], torch.arange(6.0).view(2, 3))
    assert os.listdir(path.parent) == ["model.pt"]


def test_a_truncated_checkpoint_is_a_usage_error(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint({"weight": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    assert "truncated or corrupt" in usage_error(load_checkpoint, path)


def test_a_checkpoint_holding_a_class_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": "ddpm-checkpoint", "payload": NotATensor()}, path)
    assert "refusing" in usage_error(load_checkpoint, path)


def test_a_foreign_torch_file_and_a_missing_file_are_usage_errors(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    assert "not a checkpoint written by this tool" in usage_error(load_checkpoint, path)
    assert "checkpoint not found" in usage_error(load_checkpoint, tmp_path / "missing.pt")


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def crash_mid_write(obj, f):
        f.write(before[:100])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["model.pt"]


# ----------------------------------------------------------------------------- what a trained run's files hold


def test_conditional_checkpoint_knows_its_classes(trained_runs):
    checkpoint = load_checkpoint(trained_runs / "models/C/ckpt.pt")
    assert checkpoint["conditional"] is True
    assert len(checkpoint["data"]["class_names"]) == 10
    assert checkpoint["model_config"]["num_classes"] == 10


def test_every_checkpoint_has_its_sampling_weights_as_safetensors(trained_workspace):
    """ckpt.safetensors: the EMA weights and the model's description, a fraction of ckpt.pt, sampling the same
    images."""
    weights, full = trained_workspace / "models/C/ckpt.safetensors", trained_workspace / "models/C/ckpt.pt"
    assert weights.stat().st_size < full.stat().st_size / 2
    from_weights, from_full = load_checkpoint(weights), load_checkpoint(full)
    assert all(torch.equal(from_weights["ema"][key], value) for key, value in from_full["ema"].items())
    for name, path in (("w", weights), ("f", full)):
        assert (
            run_cli(
                f"--inference --model_path {path.relative_to(trained_workspace)} --num_samples 2 --sampler ddim "
                f"--sampling_steps 2 --save_dir st_{name}",
                trained_workspace,
            )
            == 0
        )
    assert np.array_equal(
        np.load(trained_workspace / "st_w/samples.npz")["arr_0"],
        np.load(trained_workspace / "st_f/samples.npz")["arr_0"],
    )


# ----------------------------------------------------------------------------- training state and the run lock

FAST = "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --sample_every 0 --device cpu"


def test_a_second_process_on_a_live_run_is_refused_and_touches_nothing(tmp_path, capsys):
    """The same command run twice, or a re-queued job whose first copy still runs: one line, exit 2, and the first
    run's checkpoint as it was; once the first process is gone (even killed), the lock is gone with it."""
    assert run_cli(f"{FAST} --batch_size 64 --max_steps 2 --save_model --run_name L", tmp_path) == 0
    checkpoint = tmp_path / "models/L/ckpt.pt"
    before = checkpoint.read_bytes()
    # batch 8: 600 steps per epoch, so the live run writes no checkpoint while the others try
    live = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "ddpm_main.py"),
            *FAST.split(),
            "--batch_size",
            "8",
            "--max_steps",
            "100000",
            "--save_model",
            "--run_name",
            "L",
            "--resume",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        lock = tmp_path / "models/L/.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(live.pid)):
            assert live.poll() is None and time.time() < deadline, live.communicate()
            time.sleep(0.1)
        capsys.readouterr()
        for command in (
            f"{FAST} --batch_size 64 --max_steps 4 --save_model --run_name L --resume",
            f"{FAST} --batch_size 64 --max_steps 4 --save_model --run_name L",
        ):
            assert run_cli(command, tmp_path) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and "being trained by another process" in error and f"pid {live.pid}" in error
        assert checkpoint.read_bytes() == before
    finally:
        live.kill()
        live.wait(timeout=60)
    assert checkpoint.read_bytes() == before, "the killed run had not reached a checkpoint"
    assert run_cli(f"{FAST} --batch_size 64 --max_steps 4 --save_model --run_name L --resume", tmp_path) == 0
    assert load_checkpoint(checkpoint)["train_state"]["step"] == 4


def test_every_writer_describes_the_model_the_same_way_and_load_model_reads_both_files(trained_runs):
    """The shared conditional run C (16x16, 3 steps): its checkpoint and its weights file."""
    full = load_checkpoint(trained_runs / "models/C/ckpt.pt")
    weights = load_checkpoint(trained_runs / "models/C/ckpt.safetensors")
    described = ModelDescription.from_checkpoint(full, "ckpt.pt")
    assert ModelDescription.from_checkpoint(weights, "ckpt.safetensors") == described
    assert (
        described.image_shape == (3, 16, 16)
        and described.num_classes == 10
        and described.diffusion["prediction_type"] == "v"
    )
    from_checkpoint, from_weights = (
        load_model(trained_runs / "models/C/ckpt.pt"),
        load_model(trained_runs / "models/C/ckpt.safetensors"),
    )
    assert from_checkpoint.use_ema and not from_checkpoint.model.training
    for key, value in from_checkpoint.model.state_dict().items():
        assert torch.equal(value, full["ema"][key]) and torch.equal(value, from_weights.model.state_dict()[key]), key
    raw = load_model(trained_runs / "models/C/ckpt.pt", use_ema=False)
    assert not raw.use_ema and all(torch.equal(v, full["model"][k]) for k, v in raw.model.state_dict().items())
    assert any(not torch.equal(full["ema"][k], full["model"][k]) for k in full["model"]), "EMA and raw weights differ"


def test_the_run_lock_lets_one_holder_in_at_a_time(tmp_path):
    run_dir = tmp_path / "models" / "R"
    with RunLock(run_dir):
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
        message = usage_error(RunLock(run_dir).__enter__)
        assert "being trained by another process" in message and f"pid {os.getpid()}" in message
        with RunLock(run_dir, enabled=False):  # other ranks, and runs that write no checkpoint, take no lock
            pass
    with RunLock(run_dir):  # released with its holder
        pass


# The checkpoint a training command continues from: one command for the whole life of a run


def training_state(path: Path) -> dict:
    """What must match bit for bit between two runs: the weights, the EMA and the optimizer's state."""
    checkpoint = load_checkpoint(path)
    return {
        "model": checkpoint["model"],
        "ema": checkpoint["ema"],
        "optimizer": {
            f"{index}.{key}": value
            for index, state in checkpoint["optimizer"]["state"].items()
            for key, value in state.items()
        },
    }


def test_one_command_starts_a_run_continues_it_after_a_kill_and_then_leaves_it_alone(tmp_path, capsys):
    """The same command line three times on one run folder: from scratch (SIGKILLed mid-run), continued from the last
    ckpt.pt, and once finished, nothing touched; the weights equal one uninterrupted run's bit for bit."""
    command = (
        f"{FAST} --batch_size 64 --max_steps 24 --save_every_steps 2 --sample_every 0 --save_model --run_name L "
        "--save_dir out"
    )
    (tmp_path / "straight").mkdir()
    assert run_cli(command, tmp_path / "straight") == 0
    life = tmp_path / "life"
    life.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "ddpm_main.py"), *command.split()],
        cwd=life,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (life / "models/L/ckpt.pt").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert (
        process.returncode == -signal.SIGKILL
        and "new run: no checkpoint in models/L/" in stderr + capsys.readouterr().out
    )
    killed_at = load_checkpoint(life / "models/L/ckpt.pt")["train_state"]["step"]
    assert 2 <= killed_at < 24
    assert run_cli(command, life) == 0
    assert f"continuing models/L/ckpt.pt at step {killed_at}" in capsys.readouterr().out
    finished = tree_fingerprint(life)
    assert run_cli(command, life) == 0
    assert "models/L/ckpt.pt is complete at step 24" in capsys.readouterr().out
    assert tree_fingerprint(life) == finished, "a finished run started again changes nothing"
    straight, resumed = (training_state(root / "models/L/ckpt.pt") for root in (tmp_path / "straight", life))
    assert all(weights_equal(straight[key], resumed[key]) for key in straight)


def test_a_damaged_ckpt_falls_back_to_the_newest_readable_snapshot(tmp_path, capsys):
    """Any run's checkpoints (here a fast 2D one: 4 steps an epoch)."""
    command = (
        "--dataset moons --model_size mlp --mlp_width 32 --batch_size 8192 --num_samples 100 --sample_every 0 "
        "--save_every 1 --save_model --run_name F --save_dir out"
    )
    assert run_cli(f"{command} --epochs 2", tmp_path) == 0
    run_dir = tmp_path / "models/F"
    damaged = (run_dir / "ckpt.pt").read_bytes()[:5000]
    (run_dir / "ckpt.pt").write_bytes(damaged)
    snapshot = load_checkpoint(run_dir / "ckpt_epoch0002.pt")["train_state"]["step"]
    capsys.readouterr()
    assert run_cli(f"{command} --epochs 3", tmp_path) == 0
    out, err = capsys.readouterr()
    assert "models/F/ckpt.pt cannot be read" in err and "continuing from models/F/ckpt_epoch0002.pt" in err
    assert f"continuing models/F/ckpt_epoch0002.pt at step {snapshot}" in out
    assert (run_dir / "ckpt.pt.damaged").read_bytes() == damaged, "kept, renamed, never deleted"
    assert load_checkpoint(run_dir / "ckpt.pt")["train_state"]["epoch"] == 3


@pytest.mark.parametrize("case", ["folder is a file", "indivisible global batch", "another configuration"])
def test_bad_input_to_a_continued_run_gets_one_line_and_touches_nothing(tmp_path, capsys, case):
    command = f"{FAST} --batch_size 24 --max_steps 1 --sample_every 0 --save_model --run_name B --save_dir out"
    if case == "folder is a file":
        (tmp_path / "models").mkdir()
        (tmp_path / "models/B").write_text("not a folder")
    else:
        assert run_cli(command, tmp_path) == 0
    before = tree_fingerprint(tmp_path)
    capsys.readouterr()
    changed = {
        "folder is a file": "",
        "indivisible global batch": " --batch_size 16 --max_steps 2",
        "another configuration": " --max_steps 2 --schedule cosine",
    }[case]
    assert run_cli(command + changed, tmp_path) == 2
    message = capsys.readouterr().err.strip()
    expected = {
        "folder is a file": "cannot use the run folder models/B",
        "indivisible global batch": "global batch of 24 is not a multiple of 16",
        "another configuration": "it was trained with --schedule linear",
    }[case]
    assert expected in message and len(message.splitlines()) == 1
    assert tree_fingerprint(tmp_path) == before
