"""The training loop: data order, optimisation, EMA, evaluation, checkpoints, resume and samples.

`train` reads top to bottom in named phases: build the run (`build_run`), restore it from a checkpoint
(`restore_run`), fix the number of steps and the LR schedule, then the step loop (`run_steps`, one
`train_step` per optimizer step), the end of each epoch (`end_epoch`) and the end of training
(`finish_training`). Everything a run needs to continue bit-identically (weights, EMA, optimizer, LR
schedule, grad scaler, position in the data order, loss history, random states) goes into its
checkpoint; see `TrainState` and `checkpoint_state`.
"""
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

from ddpm_config import RunConfig, TrainConfig, current_settings, fixed_settings
from ddpm_diffusion import Diffusion
from ddpm_helpers import (
    DataSplits,
    Runtime,
    UsageError,
    append_jsonl,
    autocast_dtype,
    copy_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    save_image_grid,
    save_json,
    save_labelled_rows,
    save_loss_plot,
    save_weights,
    seed_everything,
    weights_path,
)
from ddpm_model import UNet, count_parameters
from ddpm_sampling import every_class_in_turn, generate

EVAL_SEEDS = {"val": 1_000_003, "test": 2_000_003}  # fixed across runs, so loss curves compare
PROGRESSION_COLUMNS = 8  # samples per row of the progression image
EVAL_CHUNK = 250  # evaluation noise is seeded per chunk of this many examples, whatever the batch size
MAX_NONFINITE_STEPS = 20  # this many non-finite losses in a row stop the run
EVAL_BUDGET = 0.05  # validation and test losses may take at most this share of the training time (evaluation_interval)
GRID_IMAGES = 16  # images per sample grid of an unconditional model (two per class for a conditional one)


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


def build_optimizer(train: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """--optimizer with --lr, --beta1, --beta2 and --weight_decay."""
    betas = (train.beta1, train.beta2)
    if train.optimizer == "lion":
        return Lion(model.parameters(), lr=train.lr, betas=betas, weight_decay=train.weight_decay)
    optimizer_class = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    # fused: the whole update in one kernel per tensor, on CUDA and (PyTorch >= 2.4) on the CPU, where it is 1.8x foreach
    return optimizer_class(model.parameters(), lr=train.lr, betas=betas, weight_decay=train.weight_decay, fused=True)


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


EMA_HALFLIFE_RATIO = 0.05  # the default EMA averages over a half-life of 5% of the steps so far (EDM's ema_rampup_ratio)
EMA_MAX_DECAY = 0.9999  # ... at most the half-life of Ho et al.'s decay (6,931 steps)
WARMUP_FRACTION, MAX_WARMUP_STEPS = 0.05, 5000  # the default warm-up: 5% of the planned steps, at most Ho et al.'s


def derived_warmup(total_steps: int) -> int:
    """--warmup_steps when not given: a few percent of the run, so that a short run is not spent warming up."""
    return min(MAX_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * total_steps))


class EMA:
    """Exponential moving average of the weights, starting from the initial weights, with one of two warm-ups
    after n updates:

    * `halflife_ratio` r (the default): a half-life of r * n steps, decay_n = min(decay, 0.5 ** (1 / (r n))), the
      ramp-up of Karras et al. 2022 (EDM, ema_rampup_ratio): the average covers the last few percent of the run
      whatever its length, so a 600-step run and an 800k-step run both sample from well-trained weights;
    * without it: decay_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with
      num_updates, as Ho et al.'s code), which at 0.9999 averages over the last ~10,000 steps once n is large.

    The update count lives on the device and an update can be cancelled there (`skip`, a step whose loss or
    gradient was not finite), so updating never waits for the GPU. torch.optim.swa_utils.AveragedModel reads its
    count on the host at every update, which would stall the training loop once per step.
    """

    def __init__(self, model: torch.nn.Module, decay: float, halflife_ratio: Optional[float] = None):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.halflife_ratio = halflife_ratio
        self.num_updates = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)

    def tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """ema <- ema + (1 - decay_n) (weights - ema), unless `skip` (a bool tensor) is true."""
        n = self.num_updates
        if self.halflife_ratio is None:
            decay = (1 + n) / (10 + n)
        else:
            decay = 0.5 ** (1 / (self.halflife_ratio * n).clamp(min=1e-8))
        weight = 1 - torch.clamp(decay, max=self.decay)
        if skip is not None:
            weight = weight * ~skip
        ema_tensors = self.tensors(self.module)
        deltas = torch._foreach_sub(self.tensors(model), ema_tensors)
        torch._foreach_mul_(deltas, weight)
        torch._foreach_add_(ema_tensors, deltas)
        self.num_updates += 1 if skip is None else ~skip


