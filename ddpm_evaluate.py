r"""Evaluation runs: --evaluate (FID, IS, KID, precision/recall, class consistency of a checkpoint's samples), guidance
sweeps, --compare_checkpoints, and the loss of a model on a data split.

    python ddpm_main.py --evaluate --model_path models/run/ckpt.pt --fid_num_samples 10000 \
        --sampler dpm++2m --sampling_steps 20

The metrics themselves and their feature extractors are in ddpm_metrics.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ddpm_checkpoint import LoadedModel, load_model
from ddpm_config import SamplingConfig, UsageError
from ddpm_data import Split, load_batch
from ddpm_diffusion import Diffusion
from ddpm_judge import Judge, describe_figures, judge_of_model_data
from ddpm_metrics import (
    COMPARABLE_TO_PUBLISHED,
    FEATURE_EXTRACTORS,
    FeatureExtractor,
    ReferenceStatistics,
    evaluate_sample_set,
    load_reference_file,
    reference_statistics,
    require_torch_fidelity,
)
from ddpm_outputs import save_image_grid, save_json, save_labelled_rows, save_pngs, save_sample_arrays
from ddpm_runtime import Runtime, unwrap
from ddpm_sampling import check_sampling_steps, every_class_in_turn, generate_from, load_guide, sampling_record

if TYPE_CHECKING:
    from ddpm_kinds import SampleKind

EVALUATION_GRID_IMAGES = 64  # images in an evaluation's grid.png
SWEEP_GRID_COLUMNS = 8
EVAL_CHUNK = 250  # evaluation noise is seeded per chunk of this many examples, whatever the batch size


def save_sample_set(images: torch.Tensor, labels: Optional[torch.Tensor], out_dir: Path, pngs: bool = False) -> None:
    """samples.npz (ADM's layout, see ddpm_outputs.save_sample_arrays), grid.png of the first images and, with
    `pngs`, every image as samples/NNNNN.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_sample_arrays(images.numpy(), None if labels is None else labels.long().numpy(), out_dir / "samples.npz")
    save_image_grid(images[:EVALUATION_GRID_IMAGES].permute(0, 3, 1, 2).float() / 127.5 - 1, out_dir / "grid.png")
    if pngs:
        save_pngs(images.numpy(), out_dir / "samples")


def describe_run(
    loaded: LoadedModel,
    settings: SamplingConfig,
    runtime: Runtime,
    num_samples: int,
    seed: int,
    extractor_name: str,
    reference: ReferenceStatistics,
) -> dict:
    """Everything needed to reproduce and compare an evaluation, for the results JSON."""
    return {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "weights": "ema" if loaded.use_ema else "raw",
        "dataset": loaded.description.data["dataset"],
        "image_size": loaded.description.data["image_size"],
        "num_samples": num_samples,
        "seed": seed,
        **sampling_record(
            settings,
            runtime,
            guided=loaded.description.conditional or settings.guide_model is not None,
            diffusion=loaded.diffusion,
        ),
        "feature_extractor": extractor_name,
        "comparable_to_published_fid": extractor_name in COMPARABLE_TO_PUBLISHED,
        "reference_statistics": str(reference.path),
        "reference_images": reference.num_images,
    }


def evaluate_one_setting(
    loaded: LoadedModel,
    kind: SampleKind,
    settings: SamplingConfig,
    runtime: Runtime,
    *,
    num_samples: int,
    seed: int,
    batch_size: int,
    extractor_name: str,
    extractor: Optional[FeatureExtractor],
    reference: Optional[ReferenceStatistics],
    out_dir: Path,
    save_pngs: bool = False,
    guide: Optional[LoadedModel] = None,
    judge: Optional[Judge] = None,
) -> Optional[tuple[dict, torch.Tensor]]:
    """Generate (shared out over the ranks; autoguided by `guide` if given), then on rank 0 measure (with `judge` too,
    where given) and write samples.npz, grid.png and evaluation.json to out_dir and return (results, images); None on
    the other ranks."""
    labels = every_class_in_turn(loaded.description.num_classes, num_samples)
    started = time.perf_counter()
    images = generate_from(loaded, kind, num_samples, labels, settings, seed, batch_size, runtime, guide=guide)
    seconds = time.perf_counter() - started
    if not runtime.is_main:
        return None
    results = describe_run(loaded, settings, runtime, num_samples, seed, extractor_name, reference)
    results["sampling_seconds"] = round(seconds, 2)
    results["processes"] = runtime.world_size
    results.update(
        evaluate_sample_set(
            images, labels, results["dataset"], extractor, reference, batch_size, str(runtime.device), judge
        )
    )
    if extractor_name not in COMPARABLE_TO_PUBLISHED:
        results["notes"].append(
            f"{extractor_name} features: compare these numbers only with each other, never with published FID"
        )
    save_sample_set(images, labels, out_dir, pngs=save_pngs)
    save_json(results, out_dir / "evaluation.json")
    return results, images


def run_evaluation(
    loaded: LoadedModel,
    kind: SampleKind,
    settings: SamplingConfig,
    runtime: Runtime,
    *,
    guidance_sweep: Optional[list[float]],
    num_samples: int,
    seed: int,
    batch_size: int,
    save_dir: Path,
    use_ema: bool = True,
    compile: bool = False,
    **measure,
) -> None:
    """--evaluate: the samples of `loaded` at settings.guidance_scale, or at each scale of `guidance_sweep`, measured
    as the kind measures them (ddpm_kinds: images by FID and its companions, `evaluate_images`; points by the sliced
    Wasserstein distance). Under torchrun every rank samples its share; rank 0 alone measures and writes."""
    check_sampling_steps(settings.steps, loaded)
    guide = load_guide(settings.guide_model, loaded, runtime.device, use_ema, compile)
    if guidance_sweep and not loaded.description.conditional and guide is None:
        raise UsageError(
            f"--guidance_sweep needs a class-conditional model or a --guide_model, but {loaded.path} is unconditional"
        )
    kind.evaluate(
        loaded,
        settings,
        runtime,
        scales=guidance_sweep or [settings.guidance_scale],
        sweep=bool(guidance_sweep),
        labels=every_class_in_turn(loaded.description.num_classes, num_samples),
        guide=guide,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        save_dir=save_dir,
        **measure,
    )


def evaluate_images(
    loaded: LoadedModel,
    kind: SampleKind,
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
    fid_ref: Optional[Path] = None,
    save_pngs: bool = False,
    judge: bool = True,
) -> None:
    """FID (and IS, KID, precision/recall, class consistency, the judge's figures where `judge` and the data set has
    one: ddpm_judge) of `num_samples` images at each scale, against the training set's features or the statistics in
    `fid_ref`; a guidance sweep (`sweep`) writes a folder per scale and the sweep's table and pictures."""
    require_torch_fidelity()
    data = loaded.description.data
    extractor, reference = None, None
    if runtime.is_main:
        extractor = FEATURE_EXTRACTORS[features](str(runtime.device))
        if fid_ref is not None:
            reference = load_reference_file(fid_ref, extractor, loaded.description.image_shape, str(runtime.device))
        else:
            reference = reference_statistics(
                data["dataset"], data_dir, data["image_size"], features, extractor, batch_size, str(runtime.device)
            )
    data_judge = judge_of_model_data(data, data_dir, str(runtime.device)) if judge and runtime.is_main else None
    outcomes = []
    for scale in scales:
        out_dir = save_dir / f"scale_{scale:g}" if sweep else save_dir
        outcome = evaluate_one_setting(
            loaded,
            kind,
            replace(settings, guidance_scale=scale),
            runtime,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            extractor_name=features,
            extractor=extractor,
            reference=reference,
            out_dir=out_dir,
            save_pngs=save_pngs,
            guide=guide,
            judge=data_judge,
        )
        if outcome is not None:
            print(summary_line(outcome[0], out_dir / "evaluation.json"))
            outcomes.append(outcome)
    if sweep and runtime.is_main:
        save_guidance_sweep(outcomes, data["class_names"] if loaded.description.conditional else [], save_dir)


def summary_line(results: dict, json_path: Path) -> str:
    """Every figure with the number of samples it was measured on."""
    count = results["num_samples"]
    reference = (
        f"{results['reference_images']} reference images"
        if results["reference_images"]
        else f"the statistics in {results['reference_statistics']}"
    )
    text = f"FID {results['fid']:.3f} ({results['feature_extractor']} features, {count} samples against {reference})"
    if results["inception_score"]:
        text += (
            f", IS {results['inception_score']['mean']:.3f} +- {results['inception_score']['std']:.3f} ({count} "
            "samples)"
        )
    if results["kid"]:
        kid = results["kid"]
        text += (
            f", KID {kid['mean']:.5f} +- {kid['std']:.5f} ({kid['subsets']} subsets of {kid['subset_size']} of "
            f"{count} samples)"
        )
    if results["precision_recall"]:
        pr = results["precision_recall"]
        text += f", precision {pr['precision']:.3f} recall {pr['recall']:.3f} (k={pr['neighborhood']}, {count} samples)"
    if results["class_consistency"] is not None:
        text += f", class consistency {results['class_consistency']:.3f}"
    if results.get("judge"):
        text += f"; {describe_figures(results['judge'])}"
    return f"{text}; wrote {json_path}"


def save_guidance_sweep(sweep: list[tuple[dict, torch.Tensor]], class_names: list[str], save_dir: Path) -> None:
    """guidance_sweep.json and .md (FID, IS, class consistency, the judge's figures per scale), guidance_sweep.png
    (FID and IS against scale) and guidance_class<k>_<name>.png (one labelled row per scale, the same noise in each
    column)."""
    rows = [
        {
            "guidance_scale": results["guidance_scale"],
            "num_samples": results["num_samples"],
            "fid": results["fid"],
            "inception_score": results["inception_score"]["mean"] if results["inception_score"] else None,
            "class_consistency": results["class_consistency"],
            **judge_columns(results.get("judge")),
        }
        for results, _ in sweep
    ]
    save_json(rows, save_dir / "guidance_sweep.json")
    (save_dir / "guidance_sweep.md").write_text(markdown_table(rows))
    plot_guidance_sweep(rows, save_dir / "guidance_sweep.png")
    for index, name in enumerate(class_names):
        # Labels cycle through the classes, so class `index` sits at positions index, index + K, ...
        columns = slice(index, index + len(class_names) * SWEEP_GRID_COLUMNS, len(class_names))
        grid = [(f"w={results['guidance_scale']:g}", images[columns]) for results, images in sweep]
        safe_name = re.sub(r"[^A-Za-z0-9_-]+", "_", name)
        save_labelled_rows(grid, save_dir / f"guidance_class{index}_{safe_name}.png")
    print(markdown_table(rows), end="")


def judge_columns(figures: Optional[dict]) -> dict:
    """The judge's figures as columns of a table (none without a judge)."""
    if not figures:
        return {}
    return {
        "judge_class_accuracy": figures["class_accuracy"],
        "judge_distance": figures["distance"],
        "judge_floor": figures["floor"],
        "judge_test_accuracy": figures["test_accuracy"],
    }


def markdown_table(rows: list[dict]) -> str:
    """One line per row, '-' for a missing value."""
    show = lambda value: "-" if value is None else str(value) if isinstance(value, int) else f"{value:.4g}"  # noqa: E731
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(show(value) for value in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_guidance_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scales = [row["guidance_scale"] for row in rows]
    figure, fid_axes = plt.subplots(figsize=(6, 4))
    fid_axes.plot(scales, [row["fid"] for row in rows], "o-", color="tab:blue")
    fid_axes.set(xlabel="guidance scale w", ylabel="FID (lower is better)")
    if all(row["inception_score"] is not None for row in rows):
        is_axes = fid_axes.twinx()
        is_axes.plot(scales, [row["inception_score"] for row in rows], "s--", color="tab:orange")
        is_axes.set_ylabel("Inception Score (higher is better)")
    fid_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_checkpoint_comparison(
    paths: list[str],
    kind: SampleKind,
    settings: SamplingConfig,
    runtime: Runtime,
    *,
    num_samples: int,
    seed: int,
    batch_size: int,
    save_dir: Path,
    use_ema: bool = True,
    compile: bool = False,
    data_dir: str = "data",
    judge: bool = True,
) -> None:
    """--compare_checkpoints: the same noise (and labels) through several checkpoints of one run,
    one row per checkpoint, labelled by training step, in checkpoint_comparison.png, with the judge's figures of
    each."""
    loaded = sorted(
        (load_model(path, str(runtime.device), use_ema, compile) for path in paths), key=lambda item: item.step or 0
    )
    for other in loaded[1:]:
        check_same_run(loaded[0], other)
    check_sampling_steps(settings.steps, loaded[0])
    labels = every_class_in_turn(loaded[0].description.num_classes, num_samples)
    rows = [
        (
            f"step {item.step}",
            generate_from(
                item, kind, num_samples, labels, settings, seed, batch_size, runtime, desc=f"step {item.step}"
            ),
        )
        for item in loaded
    ]
    if not runtime.is_main:
        return
    save_labelled_rows(rows, save_dir / "checkpoint_comparison.png")
    data_judge = judge_of_model_data(loaded[0].description.data, data_dir, str(runtime.device)) if judge else None
    figures = [data_judge.figures(images, labels) for _, images in rows] if data_judge else None
    for (name, _), row_figures in zip(rows, figures or []):
        print(f"{name}: {describe_figures(row_figures)}")
    save_json(
        {
            "checkpoints": [str(item.path) for item in loaded],
            "training_steps": [item.step for item in loaded],
            "seed": seed,
            "sampling": asdict(settings),
            "judge": figures,
        },
        save_dir / "checkpoint_comparison.json",
    )
    print(f"wrote {save_dir / 'checkpoint_comparison.png'}: {len(rows)} rows of {num_samples} images")


def check_same_run(first: LoadedModel, other: LoadedModel) -> None:
    """Rows compare only if the checkpoints share architecture, schedule and data."""
    for key in ("model_config", "diffusion", "data"):
        if first.checkpoint[key] != other.checkpoint[key]:
            raise UsageError(f"{other.path} and {first.path} are not from one run: their {key} differs")


@torch.no_grad()
def evaluation_loss(
    model: torch.nn.Module,
    diffusion: Diffusion,
    split: Split,
    runtime: Runtime,
    *,
    seed: int,
    batch_size: int,
    loss_type: str,
    count: Optional[int] = None,
) -> float:
    """Mean loss over the first `count` examples of a split (all: None) with timesteps and noise fixed per example
    (seeded per chunk of EVAL_CHUNK), so the number changes only when the weights do, and the first examples of a
    split always get the same noise whatever `count` is. Chunks are shared out across ranks."""
    was_training = model.training
    model.eval()
    total_count = len(split) if count is None else min(count, len(split))
    total, seen = torch.zeros((), device=runtime.device, dtype=torch.float64), 0
    null_label = unwrap(model).null_label
    for chunk, begin in enumerate(range(0, total_count, EVAL_CHUNK)):
        if chunk % runtime.world_size != runtime.rank:
            continue
        generator = torch.Generator().manual_seed(seed * 7_919 + chunk)
        size = min(EVAL_CHUNK, len(split) - begin)  # the noise of a whole chunk is drawn, whatever part is used
        t = torch.randint(0, diffusion.num_timesteps, (size,), generator=generator)
        noise = torch.randn((size, *split.images.shape[1:]), generator=generator)
        indices = torch.arange(begin, min(begin + EVAL_CHUNK, total_count))
        for part in torch.split(torch.arange(len(indices)), batch_size):
            x0, y = load_batch(split.images, split.labels, indices[part], False, runtime.device)
            loss = diffusion.p_losses(
                model,
                x0,
                t[part].to(runtime.device),
                y if null_label is not None else None,
                noise[part].to(runtime.device),
                loss_type,
            )
            total += loss.double() * len(part)
        seen += len(indices)
    if runtime.world_size > 1:
        stats = torch.stack([total, torch.tensor(float(seen), device=runtime.device, dtype=torch.float64)])
        dist.all_reduce(stats)
        total, seen = stats[0], stats[1].item()
    model.train(was_training)
    return total.item() / seen if seen else math.nan  # NaN: an empty split (--val_fraction 0)
