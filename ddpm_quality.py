"""The sample quality curve during training: how good the samples are, against images seen, while a run trains.

The loss of a diffusion model says little about its samples late in training, and FIDs of one run move by several
points between checkpoints. So every so many images seen (--quality_every; derived, `QualitySchedule`), the EMA
network draws --quality_samples images from fixed noise and labels with the training pictures' sampler, and one
figure is recorded, chosen once per run (`choose_measure`):

    fid     FID on Inception features, where their weights are present (comparable to published FIDs only at 50,000
            samples against the training set; at a few hundred it is biased upwards, but it ranks checkpoints)
    judge   else the Frechet distance on the features of the data set's judge (ddpm_judge), with its class accuracy
    kid     else KID on the fixed random features (ddpm_metrics.RandomConvFeatures): comparable only with itself

The points go to the metrics log, TensorBoard, the loss history ("quality") and quality_curve_<run>.png; the
checkpoint of the best figure is kept as best_fid.pt beside best.pt (ddpm_train).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ddpm_metrics import (
    FEATURE_EXTRACTORS,
    extract_features,
    feature_statistics,
    frechet_distance,
    inception_weights_path,
    kernel_inception_distance,
    reference_statistics,
)
from ddpm_outputs import atomic_write
from ddpm_runtime import Runtime
from ddpm_sampling import every_class_samples

if TYPE_CHECKING:
    from ddpm_config import RunConfig, SamplingConfig
    from ddpm_diffusion import Diffusion
    from ddpm_judge import Judge
    from ddpm_kinds import SampleKind

QUALITY_BUDGET = 0.10  # the curve costs at most this share of the time spent in optimizer steps
QUALITY_SEED = 3_000_017  # the fixed noise of the curve's samples, apart from the training pictures' (the run's seed)
FORWARD_COST = 1 / 3  # a network evaluation of one image, as a share of a training step's (forward and backward)


@dataclass
class QualityMeasure:
    """The one figure of a run's curve, and what measures it (rank 0 only: None elsewhere)."""

    metric: str  # "fid", "judge" or "kid"
    judge: Optional[Judge]  # also gives the class accuracy of a conditional run's samples
    extractor: Optional[torch.nn.Module] = None  # fid and kid: the feature network and the reference statistics
    reference: Optional[object] = None

    @property
    def description(self) -> str:
        if self.metric == "fid":
            return "FID on Inception features (few samples: compare along the curve, not with published FIDs)"
        if self.metric == "judge":
            return f"the judge's Frechet distance (its test accuracy {self.judge.test_accuracy:.3f}; ddpm_judge)"
        return "KID on fixed random features (no Inception weights, no judge: comparable only along this curve)"

    def measure(self, images: torch.Tensor, labels: Optional[torch.Tensor], batch_size: int, device: str) -> dict:
        """{"value": the figure (lower is better), "class_accuracy": the judge's, or None} of uint8 images (N, H, W,
        C)."""
        figures = None if self.judge is None else self.judge.figures(images, labels)
        accuracy = None if figures is None or labels is None else figures["class_accuracy"]
        if self.metric == "judge":
            return {"value": figures["distance"], "class_accuracy": accuracy}
        features, _ = extract_features(
            self.extractor, images.permute(0, 3, 1, 2), batch_size, device, desc="curve features"
        )
        if self.metric == "fid":
            value = frechet_distance(*feature_statistics(features), self.reference.mu, self.reference.sigma)
        else:
            value = kernel_inception_distance(features, self.reference.features)["mean"]
        return {"value": value, "class_accuracy": accuracy}


def choose_measure(
    dataset: str, data_dir: str, image_size: int, channels: int, batch_size: int, device: str
) -> QualityMeasure:
    """FID where the Inception weights are present, else the data set's judge (trained once and cached, ddpm_judge),
    else KID on random features: the figure the run's curve records."""
    from ddpm_judge import load_or_train_judge

    judge = load_or_train_judge(dataset, data_dir, image_size, channels, device)
    if inception_weights_path().is_file() or judge is None:
        features = "inception" if inception_weights_path().is_file() else "random-conv"
        extractor = FEATURE_EXTRACTORS[features](device)
        reference = reference_statistics(dataset, data_dir, image_size, features, extractor, batch_size, device)
        return QualityMeasure("fid" if features == "inception" else "kid", judge, extractor, reference)
    return QualityMeasure("judge", judge)


@dataclass
class QualitySchedule:
    """When the next point is due, in images seen: the first after a priori QUALITY_BUDGET of the run's time (a sampled
    image costs `steps` x `branches` forward passes, FORWARD_COST of a training step each), then as the last point
    measured: its seconds over QUALITY_BUDGET x the seconds per trained image; never twice in one epoch."""

    every: Optional[int]  # --quality_every; None: derived as above
    samples: int
    steps: int
    branches: int  # 2 where classifier-free guidance evaluates two branches, else 1

    def first(self) -> int:
        if self.every is not None:
            return self.every
        return math.ceil(self.samples * self.steps * self.branches * FORWARD_COST / QUALITY_BUDGET)

    def next(self, images_seen: int, seconds: float, seconds_per_image: float, epoch_examples: int) -> int:
        """The images seen at which the point after one measured at `images_seen` in `seconds` is due."""
        if self.every is not None:
            return images_seen + self.every
        interval = seconds / (QUALITY_BUDGET * seconds_per_image) if seconds_per_image > 0 else self.first()
        return images_seen + max(epoch_examples, math.ceil(interval))


