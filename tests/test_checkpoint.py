"""ddpm_checkpoint: the one reader of the tool's files, the model description, and one process per run folder."""
import subprocess
import sys
import time

import torch

from conftest import REPO, run_cli
from ddpm_checkpoint import ModelDescription, load_checkpoint, load_model

FAST = "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --sample_every 0 --device cpu"


def test_a_second_process_on_a_live_run_is_refused_and_touches_nothing(tmp_path, capsys):
    """The same command run twice, or a re-queued job whose first copy still runs: one line, exit 2, and the first
    run's checkpoint as it was; once the first process is gone (even killed), the lock is gone with it."""
    assert run_cli(f"{FAST} --batch_size 64 --max_steps 2 --save_model --run_name L", tmp_path) == 0
    checkpoint = tmp_path / "models/L/ckpt.pt"
    before = checkpoint.read_bytes()
    # batch 8: 600 steps per epoch, so the live run writes no checkpoint while the others try
    live = subprocess.Popen([sys.executable, str(REPO / "ddpm_main.py"), *FAST.split(), "--batch_size", "8", "--max_steps", "100000",
                             "--save_model", "--run_name", "L", "--resume"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock = tmp_path / "models/L/.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(live.pid)):
            assert live.poll() is None and time.time() < deadline, live.communicate()
            time.sleep(0.1)
        capsys.readouterr()
        for command in (f"{FAST} --batch_size 64 --max_steps 4 --save_model --run_name L --resume",
                        f"{FAST} --batch_size 64 --max_steps 4 --save_model --run_name L"):
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


def test_every_writer_describes_the_model_the_same_way_and_load_model_reads_both_files(tmp_path):
    assert run_cli(f"{FAST} --batch_size 64 --max_steps 2 --conditional --save_model --run_name D", tmp_path) == 0
    full = load_checkpoint(tmp_path / "models/D/ckpt.pt")
    weights = load_checkpoint(tmp_path / "models/D/ckpt.safetensors")
    described = ModelDescription.from_checkpoint(full, "ckpt.pt")
    assert ModelDescription.from_checkpoint(weights, "ckpt.safetensors") == described
    assert described.image_shape == (3, 8, 8) and described.num_classes == 10 and described.diffusion["prediction_type"] == "v"
    from_checkpoint, from_weights = load_model(tmp_path / "models/D/ckpt.pt"), load_model(tmp_path / "models/D/ckpt.safetensors")
    assert from_checkpoint.use_ema and not from_checkpoint.model.training
    for key, value in from_checkpoint.model.state_dict().items():
        assert torch.equal(value, full["ema"][key]) and torch.equal(value, from_weights.model.state_dict()[key]), key
    raw = load_model(tmp_path / "models/D/ckpt.pt", use_ema=False)
    assert not raw.use_ema and all(torch.equal(v, full["model"][k]) for k, v in raw.model.state_dict().items())
    assert any(not torch.equal(full["ema"][k], full["model"][k]) for k in full["model"]), "EMA and raw weights differ"
