"""Every GPU measurement of the DDPM tool, in one process, in one go: what to run when a GPU is lent for a few minutes.

    python scripts/gpu_check.py --out gpu_check            # on an H100/H200: planned at 450 s (STEP_BUDGET_S)
    python scripts/gpu_check.py --out gpu_check --quick    # every step at toy size on the CPU: under a minute

Steps, in this order, each with its time budget on an H100/H200 (STEP_BUDGET_S; sizes in FULL, toy sizes in QUICK):

1. throughput (90 s): training images/s of the `ddpm` preset, batch 128, 32x32, bf16 autocast: ours plain,
   + channels_last, + torch.compile (default mode), and diffusers' UNet2DModel of the same architecture, timed in
   interleaved rounds by scripts/benchmark.py's functions; peak memory, MFU against the chip's dense bf16 peak, and
   the targets (>= 1.5x UNet2DModel's images/s, >= 40% MFU) met or missed. Most of it is the compilation.
2. profile (15 s): torch.profiler over 5 compiled training steps: the top 15 CUDA kernels (CPU ops on the CPU) as
   a text table, and the share of the step time the GPU is idle (host-bound).
3. training (200 s): a real run of `ddpm_main.py` (conditional `ddpm` preset on --dataset synthetic at 32x32,
   defaults plus --compile --save_model --save_every_steps 500), about 3 minutes in all: start-up, compilation and
   TRAIN_STEPS_S of optimizer steps and checkpoints, --max_steps planned from step 1's images/s and a checkpoint
   write timed before the run; its figures come from its metrics log. Then --resume for a few more steps. Synthetic
   rather than scikit-learn's 1,347 digits: 37 steps per epoch instead of 10, and the tool writes ckpt.pt at every
   epoch end.
4. sampling (110 s): guided samples (w=3) of that network through ddpm_sampling.generate: dpm++2m 20 steps and
   ddim 50 steps, bf16 against fp32 network (10,000 images for bf16 dpm++2m, 1,024 for each other run, all from the
   same noise), then torch.compile and CUDA graphs (mode="reduce-overhead") on 1,024 each.
5. nonfinite_skip (5 s): a NaN loss through ddpm_optim.apply_update leaves weights, fused AdamW state and EMA
   bit-identical.
6. torchrun (30 s): `python -m torch.distributed.run --nproc_per_node 1 ddpm_main.py ...` trains a few steps and
   writes its checkpoint; NCCL (gloo on the CPU) all-reduces in one process.

Each step is guarded: a failure is recorded with its one-line error and the next step runs. Every step prints its
elapsed time as it ends, and --out receives after every step: gpu_check.json (every figure, the GPU, driver and
torch versions, the command line), gpu_check.md (tables for a README), samples_training.png (the training run's
last grid), profile_top15.txt and logs/ (the command lines' output). Checkpoints go to a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

# ---- The tool's modules: every import of them is in this block (they are being reorganised; repoint here). ----
# ---- end of the tool's modules ----
import benchmark  # noqa: E402  scripts/benchmark.py: the training-throughput measurement step 1 reuses

from ddpm_checkpoint import LoadedModel, load_checkpoint, load_model, save_checkpoint, save_weights, weights_path  # noqa: E402
from ddpm_config import DiffusionConfig, SamplingConfig, TrainConfig  # noqa: E402
from ddpm_data import load_datasets  # noqa: E402
from ddpm_diffusion import Diffusion  # noqa: E402
from ddpm_kinds import kind_of_model  # noqa: E402
from ddpm_model import UNet, preset_config  # noqa: E402
from ddpm_optim import EMA, EMA_HALFLIFE_RATIO, EMA_MAX_DECAY, apply_update, build_optimizer  # noqa: E402
from ddpm_runtime import Runtime, autocast_dtype, enable_tf32  # noqa: E402
from ddpm_sampling import every_class_in_turn, generate  # noqa: E402

# Seconds per step on an H100/H200, what FULL's sizes are chosen for (450 s; with start-up under 8 minutes). Each
# step's elapsed time is recorded next to its budget; a command line gets Plan.timeout_scale times its step's budget.
STEP_BUDGET_S = {"throughput": 90, "profile": 15, "training": 200, "sampling": 110, "nonfinite_skip": 5, "torchrun": 30}
TRAIN_STEPS_S = (
    90  # of the training run's 200 s: optimizer steps and their checkpoints (the rest: start-up, compilation, resume)
)
TARGET_SPEEDUP = 1.5  # ours over diffusers' UNet2DModel, training images/s
TARGET_MFU = 0.40
PROFILE_STEPS = 5
TOP_KERNELS = 15
GUIDANCE_SCALE = 3.0
RUN_NAME = "gpu_check"
NUM_CLASSES = 10  # of --dataset synthetic


@dataclass(frozen=True)
class Plan:
    """The sizes of every step."""

    device: str
    model_size: str
    base_dim: Optional[
        int
    ]  # of step 1's networks, overriding the preset's (diffusers' UNet2DModel needs widths of 32 and more)
    image_size: int
    batch_size: int
    warmup: int  # benchmark's untimed steps per model, then `repeats` rounds of `iters` steps
    repeats: int
    iters: int
    compile_backend: (
        str  # torch.compile's backend: inductor (its default) or, on a small CPU, aot_eager (no C++ compilation)
    )
    train_steps: Optional[int]  # steps of the CLI run; None: planned from step 1 (TRAIN_STEPS_S)
    fallback_train_steps: int  # when there is nothing to plan from
    train_compile: bool
    resume_steps: int
    cli_toy_flags: tuple[str, ...]  # added to the CLI runs: none at full size
    samplers: tuple[tuple[str, int], ...]  # (sampler, steps); the first with a bf16 network takes sample_count images
    sample_count: int
    variant_count: int  # every other sampling variant (a multiple of sample_batch: one batch shape for compiled models)
    sample_batch: int
    sample_warmup: bool  # one untimed batch before each timed sampling run
    torchrun_steps: int
    torchrun_batch: int
    timeout_scale: float  # a command line may take this many times its step's budget


FULL = Plan(
    device="cuda",
    model_size="ddpm",
    base_dim=None,
    image_size=32,
    batch_size=128,
    warmup=3,
    repeats=7,
    iters=3,
    compile_backend="inductor",
    train_steps=None,
    fallback_train_steps=1000,
    train_compile=True,
    resume_steps=20,
    cli_toy_flags=(),
    samplers=(("dpm++2m", 20), ("ddim", 50)),
    sample_count=10_000,
    variant_count=1024,
    sample_batch=128,
    sample_warmup=True,
    torchrun_steps=3,
    torchrun_batch=64,
    timeout_scale=2.0,
)
QUICK = Plan(
    device="cpu",
    model_size="tiny",
    base_dim=32,
    image_size=16,
    batch_size=8,
    warmup=1,
    repeats=3,
    iters=1,
    compile_backend="aot_eager",
    train_steps=4,
    fallback_train_steps=4,
    train_compile=False,
    resume_steps=2,
    cli_toy_flags=("--log_interval", "1", "--num_samples", "4", "--sampling_steps", "4"),
    samplers=(("dpm++2m", 4), ("ddim", 5)),
    sample_count=4,
    variant_count=4,
    sample_batch=4,
    sample_warmup=False,
    torchrun_steps=2,
    torchrun_batch=8,
    timeout_scale=10.0,
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Every GPU measurement of the DDPM tool in one process.")
    parser.add_argument(
        "--out", required=True, help="folder for gpu_check.json, gpu_check.md, the grid, the profile table, logs/"
    )
    parser.add_argument("--quick", action="store_true", help="every step at toy size on the CPU (under a minute)")
    parser.add_argument("--device", default=None, help="default: cuda when present (cpu with --quick)")
    return parser.parse_args(argv)


# Small helpers


def log(started: float, message: str) -> None:
    """A progress line with the seconds since the start, flushed at once (a run cut short says where it was)."""
    print(f"[gpu_check {time.perf_counter() - started:6.1f} s] {message}", flush=True)


def one_line(error: BaseException) -> str:
    """An exception as the one line the report records."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def last_line(text: str) -> str:
    """The last non-empty line of a command's output (progress bars rewrite lines with carriage returns)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def run_command(command: list[str], log_path: Path, timeout: float, cwd: Path) -> str:
    """Run a command line, its output into `log_path`, in its own process group (killed whole on a timeout or an
    interrupt, torchrun's workers included); return the output, or raise with its last line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as output:
        output.write(shlex.join(command) + "\n")
        output.flush()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            code = process.wait(timeout=timeout)
        except BaseException as error:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(error, subprocess.TimeoutExpired):
                raise RuntimeError(
                    f"{log_path.stem}: timed out after {timeout:.0f} s (see logs/{log_path.name})"
                ) from None
            raise
    text = log_path.read_text()
    if code != 0:
        raise RuntimeError(f"{log_path.stem}: exit code {code}: {last_line(text)} (see logs/{log_path.name})")
    return text


def shown(command: list[str], work: Path) -> str:
    """A command line as a user would type it: `python`, paths relative to the repository, the work folder as WORK."""
    words = [
        "python" if word == sys.executable else word.replace(str(REPO) + "/", "").replace(str(work), "WORK")
        for word in command
    ]
    return shlex.join(words)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(device: torch.device) -> dict:
    """benchmark.environment plus the GPU's name, driver, CUDA and cuDNN versions."""
    driver = None
    if device.type == "cuda":
        try:
            driver = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        **benchmark.environment(device),
        "gpu": gpu,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cpu": benchmark.cpu_name(),
        "peak_bf16_tflops": benchmark.peak_tflops(gpu) if gpu else None,
        "tf32": device.type == "cuda",
    }


