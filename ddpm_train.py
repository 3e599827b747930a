"""The training loop: data order, optimisation, EMA, evaluation, checkpoints, resume and samples.

One straight loop over optimizer steps. Everything a run needs to continue bit-identically
(weights, EMA, optimizer, LR schedule, grad scaler, position in the data order, loss history,
random states) goes into its checkpoint; see `TrainState` and `checkpoint_state`.
"""
import argparse
import contextlib
import copy
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ddpm_diffusion import Diffusion
from ddpm_helpers import (
    DataSplits,
    Runtime,
    UsageError,
    append_jsonl,
    autocast_dtype,
    copy_checkpoint,
    gather_rows,
    load_checkpoint,
    save_checkpoint,
    save_image_grid,
    save_json,
    save_loss_plot,
    save_labelled_rows,
    seed_everything,
    setup_runtime,
    to_uint8,
)
from ddpm_model import UNet, count_parameters

EVAL_SEEDS = {"val": 1_000_003, "test": 2_000_003}  # fixed across runs, so loss curves compare
PROGRESSION_COLUMNS = 8  # samples per row of the progression image
EVAL_CHUNK = 250  # evaluation noise is seeded per chunk of this many examples, whatever the batch size
MAX_NONFINITE_STEPS = 20  # this many non-finite losses in a row stop the run
# Flags that define the model, the data or the diffusion: a resumed run must keep them.
FIXED_ON_RESUME = (
    "dataset", "image_size", "conditional", "timesteps", "schedule", "model_size", "base_dim", "dim_mults",
    "num_res_blocks", "attn_resolutions", "loss_type",
)


@dataclass
class TrainState:
    """Where a run is, in plain values, so that it can be saved and restored exactly."""

    step: int = 0
    epoch: int = 0  # epochs completed
    epoch_position: int = 0  # examples of the current epoch already used
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    nonfinite_skipped: int = 0
    best_val_loss: float = math.inf
    history: dict = field(default_factory=lambda: {"epochs": [], "steps": [], "train_loss": [], "val_loss": [], "test_loss": [], "lr": []})
    progression: list = field(default_factory=list)  # (label, uint8 images) rows of the progression image


# Distributed set-up


def unwrap(model: torch.nn.Module) -> UNet:
    return model.module if isinstance(model, DistributedDataParallel) else model


def gather_rng_states(rt: Runtime) -> Optional[list[dict]]:
    """Every rank's random states (each rank draws its own noise and timesteps), so that a run resumed
    with as many processes continues every rank's stream exactly; None for a single process."""
    if rt.world_size == 1:
        return None
    states = [None] * rt.world_size
    dist.all_gather_object(states, rng_state())
    return states


