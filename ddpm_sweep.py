"""One sweep that picks: --evaluate --sweep over EMA length x guidance kind x guidance scale x solver/steps.

    python ddpm_main.py --evaluate --sweep --model_path models/run/ckpt.pt --sweep_ema 0.05,0.1,0.15 \
        --guide_model models/run/ckpt_epoch0010.pt --guidance_sweep 1,1.5,2,3 --sweep_samplers dpm++2m:20,dpm++3m:10

Every cell samples the same seeds through ddpm_evaluate.evaluate_one_setting and is ranked by one metric, chosen
once (`sweep_metric`): FID where the Inception weights are there, else the Frechet distance on the features of the data
set's judge (ddpm_judge) where it has one, else KID on the fixed random features (said in the output; those numbers
compare only with each other). Cells are written to <save_dir>/cells/<cell>/evaluation.json as
they finish, so an interrupted sweep started again computes only the missing ones. The sweep writes sweep.json,
sweep.md and sweep.png (the metric against the scale, one line per EMA length, guide and solver) to --save_dir,
and the best setting to <run folder>/sampling_best.json, which `--inference --sampling_preset best` applies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tqdm.auto import tqdm

from ddpm_checkpoint import LoadedModel, load_model
from ddpm_config import SamplingConfig, UsageError
from ddpm_evaluate import evaluate_one_setting
from ddpm_judge import judge_of_model_data
from ddpm_metrics import FEATURE_EXTRACTORS, inception_weights_path, reference_statistics, require_torch_fidelity
from ddpm_outputs import atomic_write, save_json
from ddpm_phema import write_posthoc_ema
from ddpm_runtime import Runtime
from ddpm_sampling import check_sampling_steps, load_guide

if TYPE_CHECKING:
    from ddpm_kinds import SampleKind

BEST_FILE = "sampling_best.json"


@dataclass(frozen=True)
class Cell:
    """One setting of the sweep."""

    ema: str  # "ema" (the checkpoint's own sampling weights) or a post-hoc EMA length, e.g. "0.100"
    guidance: str  # "cfg" (classifier-free), "auto" (autoguidance by --guide_model) or "none" (unguided)
    scale: float
    sampler: str
    steps: int

    @property
    def name(self) -> str:
        return f"ema-{self.ema}_{self.guidance}_w{self.scale:g}_{self.sampler}-{self.steps}"

    @property
    def line(self) -> str:
        """The line of the picture this cell belongs to (all but the scale)."""
        return f"EMA {self.ema}, {self.guidance}, {self.sampler} {self.steps}"


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """'dpm++2m:20,ddpm:1000' -> [("dpm++2m", 20), ("ddpm", 1000)]."""
    from ddpm_samplers import SAMPLERS

    pairs = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        name, _, steps = part.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise UsageError(
                f"--sweep_samplers expects SAMPLER:STEPS,... with a sampler of {', '.join(SAMPLERS)}, got {part!r}"
            )
        pairs.append((name, int(steps)))
    if not pairs:
        raise UsageError("--sweep_samplers is empty")
    return pairs


def sweep_metric(features: str, judged: bool = False) -> tuple[str, str]:
    """(metric, feature extractor): FID on Inception features where its weights are in the torch hub cache; else, where
    the data set has a judge (`judged`), the Frechet distance on its features ("judge"); else FID on the features asked
    for, or KID on the fixed random-conv features (unbiased at small sample counts)."""
    if features == "inception" and inception_weights_path().is_file():
        return "fid", features
    if judged:
        return "judge", "random-conv"
    if features != "inception":
        return "fid", features
    return "kid", "random-conv"


METRIC_NAMES = {"fid": "FID", "kid": "KID", "judge": "judge distance"}


def cells_of(emas: list[str], guidance: list[str], scales: list[float], samplers: list[tuple[str, int]]) -> list[Cell]:
    return [
        Cell(ema, kind, scale if kind != "none" else 1.0, sampler, steps)
        for ema in emas
        for kind in guidance
        for scale in (scales if kind != "none" else [1.0])
        for sampler, steps in samplers
    ]


def run_sweep(
    model_path: Path,
    kind: SampleKind,
    settings: SamplingConfig,
    runtime: Runtime,
    *,
    sweep_ema: Optional[list[float]],
    scales: list[float],
    samplers: Optional[list[tuple[str, int]]],
    num_samples: int,
    features: str,
    data_dir: str,
    seed: int,
    batch_size: int,
    save_dir: Path,
    use_ema: bool = True,
    compile: bool = False,
    judge: bool = True,
) -> Optional[dict]:
    """--evaluate --sweep: evaluate every cell not yet on disk (measured by the data set's judge too, unless not
    `judge`), rank them, write the table, the picture and the best setting; return the best cell's record (rank 0;
    None elsewhere)."""
    main = load_model(model_path, "cpu")
    require_torch_fidelity()
    weights = sweep_weights(Path(model_path), sweep_ema, runtime)
    guidance = (["cfg"] if main.description.conditional else []) + (["auto"] if settings.guide_model else [])
    metric, extractor_name, measure = sweep_measure(main, features, data_dir, batch_size, runtime, judge)
    cells = cells_of(list(weights), guidance or ["none"], scales, samplers or [(settings.sampler, settings.steps)])
    rows, networks, guides = [], {}, {}  # each network (and its guide) loaded once, at its first unfinished cell
    for cell in tqdm(cells, desc="sweep", unit="cell", disable=not runtime.is_main):
        record = cell_record(cell, save_dir, metric)
        if record is None:
            if cell.ema not in networks:
                networks[cell.ema] = load_model(weights[cell.ema], str(runtime.device), use_ema, compile)
                guides[cell.ema] = load_guide(
                    settings.guide_model, networks[cell.ema], runtime.device, use_ema, compile
                )
            record = evaluate_cell(
                cell,
                networks[cell.ema],
                guides[cell.ema],
                kind,
                settings,
                runtime,
                num_samples=num_samples,
                seed=seed,
                batch_size=batch_size,
                extractor_name=extractor_name,
                save_dir=save_dir,
                metric=metric,
                **measure,
            )
        rows.append(record)
    if not runtime.is_main:
        return None
    return write_sweep(
        rows, metric, extractor_name, weights, settings.guide_model, save_dir, num_samples=num_samples, seed=seed
    )


def sweep_weights(model_path: Path, sweep_ema: Optional[list[float]], runtime: Runtime) -> dict[str, Path]:
    """The weights of the sweep's EMA lengths: the checkpoint's own ("ema") and, for each of `sweep_ema`, its post-hoc
    EMA (ddpm_phema), written by rank 0 while the others wait."""
    weights = {"ema": model_path}
    if sweep_ema:
        if runtime.is_main:
            write_posthoc_ema(model_path, sweep_ema)
        if runtime.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        weights |= {f"{s:.3f}": model_path.parent / f"posthoc_ema_{s:.3f}.safetensors" for s in sweep_ema}
    return weights


def sweep_measure(
    main: LoadedModel, features: str, data_dir: str, batch_size: int, runtime: Runtime, judge: bool
) -> tuple[str, str, dict]:
    """(metric, feature extractor, what evaluate_one_setting measures with: extractor, reference, judge): chosen once
    (`sweep_metric`) and said; the other ranks get the metric only, to read finished cells."""
    data_judge = None
    if judge and runtime.is_main:
        data_judge = judge_of_model_data(main.description.data, data_dir, str(runtime.device))
    metric, extractor_name = sweep_metric(features, data_judge is not None)
    if not runtime.is_main:
        return metric, extractor_name, {"extractor": None, "reference": None, "judge": None}
    ranked_by = f"{metric.upper()} on {extractor_name} features"
    if metric == "judge":
        ranked_by = f"the judge's Frechet distance (its test accuracy {data_judge.test_accuracy:.3f})"
    if metric != "fid":
        ranked_by += f" (no Inception weights at {inception_weights_path()}; compare only with each other)"
    print(f"sweep: ranking by {ranked_by}")
    extractor = FEATURE_EXTRACTORS[extractor_name](str(runtime.device))
    data = main.description.data
    reference = reference_statistics(
        data["dataset"], data_dir, data["image_size"], extractor_name, extractor, batch_size, str(runtime.device)
    )
    return metric, extractor_name, {"extractor": extractor, "reference": reference, "judge": data_judge}


def write_sweep(
    rows: list[dict],
    metric: str,
    extractor_name: str,
    weights: dict[str, Path],
    guide_model: Optional[str],
    save_dir: Path,
    *,
    num_samples: int,
    seed: int,
) -> dict:
    """sweep.json, sweep.md and sweep.png in `save_dir`, and the best setting beside the checkpoint (BEST_FILE), which
    `--inference --sampling_preset best` applies; returns it."""
    best = min(rows, key=lambda row: row["value"] if math.isfinite(row["value"]) else math.inf)
    best_setting = {
        "metric": metric,
        "value": best["value"],
        "weights": str(weights[best["ema"]]),
        "sampler": best["sampler"],
        "steps": best["steps"],
        "guidance_scale": best["scale"],
        "guide_model": guide_model if best["guidance"] == "auto" else None,
        "sweep": str(save_dir / "sweep.json"),
    }
    save_json(
        {
            "metric": metric,
            "features": extractor_name,
            "num_samples": num_samples,
            "seed": seed,
            "cells": rows,
            "best": best_setting,
        },
        save_dir / "sweep.json",
    )
    table = sweep_table(rows, metric)
    atomic_write(save_dir / "sweep.md", lambda f: f.write(table.encode()))
    plot_sweep(rows, metric, save_dir / "sweep.png")
    best_path = weights["ema"].parent / BEST_FILE
    save_json(best_setting, best_path)
    print(table, end="")
    print(
        f"best: {best['name']} ({METRIC_NAMES[metric]} {best['value']:.4f}); wrote {best_path} "
        f"(--inference --sampling_preset best uses it)"
    )
    return best_setting


def cell_record(cell: Cell, save_dir: Path, metric: str) -> Optional[dict]:
    """A finished cell's record, from its evaluation.json; None if it has not run yet."""
    path = save_dir / "cells" / cell.name / "evaluation.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    figures = results.get("judge") or {}
    value = {"fid": results["fid"], "kid": (results["kid"] or {}).get("mean"), "judge": figures.get("distance")}[metric]
    return {
        "name": cell.name,
        **vars(cell),
        "value": math.nan if value is None else value,
        "class_consistency": results["class_consistency"],
        "judge_class_accuracy": figures.get("class_accuracy"),
        "judge_distance": figures.get("distance"),
        "judge_floor": figures.get("floor"),
        "judge_test_accuracy": figures.get("test_accuracy"),
        "sampling_seconds": results["sampling_seconds"],
    }