# Step 1: training throughput


def throughput_args(plan: Plan) -> argparse.Namespace:
    return benchmark.parse_args(
        [
            "--model_size",
            plan.model_size,
            "--batch_size",
            str(plan.batch_size),
            "--image_size",
            str(plan.image_size),
            "--device",
            plan.device,
            "--amp",
            "bf16",
            "--warmup",
            str(plan.warmup),
            "--repeats",
            str(plan.repeats),
            "--iters",
            str(plan.iters),
        ]
    )


OURS, CHANNELS_LAST, COMPILED, DIFFUSERS = (
    "ours",
    "ours + channels_last",
    "ours + channels_last + compile",
    "diffusers UNet2DModel",
)


def step_throughput(plan: Plan, ctx: dict, say: Callable[[str], None]) -> dict:
    """Training images/s, peak memory and MFU of ours (three ways) and of UNet2DModel, bf16 autocast, interleaved
    rounds."""
    args, device = throughput_args(plan), torch.device(plan.device)
    config = preset_config(plan.model_size, plan.image_size) | ({"base_dim": plan.base_dim} if plan.base_dim else {})
    torch.manual_seed(0)
    models = {
        name: UNet(in_channels=3, image_size=plan.image_size, **config) for name in (OURS, CHANNELS_LAST, COMPILED)
    }
    theirs = benchmark.diffusers_unet(models[OURS].config)
    notes = []
    if theirs is None:
        notes.append("diffusers is not installed: no UNet2DModel comparison (pip install diffusers)")
    else:
        models[DIFFUSERS] = theirs
    formats = {
        name: torch.channels_last if name in (CHANNELS_LAST, COMPILED) else torch.contiguous_format for name in models
    }
    fns, flops = {}, {}
    for name, model in models.items():
        model.to(device, memory_format=formats[name]).train()
        flops[name] = benchmark.forward_flops(model, plan.image_size, device)
        runnable = torch.compile(model, backend=plan.compile_backend) if name == COMPILED else model
        fns[name] = benchmark.train_step_fn(runnable, args, device, formats[name])
    ctx["compiled_step"] = fns[COMPILED]
    first = benchmark.first_steps(fns, models, device)
    say("first steps: " + ", ".join(f"{name} {values['first_step_s']:.1f} s" for name, values in first.items()))
    rounds = benchmark.interleaved_timings(fns, args, device)
    peak = benchmark.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    results = {}
    for name in models:
        images_per_s = plan.batch_size / statistics.median(rounds[name])
        results[name] = {
            "images_per_s": images_per_s,
            "step_ms": 1000 * statistics.median(rounds[name]),
            **first[name],
            "gflop_per_image_forward": flops[name] / 1e9,
            "mfu": benchmark.mfu(images_per_s, flops[name], peak),
            "speedup_vs_unet2dmodel": benchmark.paired_ratio(rounds[DIFFUSERS], rounds[name])
            if DIFFUSERS in rounds
            else None,
        }
    best = max((OURS, CHANNELS_LAST, COMPILED), key=lambda name: results[name]["images_per_s"])
    speedup, mfu = results[best]["speedup_vs_unet2dmodel"], results[best]["mfu"]
    ctx["train_images_per_s"] = results[COMPILED]["images_per_s"]
    if peak is None:
        notes.append("no MFU: the device is not a GPU of benchmark.PEAK_BF16_TFLOPS")
    return {
        "config": {
            "model_size": plan.model_size,
            "batch_size": plan.batch_size,
            "image_size": plan.image_size,
            "amp": "bf16",
            "compile_backend": plan.compile_backend,
            "rounds": plan.repeats,
            "steps_per_round": plan.iters,
        },
        "models": results,
        "best": best,
        "peak_bf16_tflops": peak,
        "targets": {"speedup_vs_unet2dmodel": target(speedup, TARGET_SPEEDUP), "mfu": target(mfu, TARGET_MFU)},
        "notes": notes,
    }


