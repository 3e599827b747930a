"""What a training run reports: figures counted on the device, the metrics JSON lines, TensorBoard."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from tqdm.auto import tqdm

from ddpm_config import SamplingConfig, UsageError
from ddpm_model import count_parameters
from ddpm_outputs import append_jsonl, save_json, save_loss_plot
from ddpm_runtime import unwrap

if TYPE_CHECKING:
    from ddpm_train import TrainingRun


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

    def take(self) -> tuple[float, int, int, int]:
        """The figures since the last take (a host sync): (loss sum and count of applied steps, steps skipped,
        longest run of skips); the counters restart, except the current run of skips."""
        loss_sum, count, skipped, longest = torch.stack(
            [self.loss_sum, self.loss_count.double(), self.skipped.double(), self.longest_streak.double()]).tolist()
        for counter in (self.loss_sum, self.loss_count, self.skipped):
            counter.zero_()
        self.longest_streak.copy_(self.streak)
        return loss_sum, int(count), int(skipped), int(longest)


def peak_memory_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


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


class RunLog:
    """A run's metrics, on rank 0: one JSON line per record in <save_dir>/metrics_<run_name>.jsonl (a log that a
    crash can cut only at its last line) and, with --logger tensorboard, the same figures and the sample grids as
    TensorBoard events in <save_dir>/tensorboard/<run_name>. Other ranks get a RunLog that writes nothing."""

    def __init__(self, save_dir: Path, run_name: str, logger: str, enabled: bool):
        self.path = Path(save_dir) / f"metrics_{run_name}.jsonl"
        self.enabled = enabled
        self.tensorboard = TensorBoardLog(Path(save_dir) / "tensorboard" / run_name) if enabled and logger == "tensorboard" else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        if self.tensorboard is not None:
            self.tensorboard.scalars(record)

    def images(self, pixels: torch.Tensor, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.images(pixels, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def save_history(history: dict, save_dir: Path, run_name: str) -> None:
    """loss_history_<run_name>.json and its plot, loss_curve_<run_name>.png."""
    save_json(history, Path(save_dir) / f"loss_history_{run_name}.json")
    save_loss_plot(history, Path(save_dir) / f"loss_curve_{run_name}.png", run_name)


def guidance_text(sampling: SamplingConfig, points: bool) -> str:
    """The grids' guidance scale, and whether it was derived."""
    if sampling.guidance_scale is not None:
        return f", guidance {sampling.guidance_scale:g}"
    return f", guidance {sampling.derived(points).guidance_scale:g} (derived for {'2D points' if points else 'images'}; --guidance_scale)"


def print_run_summary(run: TrainingRun, resume_path: Optional[Path]) -> None:
    """The start-up lines: the model, the data, and every setting the run derived rather than was given."""
    if not run.runtime.is_main:
        return
    data, config, train, sampling = run.data, run.config, run.config.train, run.config.sampling
    mlp = f", width {config.model.mlp_width}, depth {config.model.mlp_depth}" if data.points else ""
    shape = (f"2D points of {config.data.dataset} (generated from the seed; {data.num_classes} classes: {', '.join(data.class_names)})"
             if data.points else f"images of {data.channels}x{data.image_size}x{data.image_size}")
    print(f"model: {count_parameters(unwrap(run.model)) / 1e6:.2f}M parameters ({config.model.preset} preset{mlp}"
          f"{', conditional on ' + str(data.num_classes) + ' classes' if config.model.conditional else ''}); "
          f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test {shape}; "
          f"{run.steps_per_epoch} steps per epoch, {run.total_steps} in all")
    warmup = "derived from the run" if train.warmup_steps is None else "--warmup_steps"
    ema = ("none" if run.ema is None else f"decay {run.ema.decay} with TensorFlow's warm-up (--ema_decay)" if run.ema.halflife_ratio is None
           else f"half-life {run.ema.halflife_ratio:.0%} of the steps so far, at most decay {run.ema.decay}'s (derived; --ema_decay fixes one)")
    drawn = (f"{run.grid_count} {'points' if data.points else 'images'} by {sampling.sampler} "
             f"{sampling.resolved_steps(config.diffusion.timesteps)} steps{guidance_text(sampling, data.points) if config.model.conditional else ''}")
    pictures = f"every {train.sample_every} epochs and at the end" if train.sample_every else "none (--sample_every 0)"
    grids = (f"sliced Wasserstein distance every epoch, scatter plots {pictures}: {drawn}" if data.points
             else f"grids {pictures}: {drawn}" if train.sample_every else f"grids: {pictures}")
    full = f"every {train.eval_every} epochs and at the end" if train.eval_every else "at the end (--eval_every for more)"
    phema = (f"post-hoc EMA: sigma_rel {', '.join(f'{s:g}' for s in run.phema.sigma_rels)} tracked, snapshots every {run.phema_every} steps "
             f"({'derived' if train.phema_every is None else '--phema_every'}; --posthoc_ema after training); " if run.phema is not None else "")
    print(f"warm-up: {run.warmup_steps} steps ({warmup}); EMA: {ema}; {phema}random flips: {'on' if data.train.hflip else 'off'} "
          f"(--hflip / --no_hflip); losses: {config.diffusion.prediction_type} prediction"
          f"{f', min-SNR-{config.diffusion.snr_gamma:g} weighting' if config.diffusion.snr_gamma else ''}; validation and test loss "
          f"every epoch on {run.eval_examples} fixed examples of each split (derived), on the whole splits {full}; {grids}")
    if resume_path is not None:
        print(f"resuming {resume_path} at step {run.state.step} (epoch {run.state.epoch + 1})")


def log_step(run: TrainingRun, bar: tqdm, loss: torch.Tensor, grad_norm: torch.Tensor, skip: torch.Tensor, images_per_s: float) -> None:
    """Progress-bar figures and one metrics line, every --log_interval steps (the only per-step host syncs)."""
    lr = run.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
    run.log.write({
        "kind": "step", "step": run.state.step, "epoch": run.state.epoch + 1, "train_loss": loss.item(), "lr": lr,
        "grad_norm": None if skip.item() else grad_norm.item(), "images_per_s": images_per_s,
        "peak_memory_mb": peak_memory_mb(run.runtime.device), "nonfinite_skipped": run.state.nonfinite_skipped,
    })