def evaluate_cell(
    cell: Cell,
    loaded: LoadedModel,
    guide: Optional[LoadedModel],
    kind: SampleKind,
    settings: SamplingConfig,
    runtime: Runtime,
    *,
    save_dir: Path,
    metric: str,
    **evaluation,
) -> Optional[dict]:
    """Sample and measure one cell (all ranks sample; rank 0 measures and writes its evaluation.json); `guide` guides
    the autoguidance cells."""
    cell_settings = replace(
        settings,
        sampler=cell.sampler,
        steps=cell.steps,
        guidance_scale=cell.scale,
        guide_model=settings.guide_model if cell.guidance == "auto" else None,
    )
    check_sampling_steps(cell.steps, loaded)
    evaluate_one_setting(
        loaded,
        kind,
        cell_settings,
        runtime,
        out_dir=save_dir / "cells" / cell.name,
        guide=guide if cell.guidance == "auto" else None,
        **evaluation,
    )
    return cell_record(cell, save_dir, metric) if runtime.is_main else None


def sweep_table(rows: list[dict], metric: str) -> str:
    """One line per cell, best first; the judge's class accuracy and distance (floor) where it measured them."""
    show = lambda value, digits: "-" if value is None else f"{value:.{digits}f}"  # noqa: E731
    lines = [
        f"| EMA | guidance | w | sampler | steps | {METRIC_NAMES[metric]} | class consistency | "
        "judge class accuracy | judge distance (floor) | sampling s |",
        "| --- " * 10 + "|",
    ]
    for row in sorted(rows, key=lambda row: row["value"] if math.isfinite(row["value"]) else math.inf):
        distance = "-"
        if row.get("judge_distance") is not None:
            distance = f"{row['judge_distance']:.3f} ({row['judge_floor']:.3f})"
        lines.append(
            f"| {row['ema']} | {row['guidance']} | {row['scale']:g} | {row['sampler']} | {row['steps']} | "
            f"{row['value']:.4f} | {show(row['class_consistency'], 3)} | {show(row.get('judge_class_accuracy'), 3)} | "
            f"{distance} | {row['sampling_seconds']:.1f} |"
        )
    accuracies = {row.get("judge_test_accuracy") for row in rows} - {None}
    if accuracies:
        lines.append(
            f"\nThe judge's accuracy on the real test images (the ceiling of its class accuracy): {max(accuracies):.3f}"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], metric: str, path: Path) -> None:
    """The metric against the guidance scale, one line per EMA length, guidance kind and solver."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for line in dict.fromkeys(Cell(r["ema"], r["guidance"], r["scale"], r["sampler"], r["steps"]).line for r in rows):
        points = sorted(
            (r["scale"], r["value"])
            for r in rows
            if Cell(r["ema"], r["guidance"], r["scale"], r["sampler"], r["steps"]).line == line
        )
        axes.plot(*zip(*points), "o-", label=line)
    axes.set(xlabel="guidance scale w", ylabel=f"{METRIC_NAMES[metric]} (lower is better)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))
    plt.close(figure)


def best_preset(model_path: Path) -> dict:
    """--sampling_preset best: the setting a sweep wrote beside the checkpoint."""
    path = Path(model_path).parent / BEST_FILE
    if not path.is_file():
        raise UsageError(f"--sampling_preset best needs {path}: run --evaluate --sweep on {model_path} first")
    return json.loads(path.read_text())