def target(value: Optional[float], goal: float) -> dict:
    return {"value": value, "goal": goal, "met": None if value is None else value >= goal}


# Step 2: profile


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one of them runs."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def kernel_table(events: list, rows: int, title: str) -> str:
    """The device events (kernels, copies, memsets) aggregated by name, the `rows` longest in total, as a text table."""
    totals: dict[str, list[float]] = {}
    for event in events:
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.end - event.time_range.start
        entry[1] += 1
    grand = sum(total for total, _ in totals.values()) or 1.0
    lines = [title, f"{'kernel':90} {'calls':>6} {'total ms':>9} {'avg us':>8} {'share':>6}"]
    for name, (total, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[:rows]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"{short:90} {calls:6d} {total / 1000:9.3f} {total / calls:8.1f} {total / grand:6.1%}")
    return "\n".join(lines) + "\n"


def step_profile(plan: Plan, ctx: dict, out: Path) -> dict:
    """torch.profiler over PROFILE_STEPS compiled training steps of step 1: the top kernels and the GPU's idle share."""
    step = ctx.pop("compiled_step", None)
    if step is None:
        raise RuntimeError("step 1 built no compiled training step to profile")
    device = torch.device(plan.device)
    cuda = device.type == "cuda"
    step()
    benchmark.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            step()
        benchmark.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    title = (
        f"{PROFILE_STEPS} compiled training steps ({plan.model_size}, batch {plan.batch_size}, "
        f"{plan.image_size}x{plan.image_size}, bf16)"
    )
    result = {"steps": PROFILE_STEPS, "step_ms": wall_us / PROFILE_STEPS / 1000, "table": "profile_top15.txt"}
    if cuda:
        device_events = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
        busy = busy_microseconds([(event.time_range.start, event.time_range.end) for event in device_events])
        table = kernel_table(device_events, TOP_KERNELS, f"Top {TOP_KERNELS} CUDA kernels by total time, {title}")
        result |= {
            "device_busy_ms_per_step": busy / PROFILE_STEPS / 1000,
            "gpu_idle_share": max(0.0, 1 - busy / wall_us),
            "device_events_per_step": len(device_events) / PROFILE_STEPS,
            "note": "idle share = 1 - (union of the kernels' and copies' times) / wall time, under the profiler's "
            "overhead",
        }
    else:
        table = f"Top {TOP_KERNELS} CPU ops by self CPU time, {title}\n" + prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=TOP_KERNELS
        )
        result |= {
            "device_busy_ms_per_step": None,
            "gpu_idle_share": None,
            "note": "no GPU: no idle share; the table lists CPU ops",
        }
    (out / "profile_top15.txt").write_text(table)
    del step
    torch._dynamo.reset()  # frees the compiled training graphs of step 1
    free_device_memory()
    return result