# Evaluation and samples


@torch.no_grad()
def evaluate(model: torch.nn.Module, diffusion: Diffusion, dataset, rt: Runtime, *, seed: int, batch_size: int, loss_type: str) -> float:
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
        for part in torch.split(torch.arange(len(indices)), batch_size):
            x0, y = load_batch(images, labels, indices[part], False, rt.device)
            y = y if null_label is not None else None
            loss = diffusion.p_losses(model, x0, t[part].to(rt.device), y, noise[part].to(rt.device), loss_type)
            total += loss.double() * len(part)
        count += len(indices)
    if rt.world_size > 1:
        stats = torch.stack([total, torch.tensor(float(count), device=rt.device, dtype=torch.float64)])
        dist.all_reduce(stats)
        total, count = stats[0], stats[1].item()
    model.train(was_training)
    return total.item() / count if count else math.nan  # NaN: an empty split (--val_fraction 0)


def sample_grid(model: UNet, diffusion: Diffusion, config: RunConfig, count: int, data: DataSplits, rt: Runtime) -> torch.Tensor:
    """`count` images (uint8, N x H x W x C; every class in turn for a conditional model) through the
    sampling path of --inference, with its flags and the run's seed: the same noise at every grid, any
    number of processes (each samples a share of the batches)."""
    was_training = model.training
    model.eval()
    labels = every_class_in_turn(data.num_classes if config.model.conditional else None, count)
    pixels = generate(model, diffusion, (data.channels, data.image_size, data.image_size), count, labels,
                      config.sampling, config.train.seed, config.train.batch_size, rt, desc="sample grid")
    model.train(was_training)
    return pixels


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


def model_description(model: UNet, config: RunConfig, data: DataSplits) -> dict:
    """What `--inference --model_path` needs to rebuild the model and the diffusion."""
    return {
        "model_config": model.config,
        "diffusion": {"timesteps": config.diffusion.timesteps, "schedule": config.diffusion.schedule,
                      "prediction_type": config.diffusion.prediction_type, "variance": config.diffusion.variance},
        "data": {"dataset": config.data.dataset, "class_names": list(data.class_names), "image_size": data.image_size, "channels": data.channels},
        "conditional": config.model.conditional,
    }


def check_resume_compatible(saved_config: dict, config: RunConfig, path: Path) -> None:
    """Settings that define the model, the data or the diffusion must be those the checkpoint was trained with."""
    now = current_settings(config)
    for flag, saved in fixed_settings(saved_config).items():
        if flag in now and saved != now[flag]:
            raise UsageError(f"cannot resume {path}: it was trained with --{flag} {saved}, not {now[flag]} "
                             f"(flags that define the model, data or diffusion must stay the same)")


def load_resume_checkpoint(config: RunConfig) -> Optional[tuple[Path, dict]]:
    """The checkpoint --resume names (default: the run's ckpt.pt), checked against the configuration; None
    without --resume. A new run refuses to overwrite an existing run's checkpoint."""
    train = config.train
    last_path = Path(train.models_dir) / train.run_name / "ckpt.pt"
    if train.resume is None:
        if last_path.exists() and train.save_model:
            raise UsageError(f"{last_path} exists: pass --resume to continue that run, or choose another --run_name")
        return None
    path = last_path if train.resume == "auto" else Path(train.resume)
    checkpoint = load_checkpoint(path)
    if "train_state" not in checkpoint:
        raise UsageError(f"cannot resume {path}: it holds weights only, not a training state")
    check_resume_compatible(checkpoint["config"], config, path)
    return path, checkpoint


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



