"""Files the tool writes: atomic writes, sample images and arrays, grids, JSON, JSON lines and plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """The one temporary name a write of `path` goes through: a writer killed mid-write leaves at most this one
    file behind, which the next write of `path` replaces (and the next training start removes)."""
    return path.with_name(path.name + TEMPORARY_SUFFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder and rename it over path: readers only ever see
    the old file or the complete new one, even if the process dies mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) to uint8 (N, H, W, C): -1 -> 0, 0 -> 128, 1 -> 255.

    Rounds half up, the same mapping torchvision.utils.save_image uses; values outside [-1, 1] are clamped.
    """
    scaled = (images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5
    return scaled.floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


MIN_DISPLAY_WIDTH = (
    64  # pictures meant to be looked at show each image at least this wide (samples.npz keeps native pixels)
)


def display_scale(width: int) -> int:
    """The whole-number enlargement that makes an image `width` pixels wide at least MIN_DISPLAY_WIDTH wide."""
    return max(1, math.ceil(MIN_DISPLAY_WIDTH / width))


def enlarge(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of (..., H, W) images: each pixel becomes a scale x scale block."""
    return images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save [-1, 1] images (N, C, H, W) as one PNG grid, ceil(sqrt(N)) per row unless nrow is given, each image
    enlarged (nearest neighbour) to at least MIN_DISPLAY_WIDTH pixels."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    shown = enlarge(images.detach().float().cpu(), display_scale(images.shape[-1]))
    atomic_write(
        path,
        lambda f: torchvision.utils.save_image(shown, f, format="png", nrow=nrow, normalize=True, value_range=(-1, 1)),
    )


def save_samples(images: torch.Tensor, labels: torch.Tensor | None, out_dir: str | os.PathLike) -> None:
    """Write out_dir/samples/00000.png, ... and out_dir/samples.npz with uint8 images (N, H, W, C) and int64
    labels (-1 marks an unconditional sample)."""
    out_dir = Path(out_dir)
    pixels = to_uint8(images).numpy()
    save_pngs(pixels, out_dir / "samples")
    save_sample_arrays(
        pixels, None if labels is None else labels.detach().cpu().long().numpy(), out_dir / "samples.npz"
    )


def save_pngs(pixels: np.ndarray, folder: str | os.PathLike) -> None:
    """uint8 images (N, H, W, C) as folder/00000.png, ...: what folder-based FID tools read (pytorch-fid, clean-fid,
    torch-fidelity)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(pixels):
        Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(folder / f"{index:05d}.png")


def save_sample_arrays(pixels: np.ndarray, labels: np.ndarray | None, path: str | os.PathLike) -> None:
    """The .npz of the guided-diffusion (ADM) evaluator, written atomically: `arr_0`, uint8 (N, H, W, C), first, then
    for class-conditional samples `arr_1`, their int64 labels; also `images` and `labels` (-1: unconditional), the
    names of earlier versions."""
    arrays = {"arr_0": pixels}
    if labels is not None:
        arrays["arr_1"] = labels
    arrays |= {"images": pixels, "labels": np.full(len(pixels), -1, dtype=np.int64) if labels is None else labels}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (a machine-readable log that a crash can cut only at the last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_loss_plot(history: dict, path: str | os.PathLike, title: str) -> None:
    """Train / validation / test loss against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")):
        axes.plot(history["epochs"], history[key], marker="o", markersize=3, label=label)
    axes.set(xlabel="epoch", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))
    plt.close(figure)


def save_labelled_rows(rows: list[tuple[str, torch.Tensor]], path: str | os.PathLike) -> None:
    """One row of uint8 images (N, H, W, C) per entry, its label written on the left: progressions over
    epochs, guidance sweeps, checkpoint comparisons; each image enlarged to at least MIN_DISPLAY_WIDTH pixels."""
    scale = display_scale(max(images.shape[2] for _, images in rows))
    rows = [(label, enlarge(images.permute(0, 3, 1, 2), scale).permute(0, 2, 3, 1)) for label, images in rows]
    cell = max(images.shape[1] for _, images in rows)
    columns = max(len(images) for _, images in rows)
    label_width = 8 + 6 * max(len(label) for label, _ in rows)
    canvas = Image.new("RGB", (label_width + cell * columns, cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate(rows):
        draw.text((4, row * cell + cell // 2 - 5), label, fill="black")
        for column, image in enumerate(images.numpy()):
            tile = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).convert("RGB")
            canvas.paste(tile, (label_width + column * cell, row * cell))
    atomic_write(path, lambda f: canvas.save(f, format="png"))
