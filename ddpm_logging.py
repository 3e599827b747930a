"""What a training run reports: figures counted on the device, the metrics JSON lines, TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from tqdm.auto import tqdm

from ddpm_config import RunConfig, SamplingConfig, UsageError
from ddpm_model import MLP_PRESET
from ddpm_optim import EMA
from ddpm_outputs import append_jsonl, save_json, save_loss_plot

if TYPE_CHECKING:
    from ddpm_kinds import SampleKind


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
            [self.loss_sum, self.loss_count.double(), self.skipped.double(), self.longest_streak.double()]
        ).tolist()
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
            raise UsageError(
                '--logger tensorboard needs tensorboard: pip install tensorboard (or pip install ".[tensorboard]")'
            ) from None
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
        self.tensorboard = (
            TensorBoardLog(Path(save_dir) / "tensorboard" / run_name) if enabled and logger == "tensorboard" else None
        )

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


def print_run_summary(
    config: RunConfig,
    sampling: SamplingConfig,
    kind: SampleKind,
    *,
    parameters: int,
    num_classes: int,
    split_sizes: tuple[int, int, int],
    steps_per_epoch: int,
    total_steps: int,
    warmup_steps: int,
    ema: Optional[EMA],
    phema: Optional[tuple[tuple[float, ...], int]],
    hflip: bool,
    eval_examples: int,
    sample_count: int,
) -> None:
    """The start-up lines: the model, the data, and every setting the run derived rather than was given (`config` holds
    what was given, None where derived; `sampling` the settings in force; `phema`: the tracked sigma_rels and the
    steps between snapshots)."""
    model, train, diffusion = config.model, config.train, config.diffusion
    mlp = f", width {model.mlp_width}, depth {model.mlp_depth}" if model.preset == MLP_PRESET else ""
    classes = f", conditional on {num_classes} classes" if model.conditional else ""
    print(
        f"model: {parameters / 1e6:.2f}M parameters ({model.preset} preset{mlp}{classes}); data: {split_sizes[0]} "
        f"train / {split_sizes[1]} val / {split_sizes[2]} test {kind.describe()}; {steps_per_epoch} steps per epoch, "
        f"{total_steps} in all"
    )
    warmup = "derived from the run" if train.warmup_steps is None else "--warmup_steps"
    ema_text = (
        "none"
        if ema is None
        else f"decay {ema.decay} with TensorFlow's warm-up (--ema_decay)"
        if ema.halflife_ratio is None
        else f"half-life {ema.halflife_ratio:.0%} of the steps so far, at most decay {ema.decay}'s (derived; "
        "--ema_decay fixes one)"
    )
    guidance = ""
    if model.conditional:
        derived = f" (derived for {kind.noun}; --guidance_scale)" if config.sampling.guidance_scale is None else ""
        guidance = f", guidance {sampling.guidance_scale:g}{derived}"
    drawn = f"{sample_count} {kind.noun} by {sampling.sampler} {sampling.steps} steps{guidance}"
    pictures = f"every {train.sample_every} epochs and at the end" if train.sample_every else "none (--sample_every 0)"
    full = (
        f"every {train.eval_every} epochs and at the end" if train.eval_every else "at the end (--eval_every for more)"
    )
    phema_text = ""
    if phema is not None:
        source = "derived" if train.phema_every is None else "--phema_every"
        phema_text = (
            f"post-hoc EMA: sigma_rel {', '.join(f'{s:g}' for s in phema[0])} tracked, snapshots every {phema[1]} "
            f"steps ({source}; --posthoc_ema after training); "
        )
    print(
        f"warm-up: {warmup_steps} steps ({warmup}); EMA: {ema_text}; {phema_text}random flips: "
        f"{'on' if hflip else 'off'} (--hflip / --no_hflip); losses: {diffusion.prediction_type} "
        f"prediction{f', min-SNR-{diffusion.snr_gamma:g} weighting' if diffusion.snr_gamma else ''}; validation and "
        f"test loss every epoch on {eval_examples} fixed examples of each split (derived), on the whole splits "
        f"{full}; {kind.pictures_text(pictures, drawn, bool(train.sample_every))}"
    )


def log_step(
    log: RunLog,
    bar: tqdm,
    *,
    step: int,
    epoch: int,
    loss: torch.Tensor,
    lr: float,
    grad_norm: torch.Tensor,
    skip: torch.Tensor,
    images_per_s: float,
    device: torch.device,
    nonfinite_skipped: int,
) -> None:
    """Progress-bar figures and one metrics line, every --log_interval steps (the only per-step host syncs)."""
    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
    log.write(
        {
            "kind": "step",
            "step": step,
            "epoch": epoch,
            "train_loss": loss.item(),
            "lr": lr,
            "grad_norm": None if skip.item() else grad_norm.item(),
            "images_per_s": images_per_s,
            "peak_memory_mb": peak_memory_mb(device),
            "nonfinite_skipped": nonfinite_skipped,
        }
    )


def report_epoch(
    log: RunLog,
    entry: dict,
    full: Optional[dict],
    figures_text: str,
    history: dict,
    save_dir: Path,
    run_name: str,
    *,
    seconds_total: float,
    seconds_in_steps: float,
    device: torch.device,
) -> None:
    """An epoch's history entry (ddpm_train), on rank 0: the epoch line, the loss history and its plot, a metrics
    line."""
    epoch, step = entry["epochs"], entry["steps"]
    whole = f" | whole splits: val {full['val_loss']:.5f}, test {full['test_loss']:.5f}" if full is not None else ""
    print(
        f"epoch {epoch + 1} | step {step} | train {entry['train_loss']:.5f} | val {entry['val_loss']:.5f} | test "
        f"{entry['test_loss']:.5f}{whole}{figures_text} | {seconds_total - seconds_in_steps:.0f} of "
        f"{seconds_total:.0f} s outside optimizer steps"
    )
    save_history(history, save_dir, run_name)
    figures = {key: value for key, value in entry.items() if key not in ("epochs", "steps", "eval_examples")}
    log.write(
        {
            "kind": "epoch",
            "step": step,
            "epoch": epoch,
            **figures,
            **({"full": full} if full is not None else {}),
            "peak_memory_mb": peak_memory_mb(device),
            "seconds_in_steps": round(seconds_in_steps, 3),
            "seconds_outside_steps": round(seconds_total - seconds_in_steps, 3),
        }
    )