# The run


@dataclass
class EpochData:
    """Where train_step takes its micro-batches from: the rest of this epoch's order, and the training set
    (moved to the GPU once where the runtime keeps data on the device)."""

    batches: Iterator[tuple[int, torch.Tensor]]
    images: torch.Tensor
    labels: torch.Tensor
    hflip: bool


@dataclass
class TrainingRun:
    """What a run is made of: built by build_run, loaded by restore_run, advanced by the phases of train."""

    config: RunConfig
    data: DataSplits
    rt: Runtime
    model: torch.nn.Module  # the UNet; wrapped in DistributedDataParallel under torchrun, compiled in place with --compile
    diffusion: Diffusion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: Optional[EMA]
    amp_dtype: Optional[torch.dtype]
    state: TrainState
    counters: StepCounters
    steps_per_epoch: int
    examples_per_step: int  # batch_size x grad_accum x processes
    total_steps: int
    warmup_steps: int  # --warmup_steps, or derived from total_steps
    eval_every: int  # epochs between validation and test losses (evaluation_interval)
    grid_count: int  # images per sample grid: --num_samples, or 16, or two per class
    train_images: torch.Tensor
    train_labels: torch.Tensor
    started: float = field(default_factory=time.perf_counter)  # wall clock of this process's start, for the time split
    seconds_in_steps: float = 0.0  # of that, the time spent in optimizer steps
    tensorboard: Optional["TensorBoardLog"] = None  # --logger tensorboard, rank 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.models_dir) / self.config.train.run_name

    @property
    def last_path(self) -> Path:
        return self.run_dir / "ckpt.pt"

    @property
    def save_dir(self) -> Path:
        return Path(self.config.train.save_dir)

    @property
    def epoch_examples(self) -> int:
        return self.steps_per_epoch * self.examples_per_step

    def eval_model(self) -> UNet:
        """The weights that validation, test and the sample grids use: the EMA unless --no_ema (or no EMA)."""
        if self.ema is not None and self.config.train.sample_with_ema:
            return self.ema.module
        return unwrap(self.model)


def restored_state(checkpoint: Optional[dict]) -> TrainState:
    """The checkpoint's TrainState (a fresh one without a checkpoint); a partial epoch's history entry is
    dropped, since it is written again when that epoch ends."""
    if checkpoint is None:
        return TrainState()
    state = TrainState(**checkpoint["train_state"])
    if state.epoch_position > 0 and state.history["epochs"] and state.history["epochs"][-1] > state.epoch:
        for values in state.history.values():
            values.pop()
    return state


def steps_to_go(epochs: int, state: TrainState, steps_per_epoch: int, examples_per_step: int) -> int:
    """Optimizer steps left until `epochs` are done, from the position in the data order. Counted afresh
    because a run resumed with another number of processes takes steps of another size than it saved."""
    if state.epoch >= epochs:
        return 0
    rest_of_epoch = (steps_per_epoch * examples_per_step - state.epoch_position) // examples_per_step
    return rest_of_epoch + (epochs - state.epoch - 1) * steps_per_epoch


def evaluation_interval(eval_examples: int, epoch_examples: int) -> int:
    """Epochs between validation and test losses: every epoch unless evaluating them (a forward pass per example,
    about a third of a training step's work per image) would cost more than EVAL_BUDGET of the training time,
    as on small data sets with short epochs."""
    return max(1, math.ceil(eval_examples / (3 * EVAL_BUDGET * epoch_examples)))