# Steps 3 and 5 share the parts of a training step, built as ddpm_train.build_run builds them


@dataclass
class TrainingParts:
    model: UNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA
    diffusion: Diffusion
    amp_dtype: Optional[torch.dtype]
    train: TrainConfig


def training_parts(plan: Plan, device: torch.device) -> TrainingParts:
    """A conditional model of the plan's preset with the defaults of a new run: fused AdamW, the EMA, the objective,
    --amp auto."""
    torch.manual_seed(0)
    train = TrainConfig()
    model = UNet(
        in_channels=3,
        image_size=plan.image_size,
        num_classes=NUM_CLASSES,
        **preset_config(plan.model_size, plan.image_size),
    ).to(device)
    amp_dtype = autocast_dtype(train.amp, device)
    return TrainingParts(
        model,
        build_optimizer(train, model),
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        EMA(model, EMA_MAX_DECAY, halflife_ratio=EMA_HALFLIFE_RATIO),
        Diffusion(prediction_type=DiffusionConfig.prediction_type, snr_gamma=DiffusionConfig.snr_gamma).to(device),
        amp_dtype,
        train,
    )


def take_step(parts: TrainingParts, batch_size: int, image_size: int, poison: bool = False) -> torch.Tensor:
    """One optimizer step and EMA update as ddpm_train.train_step and run_epoch do; `poison` makes the loss NaN. Returns
    skip."""
    device = next(parts.model.parameters()).device
    parts.optimizer.zero_grad(set_to_none=True)
    x0 = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
    t = torch.randint(0, parts.diffusion.num_timesteps, (batch_size,), device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        loss = parts.diffusion.p_losses(parts.model, x0, t, labels)
    if poison:
        loss = loss * float("nan")
    parts.scaler.scale(loss).backward()
    _, skip = apply_update(parts.model, parts.optimizer, parts.scaler, loss.detach(), parts.train.grad_clip)
    parts.ema.update(parts.model, skip)
    return skip


# Step 3: a training run through the command line


def checkpoint_write_seconds(parts: TrainingParts, folder: Path, repeats: int = 2) -> float:
    """Seconds to write what ddpm_checkpoint.save_run_checkpoint writes (weights, EMA and optimizer state by
    save_checkpoint, the EMA by save_weights), from the device, median of `repeats`."""
    path = folder / "ckpt.pt"
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(
            {
                "model": parts.model.state_dict(),
                "ema": parts.ema.module.state_dict(),
                "optimizer": parts.optimizer.state_dict(),
            },
            path,
        )
        save_weights(parts.ema.module.state_dict(), {}, weights_path(path))
        seconds.append(time.perf_counter() - start)
    path.unlink()
    weights_path(path).unlink()
    return statistics.median(seconds)


def training_command(plan: Plan, work: Path, max_steps: int, resume: bool) -> list[str]:
    command = [
        sys.executable,
        str(REPO / "ddpm_main.py"),
        "--dataset",
        "synthetic",
        "--image_size",
        str(plan.image_size),
        "--model_size",
        plan.model_size,
        "--conditional",
        "--batch_size",
        str(plan.batch_size),
        "--device",
        plan.device,
        "--save_model",
        "--save_every_steps",
        "500",
        "--max_steps",
        str(max_steps),
        "--run_name",
        RUN_NAME,
        "--save_dir",
        str(work / "outputs"),
        "--models_dir",
        str(work / "models"),
    ]
    command += plan.cli_toy_flags
    if plan.train_compile and not resume:
        command.append("--compile")
    return command + (["--resume"] if resume else [])


def planned_steps(plan: Plan, ctx: dict, checkpoint_s: float, steps_per_epoch: int) -> tuple[int, str]:
    """--max_steps for TRAIN_STEPS_S of steps and checkpoints (one per epoch, one per 500 steps) at step 1's
    images/s."""
    if plan.train_steps is not None:
        return plan.train_steps, "fixed (--quick)"
    rate = ctx.get("train_images_per_s")
    if not rate:
        return plan.fallback_train_steps, "fallback: step 1 measured no images/s"
    per_step = plan.batch_size / rate + checkpoint_s * (1 / steps_per_epoch + 1 / 500)
    return max(
        10, int(TRAIN_STEPS_S / per_step)
    ), f"{TRAIN_STEPS_S} s at {rate:.0f} images/s, {checkpoint_s:.2f} s per checkpoint"


def step_training(plan: Plan, ctx: dict, out: Path, work: Path, say: Callable[[str], None]) -> dict:
    """The CLI run (figures from its metrics log), its last grid copied to --out, then --resume for a few more steps."""
    device = torch.device(plan.device)
    parts = training_parts(plan, device)
    take_step(parts, plan.batch_size, plan.image_size)  # the optimizer state exists, as in a checkpoint of a run
    checkpoint_s = checkpoint_write_seconds(parts, work)
    del parts
    free_device_memory()
    steps_per_epoch = len(load_datasets("synthetic", work, plan.image_size).train) // plan.batch_size
    max_steps, planned = planned_steps(plan, ctx, checkpoint_s, steps_per_epoch)
    say(f"checkpoint write {checkpoint_s:.2f} s; --max_steps {max_steps} ({planned})")
    timeout = plan.timeout_scale * STEP_BUDGET_S["training"]
    ctx["checkpoint"] = (
        work / "models" / RUN_NAME / "ckpt.pt"
    )  # step 4 samples whatever the run leaves, even if cut short
    start = time.perf_counter()
    run_command(training_command(plan, work, max_steps, resume=False), out / "logs" / "training.log", timeout, work)
    wall = time.perf_counter() - start
    child_rss_mb = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    )  # Linux: KiB; the largest child so far
    metrics = [json.loads(line) for line in (work / "outputs" / f"metrics_{RUN_NAME}.jsonl").read_text().splitlines()]
    steps = [line for line in metrics if line["kind"] == "step"]
    [end] = [line for line in metrics if line["kind"] == "end"]
    checkpoint = load_checkpoint(work / "models" / RUN_NAME / "ckpt.pt")
    state = checkpoint["train_state"]
    grids = sorted((work / "outputs").glob(f"samples_{RUN_NAME}_epoch*.png"))
    shutil.copyfile(grids[-1], out / "samples_training.png")
    in_steps, outside = end["seconds_in_steps"], end["seconds_outside_steps"]
    steady = statistics.median(line["images_per_s"] for line in steps) if steps else None
    cuda_peaks = [line["peak_memory_mb"] for line in steps if line["peak_memory_mb"] is not None]
    writes = math.ceil(state["step"] / steps_per_epoch) + state["step"] // 500  # one per epoch end, one per 500 steps
    result = {
        "command": shown(training_command(plan, work, max_steps, resume=False), work),
        "max_steps": max_steps,
        "planned": planned,
        "steps": state["step"],
        "steps_per_epoch": steps_per_epoch,
        "wall_s": wall,
        "images_per_s_logged_median": steady,
        "images_per_s_in_steps": state["step"] * plan.batch_size / in_steps,
        "compile_and_warmup_s_estimate": in_steps - state["step"] * plan.batch_size / steady if steady else None,
        "seconds_per_checkpoint_write": checkpoint_s,
        "checkpoint_writes": writes,
        "checkpoint_share_of_run_estimate": writes * checkpoint_s / (in_steps + outside),
        "seconds_in_steps": in_steps,
        "seconds_outside_steps": outside,
        "outside_steps_share": outside / (in_steps + outside),
        "peak_memory_mb": max(cuda_peaks) if cuda_peaks else child_rss_mb,
        "peak_memory_source": "torch.cuda.max_memory_allocated, from the metrics"
        if cuda_peaks
        else "the run's peak resident memory (CPU)",
        "nonfinite_skipped": state["nonfinite_skipped"],
        "nonfinite_ok": state["nonfinite_skipped"] == 0,
        "final_train_loss": steps[-1]["train_loss"] if steps else None,
        "grid": "samples_training.png",
    }
    say(f"trained {state['step']} steps in {wall:.0f} s; resuming for {plan.resume_steps} more")
    resumed_log = run_command(
        training_command(plan, work, max_steps + plan.resume_steps, resume=True),
        out / "logs" / "resume.log",
        timeout,
        work,
    )
    found = re.search(r"continuing .* at step (\d+)", resumed_log)
    final_step = load_checkpoint(work / "models" / RUN_NAME / "ckpt.pt")["train_state"]["step"]
    result["resume"] = {
        "resumed_at_step": int(found.group(1)) if found else None,
        "final_step": final_step,
        "continued": bool(found)
        and int(found.group(1)) == state["step"]
        and final_step == state["step"] + plan.resume_steps,
        "note": "without --compile (it would compile again for a few steps)",
    }
    return result


