"""Distributed training for real: two CPU processes (gloo) launched by torchrun, as a user would launch them."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import ddpm_main
from conftest import REPO, run_cli, weights_equal
from ddpm_checkpoint import load_checkpoint, load_model
from ddpm_config import SamplingConfig
from ddpm_data import load_datasets
from ddpm_diffusion import Diffusion
from ddpm_evaluate import evaluation_loss as evaluate
from ddpm_kinds import PROGRESSION_COLUMNS, kind_of_model
from ddpm_model import UNet
from ddpm_outputs import save_image_grid
from ddpm_runtime import Runtime, check_replicas_identical
from ddpm_sampling import every_class_in_turn, generate_from
from ddpm_train import EVAL_SEEDS

GRID_IMAGES = 20  # a sample grid: batches of 16 and 4, one on each of 2 ranks
TINY = (
    "--dataset folder --data_dir images --image_size 16 --model_size tiny --timesteps 20 --batch_size 16 "
    f"--warmup_steps 1 --log_interval 1 --num_samples {GRID_IMAGES} --sampler ddim --sampling_steps 5 --device cpu"
)
# A run continued by 1 process against a straight 2-process one: measured 2.9e-4 (weights, EMA) and 8.5e-6 (validation
# loss), the size of one optimizer step at --lr 2e-4; the tolerances leave a margin of about 7x and 100x.
WEIGHT_TOLERANCE, LOSS_TOLERANCE = 2e-3, 1e-3
STEPS = 2  # optimizer steps of the 2-process run, each of 2 x 16 images


def write_image_folder(root: Path, per_class: int = 75) -> None:
    """Two classes of small noisy PNGs: 122 training images, so that an epoch takes seconds."""
    generator = np.random.default_rng(0)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + generator.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, command: str, *launcher: str) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N [launcher flags] ddpm_main.py ...` on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        *launcher,
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "ddpm_main.py"),
        *shlex.split(command),
    ]


def torchrun(nproc: int, command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        torchrun_command(nproc, command), cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-process run of STEPS optimizer steps (global batch 32), conditional, with checkpoints."""
    root = tmp_path_factory.mktemp("ddp")
    write_image_folder(root / "images")
    result = torchrun(2, f"{TINY} --conditional --max_steps {STEPS} --save_model --run_name D --save_dir out", root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_two_processes_train_and_end_with_identical_weights(run_dir):
    """The run ends with ddpm_train.check_replicas_identical, which raises (non-zero exit) if the ranks' weights
    differ."""
    checkpoint = load_checkpoint(run_dir / "models/D/ckpt.pt")
    assert checkpoint["train_state"]["step"] == STEPS
    assert checkpoint["train_state"]["epoch_position"] == STEPS * 2 * 16, "each step uses both ranks' batches"
    assert checkpoint["runtime"]["world_size"] == 2
    assert len(checkpoint["rng_per_rank"]) == 2
    assert not torch.equal(checkpoint["rng_per_rank"][0]["torch"], checkpoint["rng_per_rank"][1]["torch"]), (
        "ranks draw their own noise"
    )


def test_only_rank_zero_writes_and_writes_once(run_dir):
    assert sorted(p.name for p in (run_dir / "models/D").iterdir()) == [
        ".lock",
        "best.pt",
        "best.safetensors",
        "ckpt.pt",
        "ckpt.safetensors",
        "phema",
    ], "no temporary files left (rank 0 holds the run lock)"
    history = json.loads((run_dir / "out/loss_history_D.json").read_text())
    assert all(len(values) == 1 for values in history.values()), history
    kinds = [json.loads(line)["kind"] for line in (run_dir / "out/metrics_D.jsonl").read_text().splitlines()]
    assert kinds == ["step"] * STEPS + ["epoch", "end"], "one metrics line per logged step, not one per rank"
    assert len(list((run_dir / "out").glob("samples_D_epoch*.png"))) == 1


def test_sample_grid_is_gathered_from_both_ranks(run_dir, tmp_path):
    """The grid's 20 images are drawn in batches of --batch_size 16: rank 0 draws batch 0 (images 0-15), rank 1 batch 1
    (16-19), and rank 0 saves them all, in order: the grid PNG and the progression's row are, pixel for pixel, what one
    process draws from the saved EMA weights with the run's seed and batch size (ranks' rows swapped, a rank's share
    drawn from the wrong seed, or one rank's rows repeated all fail)."""
    checkpoint = load_checkpoint(run_dir / "models/D/ckpt.pt")
    _, row = checkpoint["train_state"]["progression"][0]
    loaded = load_model(run_dir / "models/D/ckpt.pt", "cpu")
    assert loaded.use_ema
    train = checkpoint["config"]["train"]
    assert (train["num_samples"], train["batch_size"]) == (GRID_IMAGES, 16)
    kind = kind_of_model(loaded.description)
    settings = kind.sampling_settings(SamplingConfig(sampler="ddim", steps=5), loaded.diffusion.num_timesteps)
    expected = generate_from(
        loaded,
        kind,
        GRID_IMAGES,
        every_class_in_turn(2, GRID_IMAGES),
        settings,
        train["seed"],
        16,
        Runtime(torch.device("cpu")),
    )
    assert not torch.equal(expected[:4], expected[16:]), "the batches come from different noise"
    assert torch.equal(row, expected[:PROGRESSION_COLUMNS])
    save_image_grid(expected.permute(0, 3, 1, 2).float() / 127.5 - 1, tmp_path / "expected.png")
    with (
        Image.open(run_dir / "out/samples_D_epoch0001.png") as saved,
        Image.open(tmp_path / "expected.png") as one_process,
    ):
        assert np.array_equal(np.asarray(saved), np.asarray(one_process))


def test_validation_loss_is_averaged_over_all_ranks(run_dir):
    """The logged loss covers the whole validation set, its chunks shared out over the ranks: it equals the
    loss one process computes from the saved weights."""
    checkpoint = load_checkpoint(run_dir / "models/D/ckpt.pt")
    model = UNet(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["ema"])
    val = load_datasets("folder", run_dir / "images", 16).val
    objective = checkpoint["config"]["diffusion"]
    diffusion = Diffusion(20, prediction_type=objective["prediction_type"], snr_gamma=objective["snr_gamma"])
    loss = evaluate(
        model, diffusion, val, Runtime(torch.device("cpu")), seed=EVAL_SEEDS["val"], batch_size=16, loss_type="l2"
    )
    history = json.loads((run_dir / "out/loss_history_D.json").read_text())
    assert history["val_loss"][0] == pytest.approx(loss, rel=1e-5)


def test_resume_with_another_number_of_processes_keeps_the_global_batch(run_dir, capsys):
    """Saved by 2 processes of 16, continued by 1 to the end of the epoch: --grad_accum 2 keeps the global batch of 32,
    so the run ends at the step a 2-process run ends at, with weights close to a straight 2-process run's (the one
    step after the resume draws other noise: bit-identity is not expected across numbers of processes)."""
    straight = torchrun(
        2, f"{TINY} --conditional --epochs 1 --save_model --run_name S --save_dir out_S --sample_every 0", run_dir
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    capsys.readouterr()
    assert (
        run_cli(f"{TINY} --conditional --epochs 1 --save_model --run_name D --save_dir out --sample_every 0", run_dir)
        == 0
    )
    assert (
        "global batch 32 kept: --grad_accum 2 with 1 processes of --batch_size 16 (the run was saved by 2)"
        in capsys.readouterr().out
    )
    train_examples = len(load_datasets("folder", run_dir / "images", 16).train)
    continued, reference = (load_checkpoint(run_dir / f"models/{name}/ckpt.pt") for name in ("D", "S"))
    assert continued["train_state"]["step"] == reference["train_state"]["step"] == train_examples // 32
    assert continued["config"]["train"]["grad_accum"] == 2 and continued["runtime"] == {
        "world_size": 1,
        "global_batch": 32,
    }
    for key in ("model", "ema"):
        difference = max((continued[key][name] - reference[key][name]).abs().max().item() for name in reference[key])
        assert difference < WEIGHT_TOLERANCE, (key, difference)
    history = json.loads((run_dir / "out/loss_history_D.json").read_text())
    straight_history = json.loads((run_dir / "out_S/loss_history_S.json").read_text())
    assert history["val_loss"][-1] == pytest.approx(straight_history["val_loss"][-1], abs=LOSS_TOLERANCE)


def test_a_worker_killed_mid_run_is_restarted_by_torchrun_and_the_run_ends_bit_identical(tmp_path):
    """torchrun --max-restarts 1: one worker is SIGKILLed once ckpt.pt exists; torchrun restarts both, they continue the
    last ckpt.pt with the same command, recompute the steps after it, and end with the weights, EMA and optimizer state
    of an uninterrupted 2-process run, bit for bit."""
    command = f"{TINY} --max_steps 5 --save_every_steps 1 --sample_every 0 --save_model --run_name E --save_dir out"
    for name in ("straight", "elastic"):
        write_image_folder(tmp_path / name / "images")
    assert torchrun(2, command, tmp_path / "straight").returncode == 0
    launcher = subprocess.Popen(
        torchrun_command(2, command, "--max-restarts", "1"),
        cwd=tmp_path / "elastic",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (tmp_path / "elastic/models/E/ckpt.pt").exists():
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "continuing models/E/ckpt.pt at step" in stdout, stdout[-3000:]
    straight, elastic = (load_checkpoint(tmp_path / name / "models/E/ckpt.pt") for name in ("straight", "elastic"))
    assert elastic["train_state"]["step"] == straight["train_state"]["step"] == 5
    for key in ("model", "ema"):
        assert weights_equal(straight[key], elastic[key]), key
    states = [checkpoint["optimizer"]["state"] for checkpoint in (straight, elastic)]
    assert all(weights_equal(states[0][index], states[1][index]) for index in states[0])


def test_sampling_and_evaluation_under_torchrun_give_what_one_process_gives(run_dir):
    """--inference and --evaluate with 2 processes: each samples its share (that a share is the rows one process samples
    for those batches: test_sampling.py), rank 0 gathers and writes once, and images, labels and FID equal a single
    process's for the same seed."""
    common = "--model_path models/D/ckpt.pt --device cpu --batch_size 2 --sampler ddim --sampling_steps 3 --seed 5"
    for mode, flags in (
        ("inference", f"--inference {common} --num_samples 5"),
        (
            "evaluation",
            f"--evaluate {common} --fid_num_samples 5 --fid_features random-conv --data_dir images --no_judge",
        ),
    ):
        result = torchrun(2, f"{flags} --save_dir {mode}_2", run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("wrote") == 1, "only rank 0 writes"
        assert run_cli(f"{flags} --save_dir {mode}_1", run_dir) == 0
        two, one = (np.load(run_dir / f"{mode}_{n}/samples.npz") for n in (2, 1))
        assert two["images"].shape[0] == 5
        assert np.array_equal(two["images"], one["images"]) and np.array_equal(two["labels"], one["labels"])
    results = {n: json.loads((run_dir / f"evaluation_{n}/evaluation.json").read_text()) for n in (1, 2)}
    assert results[2]["fid"] == results[1]["fid"]
    assert (results[1]["processes"], results[2]["processes"]) == (1, 2)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches one worker only (as a pre-empted node's would): every rank stops after the same step,
    so no rank hangs in a collective, and rank 0 writes a checkpoint that resumes."""
    write_image_folder(tmp_path / "images")
    command = f"{TINY} --max_steps 100000 --save_model --run_name T --save_dir out"
    launcher = subprocess.Popen(
        torchrun_command(2, command),
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "out/metrics_T.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.2)
    workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=240)
    assert "another process was signalled: stopped after step" in stderr, stderr[-3000:]
    step = load_checkpoint(tmp_path / "models/T/ckpt.pt")["train_state"]["step"]
    assert step >= 2
    assert (
        torchrun(
            2, f"{TINY} --max_steps {step + 1} --save_model --run_name T --save_dir out --resume", tmp_path
        ).returncode
        == 0
    )
    assert load_checkpoint(tmp_path / "models/T/ckpt.pt")["train_state"]["step"] == step + 1


MAPPING_RANK = """
import os, sys
sys.path.insert(0, {repo!r})
import ddpm_data
data = ddpm_data.load_datasets("folder", {root!r}, image_size=8)
mapped = sorted({{line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".images.npy")}})
rows = len(data.train) + len(data.val) + len(data.test)
print("rank", os.environ["RANK"], "maps", *mapped, os.stat(mapped[0]).st_ino, rows, flush=True)
"""


def test_two_ranks_build_one_cache_and_map_the_same_file(tmp_path):
    """Under torchrun one rank decodes (holding the cache's lock) while the other waits; both then map the one file,
    so that the page cache holds one copy for the machine."""
    write_image_folder(tmp_path / "images", per_class=150)
    (tmp_path / "rank.py").write_text(MAPPING_RANK.format(repo=str(REPO), root=str(tmp_path / "images")))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(tmp_path / "rank.py"),
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # each rank's line, wherever the two processes' output met on the shared stdout
    lines = sorted(re.findall(r"rank (\d) maps (\S+) (\d+) (\d+)", result.stdout))
    assert [line[0] for line in lines] == ["0", "1"], result.stdout[-3000:]
    (_, path, inode, rows), other = lines
    assert list(other[1:]) == [path, inode, rows] == [path, inode, "300"], (
        "the same file (path and inode), all the images"
    )
    assert path.startswith(str(tmp_path / ".ddpm_cache"))
    assert result.stderr.count("decoding 300 images") == 1, result.stderr[-3000:]


def test_readme_torchrun_commands_use_known_flags():
    parser = ddpm_main.build_parser()
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = [
        line.split("ddpm_main.py", 1)[1].removesuffix(" &")  # a job script's line runs in the background
        for page in pages
        for line in page.read_text().splitlines()
        if line.startswith("torchrun ")
    ]
    assert len(commands) >= 3
    for command in commands:
        parser.parse_args(shlex.split(command))


def replica_worker(rank: int, port: int) -> None:
    """Equal weights pass the check; a difference of 1e-6 in one weight on rank 1 fails it on both ranks."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        rt = Runtime(torch.device("cpu"), rank, 2)
        check_replicas_identical([model], rt)
        if rank == 1:
            with torch.no_grad():
                model.weight[0, 0] += 1e-6
        with pytest.raises(RuntimeError, match="1 parameter tensors differ across the 2 processes"):
            check_replicas_identical([model], rt)
    finally:
        dist.destroy_process_group()


def test_replica_check_passes_for_equal_weights_and_catches_a_tiny_difference():
    mp.spawn(replica_worker, args=(free_port(),), nprocs=2)