def build_run(config: RunConfig, data: DataSplits, rt: Runtime, state: TrainState) -> TrainingRun:
    """The model, EMA, optimizer, LR schedule and the run's counters, for a run that is at `state`."""
    train = config.train
    examples_per_step = train.batch_size * rt.world_size * train.grad_accum
    steps_per_epoch = len(data.train) // examples_per_step
    if steps_per_epoch == 0:
        raise UsageError(f"the training set has {len(data.train)} images, fewer than one optimizer step needs "
                         f"(--batch_size {train.batch_size} x --grad_accum {train.grad_accum} x {rt.world_size} processes)")
    # --max_steps, or the steps left in --epochs from where the run is: fixed before the LR schedule is made
    total_steps = train.max_steps or state.step + steps_to_go(train.epochs, state, steps_per_epoch, examples_per_step)

    warmup_steps = train.warmup_steps if train.warmup_steps is not None else derived_warmup(total_steps)
    seed_everything(train.seed)  # the same initial weights (and so EMA) on every rank; then each rank its own noise
    model = UNet(in_channels=data.channels, image_size=data.image_size, num_classes=data.num_classes if config.model.conditional else None,
                 **config.model.unet_kwargs(data.image_size)).to(rt.device)
    seed_everything(train.seed + rt.rank)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(train, model)
    # --warmup_steps of linear warm-up, then --lr_schedule, over total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, train.lr_schedule))
    if train.ema_decay is None:  # --ema_decay: by default a half-life that grows with the run
        ema = EMA(model, EMA_MAX_DECAY, halflife_ratio=EMA_HALFLIFE_RATIO)
    else:
        ema = EMA(model, train.ema_decay) if train.ema_decay > 0 else None
    amp_dtype = autocast_dtype(train.amp, rt.device)  # --amp
    on_device = rt.data_on_device
    return TrainingRun(
        config=config, data=data, rt=rt, model=model,
        diffusion=Diffusion(config.diffusion.timesteps, config.diffusion.schedule, prediction_type=config.diffusion.prediction_type,
                            snr_gamma=config.diffusion.snr_gamma, variance=config.diffusion.variance).to(rt.device),
        optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16),
        ema=ema, amp_dtype=amp_dtype, state=state, counters=StepCounters(rt.device), steps_per_epoch=steps_per_epoch,
        examples_per_step=examples_per_step, total_steps=total_steps, warmup_steps=warmup_steps,
        eval_every=train.eval_every or evaluation_interval(len(data.val) + len(data.test), steps_per_epoch * examples_per_step),
        grid_count=train.num_samples or (2 * data.num_classes if config.model.conditional else GRID_IMAGES),
        train_images=data.train.images.to(rt.device) if on_device else data.train.images,
        train_labels=data.train.labels.to(rt.device) if on_device else data.train.labels,
    )