# Step 4: sampling


def sample(
    loaded: LoadedModel, count: int, sampler: str, steps: int, amp: str, plan: Plan
) -> tuple[torch.Tensor, float]:
    """`count` guided samples (every class in turn, seed 0) through ddpm_sampling.generate; (uint8 images, seconds)."""
    device = torch.device(plan.device)
    settings = SamplingConfig(sampler=sampler, steps=steps, guidance_scale=GUIDANCE_SCALE, amp=amp)
    labels = every_class_in_turn(loaded.description.num_classes, count)
    benchmark.synchronize(device)
    start = time.perf_counter()
    pixels = generate(
        loaded.model,
        loaded.diffusion,
        kind_of_model(loaded.description),
        count,
        labels,
        settings,
        0,
        plan.sample_batch,
        Runtime(device),
        desc=f"{sampler} {amp}",
    )
    return pixels, time.perf_counter() - start


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The largest and the mean difference (in 0-255 levels) of the images both hold (the first ones: the same
    noise)."""
    count = min(len(a), len(b))
    difference = (a[:count].int() - b[:count].int()).abs()
    return {
        "max_pixel_diff": int(difference.max()),
        "mean_pixel_diff": float(difference.float().mean()),
        "images_compared": count,
    }


def step_sampling(plan: Plan, ctx: dict, say: Callable[[str], None]) -> dict:
    """Images/s of both samplers with a bf16 and an fp32 network, and of compiled and CUDA-graph networks."""
    path = ctx.get("checkpoint")
    if path is None or not Path(path).is_file():
        raise RuntimeError("step 3 left no checkpoint to sample from")
    device = torch.device(plan.device)
    loaded = load_model(path, plan.device)
    runs, images = [], {}
    for sampler, steps in plan.samplers:
        for amp in ("bf16", "none"):
            count = plan.sample_count if sampler == plan.samplers[0][0] and amp == "bf16" else plan.variant_count
            if plan.sample_warmup:
                sample(loaded, plan.sample_batch, sampler, steps, amp, plan)
            images[sampler, amp], seconds = sample(loaded, count, sampler, steps, amp, plan)
            runs.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "network": "bf16" if amp == "bf16" else "fp32",
                    "samples": count,
                    "seconds": seconds,
                    "images_per_s": count / seconds,
                }
            )
            say(f"{sampler} {steps} steps, {runs[-1]['network']}: {count} samples in {seconds:.1f} s")
        runs[-2] |= pixel_difference(images[sampler, "bf16"], images[sampler, "none"])  # bf16 against fp32, same noise
    del loaded
    sampler, steps = plan.samplers[0]
    eager = runs[0]["images_per_s"]
    compiled = []
    for name, mode in (("torch.compile", None), ("CUDA graphs (reduce-overhead)", "reduce-overhead")):
        if mode is not None and device.type != "cuda":
            compiled.append({"variant": name, "skipped": "CUDA graphs need a GPU"})
            continue
        torch._dynamo.reset()  # a fresh compilation: nothing of step 1's or the previous variant's is reused
        try:
            default = mode is None and plan.compile_backend == "inductor"  # exactly --inference --compile's load_model
            loaded = load_model(path, plan.device, compile=default)
            if not default:
                loaded.model.compile(backend=plan.compile_backend, mode=mode)
            _, first_batch = sample(loaded, plan.sample_batch, sampler, steps, "bf16", plan)
            pixels, seconds = sample(loaded, plan.variant_count, sampler, steps, "bf16", plan)
        except Exception as error:  # the eager figures above stand; the other variant still runs
            compiled.append({"variant": name, "error": one_line(error)})
            say(f"{name}: FAILED: {compiled[-1]['error']}")
            continue
        finally:
            loaded = None
            free_device_memory()
        compiled.append(
            {
                "variant": name,
                "sampler": sampler,
                "steps": steps,
                "network": "bf16",
                "samples": plan.variant_count,
                "first_batch_s": first_batch,
                "images_per_s": plan.variant_count / seconds,
                "speedup_vs_eager": plan.variant_count / seconds / eager,
                **pixel_difference(pixels, images[sampler, "bf16"]),
            }
        )
        say(f"{name}: first batch {first_batch:.1f} s, {compiled[-1]['images_per_s']:.0f} images/s")
    return {
        "guidance_scale": GUIDANCE_SCALE,
        "batch_size": plan.sample_batch,
        "compile_backend": plan.compile_backend,
        "runs": runs,
        "compiled": compiled,
        "note": "fp32: float32 network (TF32 matmuls on CUDA, as the CLI)"
        f"{'; each run after one untimed batch' if plan.sample_warmup else ''}; "
        "differences against the bf16 run's first images, drawn from the same noise",
    }


# Step 5: the non-finite skip


def bits(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of tensors as raw bytes, so that a comparison is bitwise (-0.0 is not 0.0)."""
    return [t.detach().clone().reshape(-1).view(torch.uint8) for t in tensors]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        value
        for state in optimizer.state_dict()["state"].values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def step_nonfinite(plan: Plan) -> dict:
    """A NaN loss through apply_update (fused AdamW, found_inf on the device) and EMA.update leaves everything
    bit-identical."""
    device = torch.device(plan.device)
    parts = training_parts(plan, device)
    take_step(parts, plan.batch_size, plan.image_size)  # an optimizer state and an EMA that have moved
    groups = {
        "weights": lambda: list(parts.model.parameters()) + list(parts.model.buffers()),
        "optimizer_state": lambda: optimizer_tensors(parts.optimizer),
        "ema": lambda: parts.ema.tensors(parts.ema.module) + [parts.ema.num_updates],
    }
    before = {name: bits(get()) for name, get in groups.items()}
    skip = bool(take_step(parts, plan.batch_size, plan.image_size, poison=True))
    after = {name: bits(get()) for name, get in groups.items()}
    identical = {
        f"{name}_bit_identical": len(before[name]) == len(after[name])
        and all(map(torch.equal, before[name], after[name]))
        for name in groups
    }
    take_step(parts, plan.batch_size, plan.image_size)
    moved = not all(map(torch.equal, after["weights"], bits(groups["weights"]())))
    return {
        "optimizer": f"{type(parts.optimizer).__name__}(fused={parts.optimizer.defaults.get('fused')})",
        "device": str(device),
        "amp": str(parts.amp_dtype or "float32"),
        "skip_flag": skip,
        **identical,
        "bit_identical": all(identical.values()),
        "tensors_compared": sum(len(values) for values in before.values()),
        "next_finite_step_moves_weights": moved,
    }


