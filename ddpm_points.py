r"""2D toy runs: the distance of samples to the true distribution and the pictures of points (ddpm_data.POINT_DATASETS,
ddpm_model.MLPDenoiser); what training, --inference and --evaluate do with them is ddpm_kinds.PointKind.

    python ddpm_main.py --dataset moons --model_size mlp --conditional --max_steps 800 --batch_size 512 --lr 3e-3 \
        --save_model --run_name moons
    python ddpm_main.py --inference --model_path models/moons/ckpt.pt --sampler dpm++2m --sampling_steps 20

"How close" is the sliced Wasserstein distance (`sliced_wasserstein`) between the samples and as many fresh points
of the true distribution (drawn by ddpm_data.make_points from seeds no training set uses); the same distance between
two fresh sets of that size is its floor, what a perfect model would score (`distance_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ddpm_config import POINT_SAMPLES
from ddpm_data import POINT_CLASS_NAMES, make_points
from ddpm_diffusion import Diffusion
from ddpm_outputs import atomic_write

PROJECTIONS, PROJECTION_SEED = 256, 0  # the fixed random directions of the sliced Wasserstein distance
REFERENCE_SEED, FLOOR_SEED = (
    1_000_001,
    2_000_001,
)  # the fresh data the samples are measured against, and a second set for the floor
BACKGROUND_POINTS = 2000  # fresh data drawn in grey behind samples
FORWARD_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)  # of T: the steps the forward-process picture shows
REVERSE_PANELS = 6  # panels of the reverse-process picture, from x_T to the samples
PANEL_LIMIT = 3.0  # every panel shows [-3, 3]^2: data of unit variance, and the noise it diffuses into

Panel = tuple[str, torch.Tensor, Optional[torch.Tensor]]  # (title, points (N, 2), class labels or None)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int = PROJECTIONS, seed: int = PROJECTION_SEED
) -> float:
    """The sliced Wasserstein-2 distance (Rabin et al. 2011, Bonneel et al. 2015) of two point sets of equal size:
    the root of the mean, over `projections` fixed random directions theta, of the squared 1D Wasserstein-2 distance
    of <a, theta> and <b, theta>, which for equal sizes pairs the sorted projections."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs point sets of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(projections, a.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    projected_a, projected_b = ((points.double() @ theta.T).sort(dim=0).values for points in (a, b))
    return (projected_a - projected_b).pow(2).mean().sqrt().item()