def restore_run(run: TrainingRun, checkpoint: dict) -> None:
    """Load weights, EMA, optimizer, LR schedule, grad scaler and random states from a checkpoint. The
    learning rate may change on resume (--lr); the random streams continue when the number of processes is
    the one that saved, and start afresh per rank otherwise."""
    run.model.load_state_dict(checkpoint["model"])
    if run.ema is not None and checkpoint["ema"] is not None:
        run.ema.module.load_state_dict(checkpoint["ema"])
        run.ema.num_updates.fill_(checkpoint["ema_num_updates"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    lr = run.config.train.lr
    for group in run.optimizer.param_groups:
        group["initial_lr"] = lr
    run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
    saved_world_size = checkpoint.get("runtime", {}).get("world_size", checkpoint["config"].get("world_size", 1))
    if run.rt.world_size == saved_world_size:
        restore_rng_state(checkpoint["rng"] if run.rt.world_size == 1 else checkpoint["rng_per_rank"][run.rt.rank])
    else:
        seed_everything((run.config.train.seed + run.rt.rank + 7_919 * run.state.step) % 2**32)


def prepare_for_steps(run: TrainingRun) -> None:
    """DistributedDataParallel under torchrun; --compile in place (state_dict keys stay the plain model's),
    after DDP so the compiled graphs overlap its all-reduce."""
    if run.rt.world_size > 1:
        run.model = DistributedDataParallel(run.model, device_ids=[run.rt.device.index] if run.rt.device.type == "cuda" else None)
    if run.config.train.compile:
        run.model.compile()


def announce(run: TrainingRun, resume_path: Optional[Path]) -> None:
    if not run.rt.is_main:
        return
    data, config = run.data, run.config
    print(f"model: {count_parameters(unwrap(run.model)) / 1e6:.2f}M parameters ({config.model.preset} preset"
          f"{', conditional on ' + str(data.num_classes) + ' classes' if config.model.conditional else ''}); "
          f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images of "
          f"{data.channels}x{data.image_size}x{data.image_size}; {run.steps_per_epoch} steps per epoch, {run.total_steps} in all")
    train, sampling = config.train, config.sampling
    derived = "derived from the run" if train.warmup_steps is None else "--warmup_steps"
    ema = ("none" if run.ema is None else f"decay {run.ema.decay} with TensorFlow's warm-up (--ema_decay)" if run.ema.halflife_ratio is None
           else f"half-life {EMA_HALFLIFE_RATIO:.0%} of the steps so far, at most decay {run.ema.decay}'s (derived; --ema_decay fixes one)")
    grids = (f"grids: {run.grid_count} images by {sampling.sampler} {sampling.resolved_steps(config.diffusion.timesteps)} steps, every "
             f"{train.sample_every} epochs and at the end" if train.sample_every else "grids: none (--sample_every 0)")
    print(f"warm-up: {run.warmup_steps} steps ({derived}); EMA: {ema}; random flips: {'on' if data.train.hflip else 'off'} "
          f"(--hflip / --no_hflip); losses: {config.diffusion.prediction_type} prediction"
          f"{f', min-SNR-{config.diffusion.snr_gamma:g} weighting' if config.diffusion.snr_gamma else ''}; validation and test loss every "
          f"{run.eval_every} epoch(s); {grids}")
    if resume_path is not None:
        print(f"resuming {resume_path} at step {run.state.step} (epoch {run.state.epoch + 1})")


def train(config: RunConfig, data: DataSplits, rt: Runtime, resume: Optional[tuple[Path, dict]] = None) -> Optional[Path]:
    """Train as `config` says, from scratch or from `resume` (see load_resume_checkpoint); return the
    path of the last checkpoint (None without --save_model)."""
    resume_path, checkpoint = resume if resume is not None else (None, None)
    run = build_run(config, data, rt, restored_state(checkpoint))
    if checkpoint is not None:
        restore_run(run, checkpoint)
    if rt.is_main:
        remove_stale_temporaries(run.run_dir)
    prepare_for_steps(run)
    if rt.is_main and config.train.logger == "tensorboard":
        run.tensorboard = TensorBoardLog(Path(config.train.save_dir) / "tensorboard" / config.train.run_name)
    announce(run, resume_path)
    run.model.train()
    with StopRequest(rt) as stop:
        while run.state.step < run.total_steps:
            run_steps(run, stop)
            end_epoch(run)
    return finish_training(run)


# The phases of a run


def read_counters(run: TrainingRun) -> None:
    """Bring the on-device step figures into the state (a host sync); stop a run whose steps keep failing."""
    state = run.state
    skipped, longest = run.counters.read_into(state)
    if skipped and run.rt.is_main:
        tqdm.write(f"step {state.step}: {skipped} step(s) skipped since the last report, for a non-finite loss or "
                   f"gradient ({state.nonfinite_skipped} so far)")
    if longest >= MAX_NONFINITE_STEPS:
        raise UsageError(f"{longest} non-finite losses in a row by step {state.step}: stopping; "
                         f"the last checkpoint is kept (try a lower --lr, or --amp bf16/none)")


def checkpoint_state(run: TrainingRun) -> dict:
    model = unwrap(run.model)
    return {
        **model_description(model, run.config, run.data),
        "model": model.state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "ema_num_updates": int(run.ema.num_updates) if run.ema is not None else 0,
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "train_state": asdict(run.state),
        "config": run.config.to_dict(),
        "runtime": {"world_size": run.rt.world_size},
        "rng": rng_state(),
    }


def save(run: TrainingRun, path: Path) -> None:
    """Every rank calls this (the random states are gathered); rank 0 writes the checkpoint and, next to it, the
    sampling weights alone (the EMA, or the raw weights without one) as safetensors (weights_path)."""
    read_counters(run)
    rng_per_rank = gather_rng_states(run.rt)
    if run.rt.is_main:
        save_checkpoint(checkpoint_state(run) | {"rng_per_rank": rng_per_rank}, path)
        model = run.ema.module if run.ema is not None else unwrap(run.model)
        description = model_description(unwrap(run.model), run.config, run.data) | {
            "train_state": {"step": run.state.step}, "weights": "ema" if run.ema is not None else "raw"}
        save_weights(model.state_dict(), description, weights_path(path))


def run_steps(run: TrainingRun, stop: "StopRequest") -> None:
    """The step loop, over the rest of the current epoch (or up to the last step): a step, the EMA, the LR
    schedule, and at intervals the logged figures (--log_interval) and ckpt.pt (--save_every_steps)."""
    train, state, rt = run.config.train, run.state, run.rt
    epoch = EpochData(epoch_batches(len(run.data.train), train.batch_size, rt, train.seed, state.epoch, state.epoch_position,
                                    run.train_images.device), run.train_images, run.train_labels, run.data.train.hflip)
    remaining = min((run.epoch_examples - state.epoch_position) // run.examples_per_step, run.total_steps - state.step)
    bar = tqdm(total=remaining, desc=f"epoch {state.epoch + 1}", disable=not rt.is_main, dynamic_ncols=True, leave=False)
    loop_start, saving = time.perf_counter(), 0.0
    window_start, window_steps = loop_start, 0
    for _ in range(remaining):
        loss, grad_norm, skip = train_step(run, epoch)
        if run.ema is not None:
            run.ema.update(unwrap(run.model), skip)
        run.counters.record(loss, skip)
        run.scheduler.step()
        state.step += 1
        window_steps += 1
        bar.update(1)
        if state.step % train.log_interval == 0:
            read_counters(run)
            log_step(run, bar, loss, grad_norm, skip, window_steps * run.examples_per_step / (time.perf_counter() - window_start))
            window_start, window_steps = time.perf_counter(), 0
        if train.save_model and train.save_every_steps and state.step % train.save_every_steps == 0:
            save_start = time.perf_counter()
            save(run, run.last_path)
            saving += time.perf_counter() - save_start
        if stop.requested():
            bar.close()
            stop_after_signal(run, stop)
    bar.close()
    read_counters(run)
    run.seconds_in_steps += time.perf_counter() - loop_start - saving


def stop_after_signal(run: TrainingRun, stop: "StopRequest") -> None:
    """Ctrl-C or SIGTERM (to any rank): write ckpt.pt and exit with 130 (SIGINT) or 143."""
    save(run, run.last_path)
    if run.rt.world_size > 1:  # no rank exits (and makes torchrun stop the others) before rank 0 has written
        dist.barrier(group=run.rt.control_group)
    if run.rt.is_main:
        reason = f"{stop.signal_name} received" if stop.signal_name else "another process was signalled"
        print(f"{reason}: stopped after step {run.state.step}; checkpoint saved to {run.last_path}; "
              f"resume with the same command plus --resume", file=sys.stderr)
    raise SystemExit(130 if stop.signal_name == "SIGINT" else 143)


def end_epoch(run: TrainingRun) -> None:
    """After the step loop: every `eval_every` epochs and at the end, the validation and test losses and the
    history (record_losses); every --sample_every epochs and at the end, a sample grid (record_grid); then, with
    --save_model, ckpt.pt, best.pt (lowest validation loss) and every --save_every epochs a kept snapshot."""
    train, state = run.config.train, run.state
    epoch_done = run.epoch_examples - state.epoch_position < run.examples_per_step
    final = state.step >= run.total_steps
    is_best = False
    if final or (epoch_done and (state.epoch + 1) % run.eval_every == 0):
        is_best = record_losses(run, epoch_done)
    if train.sample_every > 0 and (final or (epoch_done and (state.epoch + 1) % train.sample_every == 0)):
        record_grid(run, epoch_done)
    if epoch_done:  # advance before saving, so a checkpoint taken here resumes at the next epoch
        state.epoch += 1
        state.epoch_position = 0
    if not train.save_model:
        return
    save(run, run.last_path)
    if run.rt.is_main and is_best:
        copy_checkpoint(run.last_path, run.run_dir / "best.pt")
    if run.rt.is_main and epoch_done and state.epoch % train.save_every == 0:
        copy_checkpoint(run.last_path, run.run_dir / f"ckpt_epoch{state.epoch:04d}.pt")
        prune_snapshots(run.run_dir, train.keep_checkpoints)


def finish_training(run: TrainingRun) -> Optional[Path]:
    """The progression image; under torchrun, the check that every rank holds the same weights."""
    if run.rt.is_main:
        if run.state.progression:
            save_labelled_rows(run.state.progression, run.save_dir / f"progression_{run.config.train.run_name}.png")
        total = time.perf_counter() - run.started
        print(f"time: {run.seconds_in_steps:.0f} s in optimizer steps, {total - run.seconds_in_steps:.0f} s outside them "
              f"({(total - run.seconds_in_steps) / total:.0%}: data, evaluation, grids, checkpoints)")
        append_jsonl(run.save_dir / f"metrics_{run.config.train.run_name}.jsonl", {
            "kind": "end", "step": run.state.step, "seconds_in_steps": round(run.seconds_in_steps, 3),
            "seconds_outside_steps": round(total - run.seconds_in_steps, 3)})
        if run.config.train.save_model:
            print(f"checkpoint: {run.last_path}")
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.rt.world_size > 1:
        check_replicas_identical([unwrap(run.model)] + ([run.ema.module] if run.ema is not None else []), run.rt)
    return run.last_path if run.config.train.save_model else None


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label becomes the null label with probability p_uncond."""
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def train_step(run: TrainingRun, epoch: EpochData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over --grad_accum micro-batches, queued on the device without waiting for it.

    Returns (mean loss, grad norm, skip). `skip` is a bool tensor, true when the loss or the gradients were
    not finite (including fp16 gradients that overflowed, for which GradScaler lowers its scale); the
    optimizer then leaves the weights and its own state exactly as they were. The decision is made on the
    device, through the `found_inf` that fused Adam(W) and Lion read, so no step waits for the GPU.
    """
    train, rt, model = run.config.train, run.rt, run.model
    null_label = unwrap(model).null_label
    loss = torch.zeros((), device=rt.device)
    run.optimizer.zero_grad(set_to_none=True)
    for micro in range(train.grad_accum):
        run.state.epoch_position, indices = next(epoch.batches)
        x0, labels = load_batch(epoch.images, epoch.labels, indices, epoch.hflip, rt.device)
        if train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = drop_labels(labels, train.p_uncond, null_label) if null_label is not None else None
        t = torch.randint(0, run.diffusion.num_timesteps, (x0.shape[0],), device=rt.device)
        last_micro = micro == train.grad_accum - 1
        with maybe_no_sync(model, last_micro), torch.autocast(rt.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            micro_loss = run.diffusion.p_losses(model, x0, t, labels, loss_type=run.config.diffusion.loss_type)
        run.scaler.scale(micro_loss / train.grad_accum).backward()
        loss += micro_loss.detach().float() / train.grad_accum
    if rt.world_size > 1:
        dist.all_reduce(loss)
        loss /= rt.world_size
    grad_norm, skip = apply_update(model, run.optimizer, run.scaler, loss, train.grad_clip)
    return loss, grad_norm, skip


def log_step(run: TrainingRun, bar, loss: torch.Tensor, grad_norm: torch.Tensor, skip: torch.Tensor, images_per_s: float) -> None:
    """Progress-bar figures and one JSON line of metrics, every --log_interval steps (the only per-step host syncs)."""
    lr = run.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
    if run.rt.is_main:
        record = {
            "kind": "step", "step": run.state.step, "epoch": run.state.epoch + 1, "train_loss": loss.item(), "lr": lr,
            "grad_norm": None if skip.item() else grad_norm.item(), "images_per_s": images_per_s,
            "peak_memory_mb": peak_memory_mb(run.rt.device), "nonfinite_skipped": run.state.nonfinite_skipped,
        }
        append_jsonl(run.save_dir / f"metrics_{run.config.train.run_name}.jsonl", record)
        if run.tensorboard is not None:
            run.tensorboard.scalars(record)


def epochs_so_far(run: TrainingRun, epoch_done: bool) -> float:
    """The epoch count of a history entry: whole after an epoch, fractional for a last partial epoch."""
    state = run.state
    return state.epoch + 1 if epoch_done else round(state.epoch + state.epoch_position / len(run.data.train), 4)


def record_losses(run: TrainingRun, epoch_done: bool) -> bool:
    """Validation and test loss, the mean training loss since the last entry, the history, the loss plot and the
    metrics line with the time split; returns whether the validation loss is the best so far (it is recorded so,
    before the checkpoint is written, so that a resumed run compares against the true best)."""
    config, state, data, rt = run.config, run.state, run.data, run.rt
    train = config.train
    losses = {split: evaluate(run.eval_model(), run.diffusion, getattr(data, split), rt, seed=EVAL_SEEDS[split],
                              batch_size=train.batch_size, loss_type=config.diffusion.loss_type) for split in ("val", "test")}
    train_loss = state.epoch_loss_sum / state.epoch_loss_count if state.epoch_loss_count else math.nan
    if epoch_done:  # a last partial epoch's entry is replaced on resume, so its steps count again then
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
    epochs_value = epochs_so_far(run, epoch_done)
    lr = run.scheduler.get_last_lr()[0]
    for key, value in (("epochs", epochs_value), ("steps", state.step), ("train_loss", train_loss),
                       ("val_loss", losses["val"]), ("test_loss", losses["test"]), ("lr", lr)):
        state.history[key].append(value)
    is_best = losses["val"] < state.best_val_loss  # never for NaN: no validation split (--val_fraction 0)
    if is_best:
        state.best_val_loss = losses["val"]
    if not rt.is_main:
        return is_best
    total = time.perf_counter() - run.started
    print(f"epoch {epochs_value} | step {state.step} | train {train_loss:.5f} | val {losses['val']:.5f} | test {losses['test']:.5f} | "
          f"{total - run.seconds_in_steps:.0f} of {total:.0f} s outside optimizer steps")
    name = train.run_name
    save_json(state.history, run.save_dir / f"loss_history_{name}.json")
    save_loss_plot(state.history, run.save_dir / f"loss_curve_{name}.png", name)
    record = {
        "kind": "epoch", "step": state.step, "epoch": epochs_value, "train_loss": train_loss, "val_loss": losses["val"],
        "test_loss": losses["test"], "lr": lr, "peak_memory_mb": peak_memory_mb(rt.device),
        "seconds_in_steps": round(run.seconds_in_steps, 3), "seconds_outside_steps": round(total - run.seconds_in_steps, 3),
    }
    append_jsonl(run.save_dir / f"metrics_{name}.jsonl", record)
    if run.tensorboard is not None:
        run.tensorboard.scalars(record)
    return is_best


def record_grid(run: TrainingRun, epoch_done: bool) -> None:
    """A sample grid from the fixed noise, and its row of the progression image (and TensorBoard's, with --logger)."""
    pixels = sample_grid(run.eval_model(), run.diffusion, run.config, run.grid_count, run.data, run.rt)
    if not run.rt.is_main:
        return
    epochs_value = epochs_so_far(run, epoch_done)
    if run.tensorboard is not None:
        run.tensorboard.images(pixels, run.state.step)
    save_image_grid(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1,
                    run.save_dir / f"samples_{run.config.train.run_name}_epoch{run.state.epoch + 1:04d}.png")
    run.state.progression.append((f"epoch {epochs_value:g}", pixels[:PROGRESSION_COLUMNS]))


class TensorBoardLog:
    """--logger tensorboard: the figures of the metrics JSON lines (losses, lr, images/s, ...) under "step/" and
    "epoch/", and the sample grids, as TensorBoard events. tensorboard is optional and imported only here."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError('--logger tensorboard needs tensorboard: pip install tensorboard (or pip install ".[tensorboard]")') from None
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, record: dict) -> None:
        for key, value in record.items():
            if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        self.writer.flush()

    def images(self, pixels: torch.Tensor, step: int) -> None:
        """A sample grid, uint8 (N, H, W, C)."""
        self.writer.add_images("samples", pixels.numpy(), step, dataformats="NHWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def prune_snapshots(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` per-epoch snapshots (ckpt.pt and best.pt are separate and always kept)."""
    for old in sorted(run_dir.glob("ckpt_epoch*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
        weights_path(old).unlink(missing_ok=True)