# Step 6: torchrun


def process_group_check(device: torch.device, folder: Path) -> dict:
    """NCCL (gloo on the CPU) in this one process: init, all-reduce, destroy; a failure is recorded, not raised."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=f"file://{folder / 'store'}", rank=0, world_size=1)
        try:
            value = torch.full((4,), 2.0, device=device)
            dist.all_reduce(value)
            return {"backend": backend, "all_reduce_ok": bool((value == 2.0).all())}
        finally:
            dist.destroy_process_group()
    except Exception as error:
        return {"backend": backend, "all_reduce_ok": False, "error": one_line(error)}


def step_torchrun(plan: Plan, out: Path, work: Path) -> dict:
    """One process under torchrun trains a few steps of the tiny preset and writes its checkpoint."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "ddpm_main.py"),
        "--dataset",
        "synthetic",
        "--image_size",
        str(plan.image_size),
        "--model_size",
        "tiny",
        "--batch_size",
        str(plan.torchrun_batch),
        "--max_steps",
        str(plan.torchrun_steps),
        "--device",
        plan.device,
        "--save_model",
        "--sample_every",
        "0",
        "--run_name",
        "torchrun",
        "--save_dir",
        str(work / "torchrun_outputs"),
        "--models_dir",
        str(work / "models"),
    ]
    start = time.perf_counter()
    run_command(command, out / "logs" / "torchrun.log", plan.timeout_scale * STEP_BUDGET_S["torchrun"], work)
    seconds = time.perf_counter() - start
    checkpoint = load_checkpoint(work / "models" / "torchrun" / "ckpt.pt")
    return {
        "command": shown(command, work),
        "seconds": seconds,
        "steps": checkpoint["train_state"]["step"],
        "planned_steps": plan.torchrun_steps,
        "world_size": checkpoint["runtime"]["world_size"],
        "checkpoint_written": True,
        "process_group": process_group_check(torch.device(plan.device), work),
        "note": "with WORLD_SIZE 1 the tool starts no process group (ddpm_runtime.setup_runtime), so the run itself "
        "does not touch NCCL; process_group checks the backend in this process",
    }