def fresh_points(dataset: str, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Points of the true distribution, point i of class labels[i]."""
    return torch.from_numpy(make_points(dataset, labels.numpy(), seed))


def distance_report(samples: torch.Tensor, labels: Optional[torch.Tensor], dataset: str) -> dict:
    """The sliced Wasserstein distance of `samples` to as many fresh points with the same labels (unconditional
    samples, None: to the classes in equal shares), and its floor, the distance of a second fresh set to the first;
    per class for conditional samples."""
    class_names = POINT_CLASS_NAMES[dataset]
    truth_labels = labels if labels is not None else torch.arange(len(samples)) % len(class_names)
    fresh, second = (fresh_points(dataset, truth_labels, seed) for seed in (REFERENCE_SEED, FLOOR_SEED))
    report = {
        "sliced_wasserstein": sliced_wasserstein(samples, fresh),
        "sliced_wasserstein_floor": sliced_wasserstein(second, fresh),
    }
    if labels is not None and len(class_names) > 1:
        report["sliced_wasserstein_per_class"] = {
            name: {
                "distance": sliced_wasserstein(samples[labels == k], fresh[labels == k]),
                "floor": sliced_wasserstein(second[labels == k], fresh[labels == k]),
            }
            for k, name in enumerate(class_names)
            if (labels == k).any()
        }
    return report


def distance_line(report: dict, count: int) -> str:
    """The report in one line, every distance beside its floor."""
    text = (
        f"sliced Wasserstein {report['sliced_wasserstein']:.4f} (floor {report['sliced_wasserstein_floor']:.4f}: "
        f"two fresh data sets of {count} points)"
    )
    per_class = report.get("sliced_wasserstein_per_class", {})
    if per_class:
        text += "; per class " + ", ".join(
            f"{name} {value['distance']:.4f} (floor {value['floor']:.4f})" for name, value in per_class.items()
        )
    return text


def distance_text(entry: dict) -> str:
    """The distance of a loss-history entry, for the epoch line ("" without one)."""
    if "sliced_wasserstein" not in entry:
        return ""
    return f" | sliced Wasserstein {entry['sliced_wasserstein']:.4f} (floor {entry['sliced_wasserstein_floor']:.4f})"


# Pictures


def save_panels(panels: list[Panel], path: Path, dataset: Optional[str] = None, columns: int = 6) -> None:
    """One scatter plot per panel, coloured by class (tab10), on a grid of at most `columns` per row; with `dataset`,
    fresh data of it in grey behind each panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows, columns = -(-len(panels) // columns), min(columns, len(panels))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    background = None
    if dataset is not None:
        background = fresh_points(
            dataset, torch.arange(BACKGROUND_POINTS) % len(POINT_CLASS_NAMES[dataset]), REFERENCE_SEED
        )
    for axis, (title, points, labels) in zip(axes.flat, panels):
        if background is not None:
            axis.scatter(background[:, 0], background[:, 1], s=2, c="lightgrey", linewidths=0)
        colours = "tab:blue" if labels is None else [f"C{k % 10}" for k in labels.tolist()]
        axis.scatter(points[:, 0], points[:, 1], s=3, c=colours, linewidths=0)
        axis.set(
            xlim=(-PANEL_LIMIT, PANEL_LIMIT), ylim=(-PANEL_LIMIT, PANEL_LIMIT), aspect="equal", xticks=[], yticks=[]
        )
        axis.set_title(title, fontsize=9)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def save_forward_process(
    diffusion: Diffusion, dataset: str, path: Path, count: int = POINT_SAMPLES, seed: int = 0
) -> None:
    """x_t ~ q(x_t | x_0) (Diffusion.q_sample) of fresh data at FORWARD_FRACTIONS of the T steps."""
    labels = torch.arange(count) % len(POINT_CLASS_NAMES[dataset])
    x0 = fresh_points(dataset, labels, REFERENCE_SEED).to(diffusion.alphas_cumprod.device)
    generator = torch.Generator().manual_seed(seed)
    panels = []
    for fraction in FORWARD_FRACTIONS:
        step = round(fraction * (diffusion.num_timesteps - 1))
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = diffusion.q_sample(x0, torch.full((count,), step, device=x0.device), noise)
        panels.append(
            (f"q(x_t | x_0): t = {step}, alpha_bar {diffusion.alpha_bar(step).item():.3f}", x_t.cpu(), labels)
        )
    save_panels(panels, path)


def save_reverse_process(
    trajectory: list[torch.Tensor], labels: Optional[torch.Tensor], sampler: str, dataset: str, path: Path
) -> None:
    """REVERSE_PANELS states of one sampler run (x_T, then x after every step, from Diffusion.sample's trajectory)."""
    steps = len(trajectory) - 1
    chosen = sorted({round(i) for i in np.linspace(0, steps, min(REVERSE_PANELS, steps + 1))})
    labels = None if labels is None else labels[: len(trajectory[0])]
    panels = [
        ("x_T: noise" if i == 0 else f"{sampler}: after step {i} of {steps}", trajectory[i].float().cpu(), labels)
        for i in chosen
    ]
    save_panels(panels, path, dataset=dataset)


def save_point_arrays(points: torch.Tensor, labels: Optional[torch.Tensor], path: Path) -> None:
    """points.npz: `points` float32 (N, 2), `labels` int64 (-1: unconditional)."""
    label_array = np.full(len(points), -1, dtype=np.int64) if labels is None else labels.long().numpy()
    atomic_write(path, lambda f: np.savez(f, points=points.numpy(), labels=label_array))
