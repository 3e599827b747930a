"""Sampling: one path from a network, its diffusion and a SamplingConfig to images.

    python ddpm_main.py --inference --model_path models/run/ckpt.pt --num_samples 64

`generate` is the only place that draws images: `--inference` (`run_inference`, here), `--evaluate` and
`--compare_checkpoints` (ddpm_evaluate) and the training grids (ddpm_train) all call it, so every sampling
flag (sampler, steps, eta, guidance scale, rescale and interval, autocast) applies to each of them, and a
seed gives the same images whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ddpm_checkpoint import LoadedModel, load_model
from ddpm_config import SamplingConfig, UsageError
from ddpm_diffusion import Diffusion
from ddpm_runtime import Runtime, autocast_dtype, gather_rows, shard
from ddpm_samplers import sampler_class

if TYPE_CHECKING:
    from ddpm_kinds import SampleKind

NOISE_SEED_STRIDE = 1_000_003  # batch b of a run with seed s draws its noise from seed s + b * this


def check_sampling_steps(steps: Optional[int], loaded: LoadedModel) -> None:
    if steps is not None and steps > loaded.diffusion.num_timesteps:
        raise UsageError(
            f"--sampling_steps ({steps}) cannot exceed the model's {loaded.diffusion.num_timesteps} timesteps"
        )


class AutocastNetwork(nn.Module):
    """The network under autocast (bf16 or fp16), its noise prediction returned in float32, so that the
    guidance combination and the sampler's updates keep full precision."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t, labels).float()


def every_class_in_turn(num_classes: Optional[int], count: int) -> Optional[torch.Tensor]:
    """Labels 0, 1, ..., K-1, 0, 1, ... (every class equally often); None for an unconditional model."""
    return None if num_classes is None else torch.arange(count) % num_classes


def generate(
    model: nn.Module,
    diffusion: Diffusion,
    kind: SampleKind,
    count: int,
    labels: Optional[torch.Tensor],
    settings: SamplingConfig,
    seed: int,
    batch_size: int,
    runtime: Runtime,
    desc: str = "generating",
    guide: Optional[nn.Module] = None,
    trajectory: Optional[list[torch.Tensor]] = None,
) -> torch.Tensor:
    """`count` samples of `model` as the `kind` saves them (ddpm_kinds: uint8 images (N, H, W, C), or float32 points
    (N, D) unclipped), on every rank, in batches of `batch_size`, with `settings` resolved (a number for every
    setting, SampleKind.sampling_settings).

    Batch b draws all its noise from its own generator, seeded with seed + b * NOISE_SEED_STRIDE, so the
    images depend on the seed and the batch size only: one process or many (torchrun, each rank sampling
    a contiguous share of the batches, gathered in order) give the same images, and the first batch is
    what `Diffusion.sample` gives with a generator seeded with `seed`. The model's train/eval mode is kept.
    With `guide` (a network of the same data and diffusion, see `load_guide`), autoguidance instead of
    classifier-free guidance. `trajectory` receives the reverse process of the first batch (Diffusion.sample's),
    on the rank that draws it.
    """
    amp_dtype = autocast_dtype(settings.amp, runtime.device)
    network = model if amp_dtype is None else AutocastNetwork(model, amp_dtype)
    if guide is not None and amp_dtype is not None:
        guide = AutocastNetwork(guide, amp_dtype)
    starts = range(0, count, batch_size)
    sizes = {index: min(batch_size, count - starts[index]) for index in shard(len(starts), runtime)}
    samples = [kind.to_saved(torch.zeros((0, *kind.sample_shape)))]
    desc = desc if runtime.world_size == 1 else f"{desc} (rank 0's share of {runtime.world_size})"
    with tqdm(total=sum(sizes.values()), desc=desc, unit="img", disable=not runtime.is_main, leave=False) as bar:
        for index, size in sizes.items():
            begin = starts[index]
            drawn = diffusion.sample(
                network,
                (size, *kind.sample_shape),
                settings,
                labels=None if labels is None else labels[begin : begin + size].to(runtime.device),
                null_label=model.null_label,
                generator=torch.Generator().manual_seed(seed + index * NOISE_SEED_STRIDE),
                device=runtime.device,
                guide=guide,
                clip_denoised=kind.clip_denoised,
                trajectory=trajectory if index == 0 else None,
                progress=runtime.is_main,
            )
            samples.append(kind.to_saved(drawn))
            bar.update(size)
    return gather_rows(torch.cat(samples), runtime)