def save_quality_curve(points: list[dict], metric: str, path: Path) -> None:
    """The figure against images seen (and the class accuracy, where measured, on a second axis)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([p["images"] for p in points], [p["value"] for p in points], "o-", color="tab:blue")
    axes.set(xlabel="images seen", ylabel=f"{metric} (lower is better)")
    axes.grid(alpha=0.3)
    accuracies = [(p["images"], p["class_accuracy"]) for p in points if p["class_accuracy"] is not None]
    if accuracies:
        twin = axes.twinx()
        twin.plot(*zip(*accuracies), "s--", color="tab:orange")
        twin.set_ylabel("judge's class accuracy")
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=110))
    plt.close(figure)


class QualityCurve:
    """A run's curve: its measure (rank 0's; None on the other ranks), its schedule and its samples' settings."""

    def __init__(
        self,
        measure: Optional[QualityMeasure],
        schedule: QualitySchedule,
        kind: SampleKind,
        sampling: SamplingConfig,
        num_classes: Optional[int],
        batch_size: int,
    ):
        self.measure, self.schedule, self.kind, self.sampling = measure, schedule, kind, sampling
        self.num_classes, self.batch_size = num_classes, batch_size
        self.seconds = 0.0  # spent on the curve by this process

    def due(self, images_seen: int, next_due: Optional[int], final: bool) -> bool:
        return final or images_seen >= (self.schedule.first() if next_due is None else next_due)

    def record(
        self,
        model: torch.nn.Module,
        diffusion: Diffusion,
        runtime: Runtime,
        *,
        images_seen: int,
        step: int,
        seconds_per_image: float,
        epoch_examples: int,
    ) -> tuple[dict, int]:
        """(the point, the images seen at which the next one is due), the same on every rank (rank 0's, broadcast)."""
        started = time.perf_counter()
        images, labels = every_class_samples(
            model,
            diffusion,
            self.kind,
            self.schedule.samples,
            self.num_classes,
            self.sampling,
            QUALITY_SEED,
            self.batch_size,
            runtime,
            desc="quality curve",
        )
        point = None
        if runtime.is_main:
            point = {
                "images": images_seen,
                "step": step,
                "metric": self.measure.metric,
                **self.measure.measure(images, labels, self.batch_size, str(runtime.device)),
            }
        seconds = time.perf_counter() - started
        self.seconds += seconds
        if point is not None:
            point["seconds"] = round(seconds, 3)
        agreed = [point, self.schedule.next(images_seen, seconds, seconds_per_image, epoch_examples)]
        if runtime.world_size > 1:  # rank 0's clock decides, so that every rank samples the next point at one step
            dist.broadcast_object_list(agreed, src=0, group=runtime.control_group)
        return agreed[0], agreed[1]

    def describe(self) -> str:
        every = (
            f"every {self.schedule.every} images (--quality_every)"
            if self.schedule.every is not None
            else f"first after {self.schedule.first()} images, then at most {QUALITY_BUDGET:.0%} of the time in "
            "optimizer steps (derived; --quality_every)"
        )
        return (
            f"quality curve: {every} and at the end, {self.schedule.samples} samples by {self.sampling.sampler} "
            f"{self.sampling.steps} steps (--quality_samples), measured by {self.measure.description}"
        )


def build_quality_curve(
    config: RunConfig,
    kind: SampleKind,
    runtime: Runtime,
    sampling: SamplingConfig,
    num_classes: Optional[int],
    planned_images: int,
    continues: bool,
) -> tuple[Optional[QualityCurve], str]:
    """A run's curve (None where it records none) and its start-up line: on with --quality_every N, off with 0, and by
    default where the kind can measure one and the run plans at least one derived interval (or `continues` a curve)."""
    train = config.train
    schedule = QualitySchedule(
        train.quality_every or None, train.quality_samples, sampling.steps, 2 if num_classes else 1
    )
    reason = "--quality_every 0" if train.quality_every == 0 else kind.quality_note()
    if reason is None and train.quality_every is None and not continues and schedule.first() > planned_images:
        reason = f"the run is shorter than one derived interval of {schedule.first()} images; --quality_every to force"
    if reason is not None:
        return None, f"quality curve: off ({reason})"
    data = config.data
    measure = None
    if runtime.is_main:  # the judge is trained (once per data set) or the reference statistics computed here
        measure = choose_measure(
            data.dataset,
            data.data_dir,
            kind.sample_shape[-1],
            kind.sample_shape[0],
            train.batch_size,
            str(runtime.device),
        )
    curve = QualityCurve(measure, schedule, kind, sampling, num_classes, train.batch_size)
    return curve, curve.describe() if runtime.is_main else ""


def report_point(point: dict, points: list[dict], log, save_dir: Path, run_name: str) -> None:
    """A point of the curve, on rank 0: a line, a metrics line (and TensorBoard's), quality_curve_<run>.png."""
    accuracy = "" if point["class_accuracy"] is None else f", judge's class accuracy {point['class_accuracy']:.3f}"
    print(
        f"quality at {point['images']} images (step {point['step']}): {point['metric']} {point['value']:.4f}{accuracy} "
        f"({point['seconds']:.1f} s)"
    )
    log.write({"kind": "quality", **point})
    save_quality_curve(points, point["metric"], save_dir / f"quality_curve_{run_name}.png")