# Reporting


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:{spec}}{suffix}"


def md_throughput(s: dict) -> list[str]:
    """The markdown lines of step throughput."""
    lines: list[str] = []
    c = s["config"]
    lines += [
        f"Training throughput, `{c['model_size']}` preset, batch {c['batch_size']}, "
        f"{c['image_size']}x{c['image_size']}, bf16 autocast (median of {c['rounds']} interleaved rounds):",
        "",
        "| model | images/s | vs UNet2DModel | step ms | peak MB | MFU | first step s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in s["models"].items():
        lines.append(
            f"| {name} | {r['images_per_s']:.0f} | {fmt(r['speedup_vs_unet2dmodel'], '.2f', 'x')} | "
            f"{r['step_ms']:.1f} | {r['peak_memory_mb']:.0f} | "
            f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f', '%')} | {r['first_step_s']:.1f} |"
        )
    lines += ["", f"| target ({s['best']}) | value | goal | met |", "| --- | --- | --- | --- |"]
    for name, t in s["targets"].items():
        lines.append(f"| {name} | {fmt(t['value'], '.2f')} | {t['goal']:g} | {fmt(t['met'])} |")
    lines += [""] + [f"Note: {note}" for note in s["notes"]] + ([""] if s["notes"] else [])
    return lines


def md_profile(s: dict) -> list[str]:
    """The markdown lines of step profile."""
    lines: list[str] = []
    idle = None if s["gpu_idle_share"] is None else 100 * s["gpu_idle_share"]
    lines += [
        f"Profile of {s['steps']} compiled training steps (top kernels: `{s['table']}`):",
        "",
        "| step ms | device busy ms per step | GPU idle (host-bound) |",
        "| --- | --- | --- |",
        f"| {s['step_ms']:.1f} | {fmt(s['device_busy_ms_per_step'])} | {fmt(idle, '.1f', '%')} |",
        "",
        f"Note: {s['note']}",
        "",
    ]
    return lines


def md_training(s: dict) -> list[str]:
    """The markdown lines of step training."""
    lines: list[str] = []
    rows = [
        ("optimizer steps (--max_steps)", f"{s['steps']} ({s['planned']})"),
        ("wall time of the run", fmt(s["wall_s"], ".0f", " s")),
        ("images/s (logged windows, median)", fmt(s["images_per_s_logged_median"], ".0f")),
        ("images/s over all steps (with compilation)", fmt(s["images_per_s_in_steps"], ".0f")),
        ("compilation and warm-up (estimate)", fmt(s["compile_and_warmup_s_estimate"], ".0f", " s")),
        ("seconds per checkpoint write", fmt(s["seconds_per_checkpoint_write"], ".2f")),
        (
            "checkpoint writes, share of the run (estimate)",
            f"{s['checkpoint_writes']}, {100 * s['checkpoint_share_of_run_estimate']:.0f}%",
        ),
        ("time outside optimizer steps", f"{100 * s['outside_steps_share']:.0f}%"),
        ("peak memory", f"{s['peak_memory_mb']:.0f} MB ({s['peak_memory_source']})"),
        ("non-finite steps skipped (must be 0)", f"{s['nonfinite_skipped']}{'' if s['nonfinite_ok'] else ' (WRONG)'}"),
        (
            "resume",
            f"at step {s['resume']['resumed_at_step']}, to {s['resume']['final_step']}: "
            f"{'continued' if s['resume']['continued'] else 'did NOT continue'}",
        ),
    ]
    lines += [
        f"Training run through the CLI (`{s['command']}`), grid `{s['grid']}`:",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value} |" for name, value in rows] + [""]
    return lines


def md_sampling(s: dict) -> list[str]:
    """The markdown lines of step sampling."""
    lines: list[str] = []
    lines += [
        f"Sampling, guided (w={s['guidance_scale']:g}), batch {s['batch_size']}:",
        "",
        "| sampler | network | samples | images/s | max pixel diff bf16 vs fp32 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in s["runs"]:
        lines.append(
            f"| {r['sampler']} {r['steps']} steps | {r['network']} | {r['samples']} | {r['images_per_s']:.1f} | "
            f"{fmt(r.get('max_pixel_diff'), 'd')} |"
        )
    lines += [
        "",
        "| variant | images/s | vs eager bf16 | first batch s | max pixel diff vs eager |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in s["compiled"]:
        if "skipped" in r or "error" in r:
            lines.append(
                f"| {r['variant']} | "
                f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: `' + r['error'] + '`'} | | | |"
            )
        else:
            lines.append(
                f"| {r['variant']} | {r['images_per_s']:.1f} | {r['speedup_vs_eager']:.2f}x | "
                f"{r['first_batch_s']:.1f} | {r['max_pixel_diff']} |"
            )
    lines += ["", f"Note: {s['note']}.", ""]
    return lines


def md_nonfinite_skip(s: dict) -> list[str]:
    """The markdown lines of step nonfinite_skip."""
    lines: list[str] = []
    lines += [
        f"Non-finite step ({s['optimizer']}, {s['device']}, {s['amp']}): skipped {fmt(s['skip_flag'])}; weights, "
        f"optimizer state and EMA bit-identical: {fmt(s['weights_bit_identical'])}, "
        f"{fmt(s['optimizer_state_bit_identical'])}, {fmt(s['ema_bit_identical'])} ({s['tensors_compared']} tensors).",
        "",
    ]
    return lines


def md_torchrun(s: dict) -> list[str]:
    """The markdown lines of step torchrun."""
    lines: list[str] = []
    lines += [
        f"torchrun, one process: {s['steps']} steps and a checkpoint in {s['seconds']:.0f} s; "
        f"{s['process_group']['backend']} all-reduce {'ok' if s['process_group']['all_reduce_ok'] else 'WRONG'}.",
        "",
    ]
    return lines


MARKDOWN = {
    "throughput": md_throughput,
    "profile": md_profile,
    "training": md_training,
    "sampling": md_sampling,
    "nonfinite_skip": md_nonfinite_skip,
    "torchrun": md_torchrun,
}  # step -> its tables, in the order of the report


def markdown(report: dict) -> str:
    """The report as markdown tables, ready to paste into a README."""
    env, steps = report["environment"], report["steps"]
    device = env["gpu"] or env["cpu"]
    lines = [
        f"### GPU check: {device}",
        "",
        f"Driver {env['driver'] or '-'}, torch built for CUDA {env['cuda'] or '-'}, torch {env['torch']}; "
        f"`{report['command']}`, {report['total_s']:.0f} s in all.",
        "",
    ]

    for name, render in MARKDOWN.items():
        if steps.get(name, {}).get("error"):
            lines.extend([f"{name}: failed: `{steps[name]['error']}`", ""])
        elif name in steps:
            lines += render(steps[name])
    lines += ["| step | status | seconds | budget s |", "| --- | --- | --- | --- |"]
    for name, s in steps.items():
        lines.append(f"| {name} | {'failed' if s['error'] else 'ok'} | {s['elapsed_s']:.1f} | {s['budget_s']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv: Optional[list[str]] = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.device or (not args.quick and not torch.cuda.is_available()):
        plan = Plan(**{**asdict(plan), "device": args.device or "cpu"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(plan.device)
    if device.type == "cuda":
        enable_tf32()  # as the CLI does by default
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    command = [sys.executable, *(sys.argv if argv is None else [__file__, *argv])]
    report = {
        "command": shown(command, work),
        "quick": args.quick,
        "plan": asdict(plan),
        "environment": environment(device),
        "steps": {},
        "total_s": 0.0,
    }
    ctx: dict = {}
    steps = {
        "throughput": lambda say: step_throughput(plan, ctx, say),
        "profile": lambda say: step_profile(plan, ctx, out),
        "training": lambda say: step_training(plan, ctx, out, work, say),
        "sampling": lambda say: step_sampling(plan, ctx, say),
        "nonfinite_skip": lambda say: step_nonfinite(plan),
        "torchrun": lambda say: step_torchrun(plan, out, work),
    }
    try:
        for number, (name, run) in enumerate(steps.items(), 1):
            log(started, f"{number}/{len(steps)} {name}: start (budget {STEP_BUDGET_S[name]} s on an H100/H200)")
            step_start = time.perf_counter()
            try:
                result, error = run(lambda message, name=name: log(started, f"    {name}: {message}")), None
            except Exception as exception:  # a step's failure is recorded; the next step runs
                result, error = {}, one_line(exception)
                traceback.print_exc()
            elapsed = time.perf_counter() - step_start
            report["steps"][name] = {"error": error, "elapsed_s": elapsed, "budget_s": STEP_BUDGET_S[name], **result}
            report["total_s"] = time.perf_counter() - started
            write_report(report, out)
            log(started, f"{number}/{len(steps)} {name}: {'FAILED: ' + error if error else 'done'} in {elapsed:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failures = [name for name, step in report["steps"].items() if step["error"]]
    log(
        started,
        f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; "
        + (f"failed: {', '.join(failures)}" if failures else "every step ok"),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