@torch.no_grad()
def check_replicas_identical(modules: list[torch.nn.Module], rt: Runtime) -> None:
    """Raise unless every rank holds bit-identical parameters. DDP keeps replicas equal by construction
    (same initial broadcast, same averaged gradients, same optimizer); this catches what would silently
    break that (a rank-dependent code path, a step skipped on one rank only) before it spoils a long run."""
    sums = torch.stack([p.double().sum() for module in modules for p in module.parameters()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        differing = int((low != high).sum())
        raise RuntimeError(f"rank {rt.rank}: {differing} parameter tensors differ across the {rt.world_size} processes after training")


# Data order


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a function of (seed, epoch) alone, so resuming needs only the position."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def epoch_batches(num_examples: int, batch_size: int, rt: Runtime, seed: int, epoch: int, start: int,
                  device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (position after the batch, this rank's indices on `device`, where the images are) for the rest
    of an epoch; the last partial batch is dropped. The order moves to the device once per epoch, not per step."""
    order = epoch_permutation(num_examples, seed, epoch).to(device)
    global_batch = batch_size * rt.world_size
    for begin in range(start, num_examples - global_batch + 1, global_batch):
        yield begin + global_batch, order[begin + rt.rank : begin + global_batch : rt.world_size]


def load_batch(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, hflip: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float in [-1, 1] on `device`, each flipped left-right with probability 1/2 when hflip."""
    x = images[indices.to(images.device)].to(device, non_blocking=True).float().div_(127.5).sub_(1)
    if hflip:
        flip = torch.rand(x.shape[0], device=device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x, labels[indices.to(labels.device)].to(device, non_blocking=True)


# Optimisation


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g, with decoupled
    weight decay. Use an lr about 3-10x smaller than AdamW's.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One update; none where `self.found_inf` (set before the step, as GradScaler does for the fused
        optimizers) is 1, decided on the device."""
        skip = getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                updated = p * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * exp_avg.lerp(p.grad, 1 - beta1).sign_()
                updated_exp_avg = exp_avg.lerp(p.grad, 1 - beta2)
                if skip is not None:
                    updated = torch.where(skip.bool(), p, updated)
                    updated_exp_avg = torch.where(skip.bool(), exp_avg, updated_exp_avg)
                p.copy_(updated)
                exp_avg.copy_(updated_exp_avg)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    betas = (args.beta1, args.beta2)
    if args.optimizer == "lion":
        return Lion(model.parameters(), lr=args.lr, betas=betas, weight_decay=args.weight_decay)
    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    # fused: the whole update in one kernel per tensor, on CUDA and (PyTorch >= 2.4) on the CPU, where it is 1.8x foreach
    return optimizer_class(model.parameters(), lr=args.lr, betas=betas, weight_decay=args.weight_decay, fused=True)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up over `warmup_steps`, then constant, cosine decay to 0, or x0.1 at 50% and 75%."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


class EMA:
    """Exponential moving average of the weights, starting from the initial weights, with warm-up:
    decay_n = min(decay, (1 + n) / (10 + n)) after n updates (as TensorFlow's ExponentialMovingAverage with
    num_updates), so short runs are not dominated by the initial weights.

    The update count lives on the device and an update can be cancelled there (`skip`, a step whose loss or
    gradient was not finite), so updating never waits for the GPU. torch.optim.swa_utils.AveragedModel reads its
    count on the host at every update, which would stall the training loop once per step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)

    def tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """ema <- ema + (1 - decay_n) (weights - ema), unless `skip` (a bool tensor) is true."""
        n = self.num_updates
        weight = 1 - torch.clamp((1 + n) / (10 + n), max=self.decay)
        if skip is not None:
            weight = weight * ~skip
        ema_tensors = self.tensors(self.module)
        deltas = torch._foreach_sub(self.tensors(model), ema_tensors)
        torch._foreach_mul_(deltas, weight)
        torch._foreach_add_(ema_tensors, deltas)
        self.num_updates += 1 if skip is None else ~skip


# Evaluation and samples


@torch.no_grad()
def evaluate(model: torch.nn.Module, diffusion: Diffusion, dataset, args: argparse.Namespace, rt: Runtime, seed: int) -> float:
    """Mean loss over a dataset with fixed timesteps and noise per example (seeded per chunk), so the
    number changes only when the weights do. Chunks are shared out across ranks."""
    was_training = model.training
    model.eval()
    images, labels = dataset.images, dataset.labels
    total, count = torch.zeros((), device=rt.device, dtype=torch.float64), 0
    null_label = unwrap(model).null_label
    for chunk, begin in enumerate(range(0, len(images), EVAL_CHUNK)):
        if chunk % rt.world_size != rt.rank:
            continue
        generator = torch.Generator().manual_seed(seed * 7_919 + chunk)
        indices = torch.arange(begin, min(begin + EVAL_CHUNK, len(images)))
        t = torch.randint(0, diffusion.num_timesteps, (len(indices),), generator=generator)
        noise = torch.randn((len(indices), *images.shape[1:]), generator=generator)
        for part in torch.split(torch.arange(len(indices)), args.batch_size):
            x0, y = load_batch(images, labels, indices[part], False, rt.device)
            y = y if null_label is not None else None
            loss = diffusion.p_losses(model, x0, t[part].to(rt.device), y, noise[part].to(rt.device), args.loss_type)
            total += loss.double() * len(part)
        count += len(indices)
    if rt.world_size > 1:
        stats = torch.stack([total, torch.tensor(float(count), device=rt.device, dtype=torch.float64)])
        dist.all_reduce(stats)
        total, count = stats[0], stats[1].item()
    model.train(was_training)
    return total.item() / max(count, 1)


def sample_grid(model: torch.nn.Module, diffusion: Diffusion, args: argparse.Namespace, data: DataSplits, rt: Runtime) -> torch.Tensor:
    """A grid of `num_samples` images from fixed noise (every class in turn for a conditional model).

    With several processes each rank samples an equal slice (its own fixed noise) and the slices are
    gathered, so the grid takes 1/world_size of the time; a single process samples them all."""
    was_training = model.training
    model.eval()
    per_rank = math.ceil(args.num_samples / rt.world_size)
    labels = None
    if args.conditional:
        labels = torch.arange(rt.rank * per_rank, (rt.rank + 1) * per_rank, device=rt.device) % data.num_classes
    images = diffusion.sample(
        model, (per_rank, data.channels, data.image_size, data.image_size), labels=labels,
        guidance_scale=args.guidance_scale, sampler=args.sampler, steps=args.sampling_steps, eta=args.eta,
        generator=torch.Generator().manual_seed(args.seed + 1_000_003 * rt.rank), device=rt.device,
    )
    model.train(was_training)
    return gather_rows(images, rt)[: args.num_samples]


# Checkpoints


def rng_state() -> dict:
    """Every random state a step draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_description(model: UNet, args: argparse.Namespace, data: DataSplits) -> dict:
    """What `--inference --model_path` needs to rebuild the model and the diffusion."""
    return {
        "model_config": model.config,
        "diffusion": {"timesteps": args.timesteps, "schedule": args.schedule},
        "data": {"dataset": args.dataset, "class_names": list(data.class_names), "image_size": data.image_size, "channels": data.channels},
        "conditional": bool(args.conditional),
    }


def checkpoint_state(model, ema, optimizer, scheduler, scaler, state: TrainState, args, data) -> dict:
    return {
        **model_description(unwrap(model), args, data),
        "model": unwrap(model).state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_num_updates": int(ema.num_updates) if ema is not None else 0,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": asdict(state),
        "config": vars(args),
        "rng": rng_state(),
    }


def check_resume_compatible(saved_config: dict, args: argparse.Namespace, path: Path) -> None:
    for name in FIXED_ON_RESUME:
        if name in saved_config and saved_config[name] != getattr(args, name):
            raise UsageError(
                f"cannot resume {path}: it was trained with --{name} {saved_config[name]}, not {getattr(args, name)} "
                f"(flags that define the model, data or diffusion must stay the same)"
            )


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (a second Ctrl-C kills).

    With several processes all ranks must stop after the same step, even when only one got the signal.
    Their flags are summed by an all-reduce on the CPU (rt.control_group, gloo) that is started at one step
    and read at the next: a stop lands one step later, and the check never waits for the GPU.
    """

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.signal_name: Optional[str] = None
        self.previous = {}
        self.flags: Optional[torch.Tensor] = None
        self.pending = None

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        if self.pending is not None:
            self.pending.wait()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether this process (single) or any rank, as of the previous step (distributed), was asked to stop.
        Every rank calls this once per step."""
        asked = self.signal_name is not None
        if self.rt.world_size == 1:
            return asked
        agreed = False
        if self.pending is not None:
            self.pending.wait()
            agreed = self.flags.item() > 0
        self.flags = torch.tensor([float(asked)])
        self.pending = dist.all_reduce(self.flags, group=self.rt.control_group, async_op=True)
        return agreed


# The loop


def load_resume_checkpoint(args: argparse.Namespace) -> Optional[tuple[Path, dict]]:
    """The checkpoint `--resume` names (default: the run's ckpt.pt), checked against the flags; None
    without --resume. A new run refuses to overwrite an existing run's checkpoint."""
    last_path = Path(args.models_dir) / args.run_name / "ckpt.pt"
    if args.resume is None:
        if last_path.exists() and args.save_model:
            raise UsageError(f"{last_path} exists: pass --resume to continue that run, or choose another --run_name")
        return None
    path = last_path if args.resume == "auto" else Path(args.resume)
    checkpoint = load_checkpoint(path)
    if "train_state" not in checkpoint:
        raise UsageError(f"cannot resume {path}: it holds weights only, not a training state")
    check_resume_compatible(checkpoint["config"], args, path)
    return path, checkpoint


def train(args: argparse.Namespace, data: DataSplits, resume: Optional[tuple[Path, dict]] = None) -> Path | None:
    """Train as `args` say, from scratch or from `resume` (see load_resume_checkpoint); return the
    path of the last checkpoint (None without --save_model)."""
    rt = setup_runtime(args.device)
    args.world_size = rt.world_size
    run_dir = Path(args.models_dir) / args.run_name
    last_path = run_dir / "ckpt.pt"
    resume_path, checkpoint = resume if resume is not None else (None, None)

    num_classes = data.num_classes if args.conditional else None
    seed_everything(args.seed)  # the same initial weights (and so EMA) on every rank; then each rank its own noise
    model = UNet(in_channels=data.channels, image_size=data.image_size, num_classes=num_classes, **args.model_config).to(rt.device)
    seed_everything(args.seed + rt.rank)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = Diffusion(args.timesteps, args.schedule).to(rt.device)
    optimizer = build_optimizer(args, model)
    steps_per_epoch = len(data.train) // (args.batch_size * rt.world_size) // args.grad_accum
    if steps_per_epoch == 0:
        raise UsageError(
            f"the training set has {len(data.train)} images, fewer than one optimizer step needs "
            f"(--batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {rt.world_size} processes)"
        )
    total_steps = args.max_steps if args.max_steps else args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, total_steps, args.lr_schedule)
    )
    amp_dtype = autocast_dtype(args.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None

    state = TrainState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if ema is not None and checkpoint["ema"] is not None:
            ema.module.load_state_dict(checkpoint["ema"])
            ema.num_updates.fill_(checkpoint["ema_num_updates"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState(**checkpoint["train_state"])
        if state.epoch_position > 0 and state.history["epochs"] and state.history["epochs"][-1] > state.epoch:
            for values in state.history.values():  # a partial epoch's entry is replaced when the epoch ends
                values.pop()
        if rt.world_size == checkpoint["config"].get("world_size", 1):
            restore_rng_state(checkpoint["rng"] if rt.world_size == 1 else checkpoint["rng_per_rank"][rt.rank])
        else:  # another process count: a fresh stream per rank, not a replay of the run's first steps
            seed_everything((args.seed + rt.rank + 7_919 * state.step) % 2**32)
        for group in optimizer.param_groups:  # the lr may change on resume
            group["initial_lr"] = args.lr
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)

    if not args.max_steps:  # the lr lambda reads total_steps when called, so it sees this value
        total_steps = state.step + steps_to_go(args, state, steps_per_epoch, args.batch_size * rt.world_size * args.grad_accum)
    if rt.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if args.compile:  # in place, so state_dict keys stay the plain model's; after DDP so the compiled graphs overlap its all-reduce
        model.compile()
    eval_model = lambda: ema.module if ema is not None and not args.no_ema else unwrap(model)  # noqa: E731

    if rt.is_main:
        print(f"model: {count_parameters(unwrap(model)) / 1e6:.2f}M parameters ({args.model_size} preset"
              f"{', conditional on ' + str(num_classes) + ' classes' if num_classes else ''}); "
              f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images of "
              f"{data.channels}x{data.image_size}x{data.image_size}; {steps_per_epoch} steps per epoch, {total_steps} in all")
        if checkpoint is not None:
            print(f"resuming {resume_path} at step {state.step} (epoch {state.epoch + 1})")
    save_dir = Path(args.save_dir)

    counters = StepCounters(rt.device)

    def read_counters() -> None:
        """Bring the on-device step figures into `state` (a host sync); stop a run whose steps keep failing."""
        skipped, longest = counters.read_into(state)
        if skipped and rt.is_main:
            tqdm.write(f"step {state.step}: {skipped} step(s) skipped since the last report, for a non-finite loss or "
                       f"gradient ({state.nonfinite_skipped} so far)")
        if longest >= MAX_NONFINITE_STEPS:
            raise UsageError(
                f"{longest} non-finite losses in a row by step {state.step}: stopping; "
                f"the last checkpoint is kept (try a lower --lr, or --amp bf16/none)"
            )

    def save(path: Path) -> None:
        read_counters()
        rng_per_rank = gather_rng_states(rt)  # a collective: every rank calls save, rank 0 writes
        if rt.is_main:
            save_checkpoint(checkpoint_state(model, ema, optimizer, scheduler, scaler, state, args, data) | {"rng_per_rank": rng_per_rank}, path)

    train_images = data.train.images.to(rt.device) if args.data_on_device else data.train.images
    train_labels = data.train.labels.to(rt.device) if args.data_on_device else data.train.labels
    examples_per_step = args.batch_size * rt.world_size * args.grad_accum
    epoch_examples = steps_per_epoch * examples_per_step
    model.train()
    with StopRequest(rt) as stop:
        while state.step < total_steps:
            batches = epoch_batches(len(data.train), args.batch_size, rt, args.seed, state.epoch, state.epoch_position, train_images.device)
            remaining = min((epoch_examples - state.epoch_position) // examples_per_step, total_steps - state.step)
            bar = tqdm(total=remaining, desc=f"epoch {state.epoch + 1}", disable=not rt.is_main, dynamic_ncols=True, leave=False)
            window_start, window_steps = time.perf_counter(), 0
            for _ in range(remaining):
                loss, grad_norm, skip = train_step(model, diffusion, optimizer, scaler, batches, train_images, train_labels,
                                                   data, state, args, rt, amp_dtype)
                if ema is not None:
                    ema.update(unwrap(model), skip)
                counters.record(loss, skip)
                scheduler.step()
                state.step += 1
                window_steps += 1
                bar.update(1)
                if state.step % args.log_interval == 0:
                    read_counters()
                    images_per_s = window_steps * examples_per_step / (time.perf_counter() - window_start)
                    log_step(bar, loss, grad_norm, skip, images_per_s, scheduler, state, args, rt, save_dir)
                    window_start, window_steps = time.perf_counter(), 0
                if args.save_model and args.save_every_steps and state.step % args.save_every_steps == 0:
                    save(last_path)
                if stop.requested():
                    bar.close()
                    save(last_path)
                    if rt.world_size > 1:  # no rank exits (and makes torchrun stop the others) before rank 0 has written
                        dist.barrier(group=rt.control_group)
                    if rt.is_main:
                        reason = f"{stop.signal_name} received" if stop.signal_name else "another process was signalled"
                        print(f"{reason}: stopped after step {state.step}; checkpoint saved to {last_path}; "
                              f"resume with the same command plus --resume", file=sys.stderr)
                    raise SystemExit(130 if stop.signal_name == "SIGINT" else 143)
            bar.close()
            read_counters()

            epoch_done = epoch_examples - state.epoch_position < examples_per_step
            record_epoch(eval_model(), diffusion, state, args, data, rt, scheduler, epoch_done, save_dir)
            if epoch_done:  # advance before saving, so a checkpoint taken here resumes at the next epoch
                state.epoch += 1
                state.epoch_position = 0
                state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
            is_best = state.history["val_loss"][-1] < state.best_val_loss
            if is_best:  # before saving, so a resumed run compares against the true best
                state.best_val_loss = state.history["val_loss"][-1]
            if args.save_model:
                save(last_path)
                if rt.is_main and is_best:
                    copy_checkpoint(last_path, run_dir / "best.pt")
                if rt.is_main and epoch_done and state.epoch % args.save_every == 0:
                    copy_checkpoint(last_path, run_dir / f"ckpt_epoch{state.epoch:04d}.pt")
                    prune_snapshots(run_dir, args.keep_checkpoints)
    if rt.is_main:
        if state.progression:
            save_labelled_rows(state.progression, save_dir / f"progression_{args.run_name}.png")
        if args.save_model:
            print(f"checkpoint: {last_path}")
    if rt.world_size > 1:
        check_replicas_identical([unwrap(model)] + ([ema.module] if ema is not None else []), rt)
        dist.destroy_process_group()
    return last_path if args.save_model else None


def steps_to_go(args: argparse.Namespace, state: TrainState, steps_per_epoch: int, examples_per_step: int) -> int:
    """Optimizer steps left until --epochs are done, from the position in the data order. Counted afresh
    because a run resumed with another number of processes takes steps of another size than it saved."""
    if state.epoch >= args.epochs:
        return 0
    rest_of_epoch = (steps_per_epoch * examples_per_step - state.epoch_position) // examples_per_step
    return rest_of_epoch + (args.epochs - state.epoch - 1) * steps_per_epoch


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label becomes the null label with probability p_uncond."""
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def train_step(model, diffusion, optimizer, scaler, batches, train_images, train_labels, data, state, args, rt, amp_dtype):
    """One optimizer step over `grad_accum` micro-batches, queued on the device without waiting for it.

    Returns (mean loss, grad norm, skip). `skip` is a bool tensor, true when the loss or the gradients were
    not finite (including fp16 gradients that overflowed, for which GradScaler lowers its scale); the
    optimizer then leaves the weights and its own state exactly as they were. The decision is made on the
    device, through the `found_inf` that fused Adam(W) and Lion read, so no step waits for the GPU.
    """
    null_label = unwrap(model).null_label
    loss = torch.zeros((), device=rt.device)
    optimizer.zero_grad(set_to_none=True)
    for micro in range(args.grad_accum):
        state.epoch_position, indices = next(batches)
        x0, labels = load_batch(train_images, train_labels, indices, data.train.hflip, rt.device)
        if args.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = drop_labels(labels, args.p_uncond, null_label) if null_label is not None else None
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=rt.device)
        last_micro = micro == args.grad_accum - 1
        with maybe_no_sync(model, last_micro), torch.autocast(rt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            micro_loss = diffusion.p_losses(model, x0, t, labels, loss_type=args.loss_type)
        scaler.scale(micro_loss / args.grad_accum).backward()
        loss += micro_loss.detach().float() / args.grad_accum
    if rt.world_size > 1:
        dist.all_reduce(loss)
        loss /= rt.world_size
    grad_norm, skip = apply_update(model, optimizer, scaler, loss, args.grad_clip)
    return loss, grad_norm, skip


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
                 grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale and clip the gradients, then step, unless the loss or the gradients are not finite; all on
    the device. Returns (grad norm, skip)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    optimizer.found_inf = skip.float()
    optimizer.step()
    scaler.update()
    return grad_norm, skip


class StepCounters:
    """What every step adds to the run's figures, kept on the device and read (a host sync) only at log
    intervals, epoch ends and checkpoints: the loss of applied steps, and the steps skipped."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps in a row, up to the last one
        self.longest_streak = torch.zeros((), dtype=torch.int64, device=device)  # since the last read

    def record(self, loss: torch.Tensor, skip: torch.Tensor) -> None:
        self.loss_sum += torch.where(skip, 0.0, loss.double())
        self.loss_count += ~skip
        self.skipped += skip
        self.streak.add_(1).mul_(skip)
        torch.maximum(self.longest_streak, self.streak, out=self.longest_streak)

    def read_into(self, state: TrainState) -> tuple[int, int]:
        """Add the figures since the last read to `state`; return (steps skipped since then, longest run of skips)."""
        loss_sum, count, skipped, longest = torch.stack(
            [self.loss_sum, self.loss_count.double(), self.skipped.double(), self.longest_streak.double()]).tolist()
        state.epoch_loss_sum += loss_sum
        state.epoch_loss_count += int(count)
        state.nonfinite_skipped += int(skipped)
        for counter in (self.loss_sum, self.loss_count, self.skipped):
            counter.zero_()
        self.longest_streak.copy_(self.streak)
        return int(skipped), int(longest)


def maybe_no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def log_step(bar, loss, grad_norm, skip, images_per_s, scheduler, state, args, rt, save_dir: Path) -> None:
    """Progress-bar figures and one JSON line of metrics, every --log_interval steps (the only per-step host syncs)."""
    lr = scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
    if rt.is_main:
        append_jsonl(save_dir / f"metrics_{args.run_name}.jsonl", {
            "kind": "step", "step": state.step, "epoch": state.epoch + 1, "train_loss": loss.item(), "lr": lr,
            "grad_norm": None if skip.item() else grad_norm.item(), "images_per_s": images_per_s,
            "peak_memory_mb": peak_memory_mb(rt.device), "nonfinite_skipped": state.nonfinite_skipped,
        })


def record_epoch(eval_model, diffusion, state: TrainState, args, data: DataSplits, rt: Runtime, scheduler, epoch_done: bool, save_dir: Path) -> None:
    """Validation and test loss, the loss history, the loss plot and (every --sample_every epochs) a sample grid."""
    val_loss = evaluate(eval_model, diffusion, data.val, args, rt, seed=EVAL_SEEDS["val"])
    test_loss = evaluate(eval_model, diffusion, data.test, args, rt, seed=EVAL_SEEDS["test"])
    train_loss = state.epoch_loss_sum / state.epoch_loss_count if state.epoch_loss_count else math.nan
    epochs_value = state.epoch + 1 if epoch_done else round(state.epoch + state.epoch_position / len(data.train), 4)
    for key, value in (("epochs", epochs_value), ("steps", state.step), ("train_loss", train_loss),
                       ("val_loss", val_loss), ("test_loss", test_loss), ("lr", scheduler.get_last_lr()[0])):
        state.history[key].append(value)
    take_sample = epoch_done and args.sample_every > 0 and (state.epoch + 1) % args.sample_every == 0
    final = state.step >= (args.max_steps or math.inf) or (epoch_done and state.epoch + 1 >= args.epochs and not args.max_steps)
    images = sample_grid(eval_model, diffusion, args, data, rt) if (take_sample or final) and args.sample_every > 0 else None
    if not rt.is_main:
        return
    print(f"epoch {epochs_value} | step {state.step} | train {train_loss:.5f} | val {val_loss:.5f} | test {test_loss:.5f}")
    save_json(state.history, save_dir / f"loss_history_{args.run_name}.json")
    save_loss_plot(state.history, save_dir / f"loss_curve_{args.run_name}.png", args.run_name)
    append_jsonl(save_dir / f"metrics_{args.run_name}.jsonl", {
        "kind": "epoch", "step": state.step, "epoch": epochs_value, "train_loss": train_loss, "val_loss": val_loss,
        "test_loss": test_loss, "lr": scheduler.get_last_lr()[0], "peak_memory_mb": peak_memory_mb(rt.device),
    })
    if images is not None:
        save_image_grid(images, save_dir / f"samples_{args.run_name}_epoch{state.epoch + 1:04d}.png")
        state.progression.append((f"epoch {epochs_value:g}", to_uint8(images[:PROGRESSION_COLUMNS].cpu())))


def prune_snapshots(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` per-epoch snapshots (ckpt.pt and best.pt are separate and always kept)."""
    for old in sorted(run_dir.glob("ckpt_epoch*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
