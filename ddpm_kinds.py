"""The two kinds of samples the tool draws, images and 2D points: one interface, two implementations.

A kind is built once, from the data set (training: `kind_of_data`) or from a checkpoint's description (sampling and
evaluation: `kind_of_model`), and owns everything that differs between images and points:

    saved samples      images: uint8 (N, H, W, C), clipped to [-1, 1] at every step; points: float32 (N, D), unclipped
    guidance scale     its default (GUIDANCE_SCALE, POINT_GUIDANCE_SCALE), resolved once in `sampling_settings`
    training samples   how many a training picture takes, the per-epoch figure (points: the sliced Wasserstein
                       distance; images: none), the pictures (grids and their progression; scatter plots)
    --inference        what it writes (grid.png and PNGs; samples.png, points.npz and the reverse process)
    --evaluate         how it measures (FID and its companions, ddpm_evaluate; the sliced Wasserstein distance)

The training loop, --inference and --evaluate call the kind; nothing else asks which kind it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ddpm_checkpoint import LoadedModel, ModelDescription
from ddpm_config import (
    GUIDANCE_SCALE,
    INFERENCE_SAMPLES,
    POINT_GUIDANCE_SCALE,
    POINT_SAMPLES,
    SamplingConfig,
    UsageError,
)
from ddpm_data import DataSplits
from ddpm_diffusion import Diffusion
from ddpm_evaluate import evaluate_images, run_checkpoint_comparison
from ddpm_outputs import (
    save_image_grid,
    save_json,
    save_labelled_rows,
    save_samples,
    to_uint8,
)
from ddpm_points import (
    distance_line,
    distance_report,
    distance_text,
    save_forward_process,
    save_panels,
    save_point_arrays,
    save_reverse_process,
)
from ddpm_runtime import Runtime
from ddpm_sampling import generate_from, sampling_record
from ddpm_sweep import run_sweep

TRAINING_GRID_IMAGES = 16  # images of a training grid of an unconditional model (two per class for a conditional one)
PROGRESSION_COLUMNS = 8  # samples per row of the progression image


class SampleKind(ABC):
    """What differs between images and points; see the module's docstring."""

    noun: str  # "images" or "points", in messages
    guidance_scale: float  # the default classifier-free guidance scale
    clip_denoised: bool  # clip the predicted x_0 to [-1, 1] at every sampling step
    inference_count: int  # samples of --inference without --num_samples
    sample_shape: tuple[int, ...]
    figures_every_epoch: bool  # training samples are drawn every epoch for `epoch_figures`, not only for pictures

    def sampling_settings(self, settings: SamplingConfig, num_timesteps: int) -> SamplingConfig:
        """The settings with every default filled in, once, where the model is known: the guidance scale of this kind
        and the sampler's own number of steps for `num_timesteps` (ddpm_samplers)."""
        guidance = self.guidance_scale if settings.guidance_scale is None else settings.guidance_scale
        return replace(settings, guidance_scale=guidance, steps=settings.resolved_steps(num_timesteps))

    @abstractmethod
    def to_saved(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of the sampler's output as saved samples, on the CPU."""

    @abstractmethod
    def describe(self) -> str:
        """The data, in the start-up line."""

    def training_count(self, num_samples: Optional[int], num_classes: Optional[int]) -> int:
        """Samples of a training picture: --num_samples, else the kind's default."""
        return num_samples or self.default_training_count(num_classes)

    @abstractmethod
    def default_training_count(self, num_classes: Optional[int]) -> int: ...

    def epoch_figures(self, samples: torch.Tensor, labels: Optional[torch.Tensor]) -> dict:
        """Figures of the training samples for every epoch's history entry (none by default)."""
        return {}

    def epoch_text(self, figures: dict) -> str:
        """Those figures in the epoch line."""
        return ""

    @abstractmethod
    def pictures_text(self, when: str, drawn: str, pictures_on: bool) -> str:
        """What training draws and when, in the start-up line."""

    @abstractmethod
    def save_training_pictures(
        self,
        samples: torch.Tensor,
        labels: Optional[torch.Tensor],
        progression: list,
        *,
        title: str,
        epoch: int,
        step: int,
        save_dir: Path,
        run_name: str,
        diffusion: Diffusion,
        log,
    ) -> None:
        """The pictures of a training run's samples at `title` (rank 0); `progression` is the run's list of earlier
        rows."""

    @abstractmethod
    def inference(
        self,
        loaded: LoadedModel,
        settings: SamplingConfig,
        runtime: Runtime,
        *,
        count: int,
        labels: Optional[torch.Tensor],
        guide: Optional[LoadedModel],
        seed: int,
        batch_size: int,
        save_dir: Path,
    ) -> None:
        """--inference: draw `count` samples (every rank its share) and write them (rank 0)."""

    @abstractmethod
    def evaluate(
        self,
        loaded: LoadedModel,
        settings: SamplingConfig,
        runtime: Runtime,
        *,
        scales: list[float],
        sweep: bool,
        labels: Optional[torch.Tensor],
        guide: Optional[LoadedModel],
        num_samples: int,
        seed: int,
        batch_size: int,
        save_dir: Path,
        features: str,
        data_dir: str,
        fid_ref: Optional[Path],
        save_pngs: bool,
    ) -> None:
        """--evaluate at each guidance scale of `scales` (`sweep`: a guidance sweep, a folder per scale)."""

    def quality_note(self) -> Optional[str]:
        """Why a run of this kind records no quality curve during training (ddpm_quality), or None where it can."""
        return f"{self.noun} have their figure every epoch instead"

    def sweep(self, model_path: Path, settings: SamplingConfig, runtime: Runtime, **options) -> Optional[dict]:
        """--evaluate --sweep (ddpm_sweep): ranks by FID or KID, which need images."""
        raise UsageError(
            f"--sweep ranks by FID or KID, which need images; measure a model of {self.noun} with "
            f"--evaluate --guidance_sweep"
        )

    def compare(self, paths: list[str], settings: SamplingConfig, runtime: Runtime, **options) -> None:
        """--compare_checkpoints: rows of images of the same noise."""
        raise UsageError(
            f"--compare_checkpoints draws rows of images; the {self.noun}' progression of a run is "
            f"progression_<run_name>.png"
        )


class ImageKind(SampleKind):
    noun = "images"
    guidance_scale = GUIDANCE_SCALE
    clip_denoised = True
    inference_count = INFERENCE_SAMPLES
    figures_every_epoch = False

    def __init__(self, channels: int, image_size: int):
        self.sample_shape = (channels, image_size, image_size)

    def to_saved(self, x: torch.Tensor) -> torch.Tensor:
        return to_uint8(x)

    def describe(self) -> str:
        channels, size, _ = self.sample_shape
        return f"images of {channels}x{size}x{size}"

    def default_training_count(self, num_classes: Optional[int]) -> int:
        return TRAINING_GRID_IMAGES if num_classes is None else 2 * num_classes

    def pictures_text(self, when: str, drawn: str, pictures_on: bool) -> str:
        return f"grids {when}: {drawn}" if pictures_on else f"grids: {when}"

    def save_training_pictures(
        self,
        samples: torch.Tensor,
        labels: Optional[torch.Tensor],
        progression: list,
        *,
        title: str,
        epoch: int,
        step: int,
        save_dir: Path,
        run_name: str,
        diffusion: Diffusion,
        log,
    ) -> None:
        """The sample grid (samples_<run>_epochNNNN.png, and TensorBoard's), and a row of the progression image."""
        log.images(samples, step)
        save_image_grid(
            samples.permute(0, 3, 1, 2).float() / 127.5 - 1, save_dir / f"samples_{run_name}_epoch{epoch:04d}.png"
        )
        progression.append((title, samples[:PROGRESSION_COLUMNS]))
        save_labelled_rows(progression, save_dir / f"progression_{run_name}.png")

    def inference(
        self,
        loaded: LoadedModel,
        settings: SamplingConfig,
        runtime: Runtime,
        *,
        count: int,
        labels: Optional[torch.Tensor],
        guide: Optional[LoadedModel],
        seed: int,
        batch_size: int,
        save_dir: Path,
    ) -> None:
        """grid.png, one PNG per sample, samples.npz and samples.json."""
        channels, size, _ = self.sample_shape
        if runtime.is_main:
            guidance = (
                f", autoguidance {settings.guidance_scale} by {settings.guide_model}"
                if guide is not None
                else f", guidance {settings.guidance_scale}"
                if labels is not None
                else ""
            )
            print(
                f"sampling {count} images of {channels}x{size}x{size} from {loaded.path} "
                f"({'EMA' if loaded.use_ema else 'raw'} weights, {settings.sampler}{guidance}"
                f"{f', {runtime.world_size} processes' if runtime.world_size > 1 else ''})"
            )
        pixels = generate_from(
            loaded, self, count, labels, settings, seed, batch_size, runtime, desc="sampling", guide=guide
        )
        if not runtime.is_main:
            return
        images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 back to [-1, 1]: exactly the same pixels again
        save_image_grid(images, save_dir / "grid.png")
        save_samples(images, labels, save_dir)
        class_names = loaded.description.class_names
        save_json(
            {
                "model_path": str(loaded.path),
                "num_samples": count,
                "seed": seed,
                "weights": "ema" if loaded.use_ema else "raw",
                **sampling_record(
                    settings, runtime, guided=labels is not None or guide is not None, diffusion=loaded.diffusion
                ),
                "classes": None if labels is None else [class_names[i] for i in labels.tolist()],
            },
            save_dir / "samples.json",
        )
        print(
            f"wrote {save_dir / 'grid.png'}, {count} images in {save_dir / 'samples'}/ and {save_dir / 'samples.npz'}"
        )

    def evaluate(self, loaded: LoadedModel, settings: SamplingConfig, runtime: Runtime, **options) -> None:
        evaluate_images(loaded, self, settings, runtime, **options)

    def quality_note(self) -> Optional[str]:
        try:
            import torch_fidelity  # noqa: F401  (the Frechet distance and KID of ddpm_metrics)
        except ImportError:
            return 'it needs torch-fidelity: pip install ".[eval]"'
        return None

    def sweep(self, model_path: Path, settings: SamplingConfig, runtime: Runtime, **options) -> Optional[dict]:
        return run_sweep(model_path, self, settings, runtime, **options)

    def compare(self, paths: list[str], settings: SamplingConfig, runtime: Runtime, **options) -> None:
        run_checkpoint_comparison(paths, self, settings, runtime, **options)


class PointKind(SampleKind):
    """2D points of a toy data set (ddpm_data.POINT_DATASETS), measured by the sliced Wasserstein distance to fresh
    points of the true distribution (ddpm_points)."""

    noun = "2D points"
    guidance_scale = POINT_GUIDANCE_SCALE
    clip_denoised = False
    inference_count = POINT_SAMPLES
    figures_every_epoch = True

    def __init__(self, dataset: str, dim: int, class_names: list[str]):
        self.dataset, self.sample_shape, self.class_names = dataset, (dim,), class_names

    def to_saved(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().cpu()

    def describe(self) -> str:
        return (
            f"2D points of {self.dataset} (generated from the seed; {len(self.class_names)} classes: "
            f"{', '.join(self.class_names)})"
        )

    def default_training_count(self, num_classes: Optional[int]) -> int:
        return POINT_SAMPLES

    def epoch_figures(self, samples: torch.Tensor, labels: Optional[torch.Tensor]) -> dict:
        return distance_report(samples, labels, self.dataset)

    def epoch_text(self, figures: dict) -> str:
        return distance_text(figures)

    def pictures_text(self, when: str, drawn: str, pictures_on: bool) -> str:
        return f"sliced Wasserstein distance every epoch, scatter plots {when}: {drawn}"

    def save_training_pictures(
        self,
        samples: torch.Tensor,
        labels: Optional[torch.Tensor],
        progression: list,
        *,
        title: str,
        epoch: int,
        step: int,
        save_dir: Path,
        run_name: str,
        diffusion: Diffusion,
        log,
    ) -> None:
        """The samples over the data (samples_<run>_epochNNNN.png), the scatter progression (a panel per picture,
        progression_<run>.png) and, at the first picture, the forward process (forward_process_<run>.png)."""
        if not progression:
            save_forward_process(diffusion, self.dataset, save_dir / f"forward_process_{run_name}.png")
        progression.append((title, samples))
        save_panels(
            [(title, samples, labels)], save_dir / f"samples_{run_name}_epoch{epoch:04d}.png", dataset=self.dataset
        )
        save_panels(
            [(text, points, labels) for text, points in progression],
            save_dir / f"progression_{run_name}.png",
            dataset=self.dataset,
        )

    def inference(
        self,
        loaded: LoadedModel,
        settings: SamplingConfig,
        runtime: Runtime,
        *,
        count: int,
        labels: Optional[torch.Tensor],
        guide: Optional[LoadedModel],
        seed: int,
        batch_size: int,
        save_dir: Path,
    ) -> None:
        """samples.png (the samples over the data, coloured by class), points.npz, reverse_process.png (the first batch
        at a few steps of the sampler), forward_process.png, samples.json, and the distance to the data."""
        trajectory: list[torch.Tensor] = []
        points = generate_from(
            loaded,
            self,
            count,
            labels,
            settings,
            seed,
            batch_size,
            runtime,
            desc="sampling",
            guide=guide,
            trajectory=trajectory,
        )
        if not runtime.is_main:
            return
        report = distance_report(points, labels, self.dataset)
        save_panels(
            [(f"{count} samples, {settings.sampler}, w = {settings.guidance_scale:g}", points, labels)],
            save_dir / "samples.png",
            dataset=self.dataset,
            columns=1,
        )
        save_point_arrays(points, labels, save_dir / "points.npz")
        save_reverse_process(trajectory, labels, settings.sampler, self.dataset, save_dir / "reverse_process.png")
        save_forward_process(loaded.diffusion, self.dataset, save_dir / "forward_process.png")
        save_json(
            {
                "model_path": str(loaded.path),
                "num_samples": count,
                "seed": seed,
                "weights": "ema" if loaded.use_ema else "raw",
                **sampling_record(
                    settings, runtime, guided=labels is not None or guide is not None, diffusion=loaded.diffusion
                ),
                **report,
            },
            save_dir / "samples.json",
        )
        print(distance_line(report, count))
        print(
            f"wrote {save_dir / 'samples.png'}, {save_dir / 'reverse_process.png'}, "
            f"{save_dir / 'forward_process.png'} and {count} points in {save_dir / 'points.npz'}"
        )

    def evaluate(
        self,
        loaded: LoadedModel,
        settings: SamplingConfig,
        runtime: Runtime,
        *,
        scales: list[float],
        sweep: bool,
        labels: Optional[torch.Tensor],
        guide: Optional[LoadedModel],
        num_samples: int,
        seed: int,
        batch_size: int,
        save_dir: Path,
        **image_options,
    ) -> None:
        """The sliced Wasserstein distance (FID needs images) at each scale, with evaluation.json, points.npz and
        samples.png per scale; for a sweep also guidance_sweep.json and guidance_sweep.png (a panel per scale)."""
        panels, rows = [], []
        for scale in scales:
            scaled = replace(settings, guidance_scale=scale)
            points = generate_from(loaded, self, num_samples, labels, scaled, seed, batch_size, runtime, guide=guide)
            if not runtime.is_main:
                continue
            report = distance_report(points, labels, self.dataset)
            out_dir = save_dir / f"scale_{scale:g}" if sweep else save_dir
            guided = loaded.description.conditional or guide is not None
            save_json(
                {
                    "checkpoint": str(loaded.path),
                    "step": loaded.step,
                    "weights": "ema" if loaded.use_ema else "raw",
                    "dataset": self.dataset,
                    "num_samples": num_samples,
                    "seed": seed,
                    **sampling_record(scaled, runtime, guided, loaded.diffusion),
                    **report,
                },
                out_dir / "evaluation.json",
            )
            save_point_arrays(points, labels, out_dir / "points.npz")
            title = (
                f"w = {scale:g}: SW {report['sliced_wasserstein']:.3f} (floor {report['sliced_wasserstein_floor']:.3f})"
            )
            save_panels([(title, points, labels)], out_dir / "samples.png", dataset=self.dataset, columns=1)
            print(f"w = {scale:g}: {distance_line(report, num_samples)}; wrote {out_dir / 'evaluation.json'}")
            panels.append((title, points, labels))
            rows.append({"guidance_scale": scale, "num_samples": num_samples, **report})
        if sweep and runtime.is_main:
            save_json(rows, save_dir / "guidance_sweep.json")
            save_panels(panels, save_dir / "guidance_sweep.png", dataset=self.dataset, columns=len(panels))
            print(f"wrote {save_dir / 'guidance_sweep.json'} and {save_dir / 'guidance_sweep.png'}")


def _kind(dataset: str, image_size: Optional[int], channels: int, class_names: list[str]) -> SampleKind:
    """The one place that tells the kinds apart: data of points has no image size."""
    if image_size is None:
        return PointKind(dataset, channels, class_names)
    return ImageKind(channels, image_size)


def kind_of_data(dataset: str, data: DataSplits) -> SampleKind:
    """The kind of a training run's data."""
    return _kind(dataset, data.image_size, data.channels, data.class_names)


def kind_of_model(description: ModelDescription) -> SampleKind:
    """The kind of a checkpoint's samples."""
    return _kind(
        description.data["dataset"],
        description.data["image_size"],
        description.data["channels"],
        description.class_names,
    )