def every_class_samples(
    model: nn.Module,
    diffusion: Diffusion,
    kind: SampleKind,
    count: int,
    num_classes: Optional[int],
    settings: SamplingConfig,
    seed: int,
    batch_size: int,
    runtime: Runtime,
    desc: str,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(`count` samples of every class in turn, their labels; None for an unconditional model), drawn in eval mode
    from the fixed noise of `seed`, the model's train/eval mode restored: the samples a training run looks at."""
    labels = every_class_in_turn(num_classes, count)
    was_training = model.training
    model.eval()
    samples = generate(model, diffusion, kind, count, labels, settings, seed, batch_size, runtime, desc=desc)
    model.train(was_training)
    return samples, labels


def generate_from(
    loaded: LoadedModel,
    kind: SampleKind,
    count: int,
    labels: Optional[torch.Tensor],
    settings: SamplingConfig,
    seed: int,
    batch_size: int,
    runtime: Runtime,
    desc: str = "generating",
    guide: Optional[LoadedModel] = None,
    trajectory: Optional[list[torch.Tensor]] = None,
) -> torch.Tensor:
    """`generate` for a loaded checkpoint (and, for autoguidance, a loaded guide)."""
    return generate(
        loaded.model,
        loaded.diffusion,
        kind,
        count,
        labels,
        settings,
        seed,
        batch_size,
        runtime,
        desc,
        guide=None if guide is None else guide.model,
        trajectory=trajectory,
    )


GUIDE_MUST_MATCH = {
    "image size and channels": lambda d: (d.data["image_size"], d.data["channels"]),
    "classes": lambda d: (d.conditional, d.class_names),
    "diffusion": lambda d: {key: d.diffusion.get(key) for key in ("timesteps", "schedule", "prediction_type")},
}


def load_guide(
    path: Optional[str | Path],
    main: LoadedModel,
    device: str | torch.device,
    use_ema: bool = True,
    compile: bool = False,
) -> Optional[LoadedModel]:
    """--guide_model: the autoguidance network (None without one), refused in one line unless it is a model of the same
    images, classes and diffusion as `main` (Karras et al. 2024 guide with a weaker model of the same task)."""
    if path is None:
        return None
    guide = load_model(path, device, use_ema, compile)
    for what, of in GUIDE_MUST_MATCH.items():
        if of(guide.description) != of(main.description):
            raise UsageError(
                f"--guide_model {path} does not match {main.path}: its {what} differ "
                f"({of(guide.description)} against {of(main.description)})"
            )
    return guide


def parse_sample_classes(text: str, class_names: list[str], num_samples: int) -> list[int]:
    """Class indices or names, repeated in order (or cut) to `num_samples` labels."""
    by_name = {name.lower(): index for index, name in enumerate(class_names)}
    classes = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        if part.lstrip("-").isdigit():
            index = int(part)
            if not 0 <= index < len(class_names):
                raise UsageError(f"class {index} is out of range: this model has classes 0-{len(class_names) - 1}")
        elif part.lower() in by_name:
            index = by_name[part.lower()]
        else:
            raise UsageError(f"unknown class {part!r}; this model's classes are: {', '.join(class_names)}")
        classes.append(index)
    return [classes[i % len(classes)] for i in range(num_samples)]


def inference_labels(
    loaded: LoadedModel, sample_classes: Optional[str], require_conditional: bool, num_samples: int
) -> Optional[torch.Tensor]:
    """The labels of --inference: --sample_classes, or every class in turn; None for an unconditional model (refused
    with --sample_classes or --conditional)."""
    if not loaded.description.conditional and (require_conditional or sample_classes):
        flag = "--sample_classes" if sample_classes else "--conditional"
        raise UsageError(f"{flag} needs a class-conditional model, but {loaded.path} is unconditional")
    if not loaded.description.conditional:
        return None
    text = sample_classes or ",".join(str(i) for i in range(len(loaded.description.class_names)))
    return torch.tensor(parse_sample_classes(text, loaded.description.class_names, num_samples))


def run_inference(
    loaded: LoadedModel,
    kind: SampleKind,
    settings: SamplingConfig,
    runtime: Runtime,
    *,
    num_samples: Optional[int],
    sample_classes: Optional[str],
    require_conditional: bool,
    seed: int,
    batch_size: int,
    save_dir: Path,
    use_ema: bool = True,
    compile: bool = False,
) -> None:
    """--inference (everything about the model coming from its checkpoint): the labels, the guide, then the kind
    draws and writes (ddpm_kinds: grid.png and PNGs of images; samples.png and points.npz of points). Under torchrun
    every rank samples its share of the batches and rank 0 writes them all."""
    count = num_samples or kind.inference_count
    labels = inference_labels(loaded, sample_classes, require_conditional, count)
    check_sampling_steps(settings.steps, loaded)
    guide = load_guide(settings.guide_model, loaded, runtime.device, use_ema, compile)
    kind.inference(
        loaded,
        settings,
        runtime,
        count=count,
        labels=labels,
        guide=guide,
        seed=seed,
        batch_size=batch_size,
        save_dir=save_dir,
    )


def sampling_record(settings: SamplingConfig, runtime: Runtime, guided: bool, diffusion: Diffusion) -> dict:
    """The sampling settings as a results file records them (guidance only where it acted, the variance
    where the ancestral sampler ran, the timestep spacing where the sampler takes one)."""
    chosen = sampler_class(settings.sampler)
    return {
        "sampler": settings.sampler,
        "sampling_steps": settings.steps,
        "variance": (settings.variance or diffusion.variance) if chosen.takes_variance else None,
        "eta": settings.eta,
        "timestep_spacing": chosen.chosen_spacing(settings.timestep_spacing) if chosen.takes_spacing else None,
        "network_autocast": str(autocast_dtype(settings.amp, runtime.device) or "float32"),
        "guidance_scale": settings.guidance_scale if guided else None,
        "guidance_rescale": settings.guidance_rescale if guided else None,
        "guidance_interval": list(settings.guidance_interval) if guided and settings.guidance_interval else None,
        "guidance": None if not guided else "autoguidance" if settings.guide_model else "classifier-free",
        "guide_model": settings.guide_model,
    }
