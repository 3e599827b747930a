"""Data sets: CIFAR-10, MNIST, Fashion-MNIST, an image folder, synthetic shapes, 2D toy points; their splits and the
order of an epoch.

Every image data set is held in memory as uint8 images (N, C, H, W) plus int64 labels, split into train / val / test,
and served to the training loop as float batches in [-1, 1] (`load_batch`), in an order that is a function of
(seed, epoch) alone (`epoch_permutation`), so that a resumed run needs only its position in the epoch. The 2D toy
sets (POINT_DATASETS, `make_points`) are float32 points (N, 2) of about unit variance, served as they are.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ddpm_config import DATASETS, POINT_DATASETS, UsageError, first_line
from ddpm_datacache import decoded_images
from ddpm_imagefolder import find_images
from ddpm_runtime import Runtime

# Random left-right flips by default: CIFAR-10's objects are mirror-symmetric as a class; a folder's content may
# not be (digits, text, faces with a known side), so there they are asked for with --hflip.
DEFAULT_HFLIP = {
    "cifar10": True,
    "mnist": False,
    "fashion_mnist": False,
    "folder": False,
    "synthetic": True,
} | dict.fromkeys(POINT_DATASETS, False)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FOLDER_IMAGE_SIZE = 32  # a folder's images are scaled to this size unless --image_size says otherwise
LabelledImages = tuple[torch.Tensor, torch.Tensor]  # (uint8 images N,C,H,W, int64 labels N)


@dataclass
class Split:
    """One split of a data set in memory: uint8 images (N, C, H, W), or float32 points (N, 2), and int64 labels;
    `hflip`: the training loop flips each image left-right with probability 1/2 (`load_batch`)."""

    images: torch.Tensor
    labels: torch.Tensor
    hflip: bool = False

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    channels: int  # of points: their coordinates
    image_size: Optional[int]  # None: points

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of an image, (D,) of a point."""
        return tuple(self.train.images.shape[1:])


def load_datasets(
    name: str,
    data_dir: str | os.PathLike,
    image_size: int | None = None,
    hflip: bool | None = None,
    download: bool = True,
    seed: int = 0,
    channels: int | None = None,
    val_fraction: float = 0.1,
    conditional: bool = False,
    data_cache: str | None = None,
    use_data_cache: bool = True,
) -> DataSplits:
    """Load a data set and split it into train / val / test; the same seed always gives the same split.

    Data sets without an official test split (a folder without train/ and test/, a zip, synthetic) first hold out 10%
    as test. Validation is `val_fraction` of what remains for training (0: no validation split). `channels`
    forces grey (1) or RGB (3) images; by default a data set keeps its own (a folder whose images are all
    grey is grey). A folder or zip is decoded once into its cache (`data_cache`: its folder; None: beside the data)
    and memory-mapped; `use_data_cache` False decodes it into memory. `conditional`: refuse data without classes.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name in POINT_DATASETS and (image_size, channels) != (None, None):
        raise UsageError(f"--dataset {name} holds 2D points: --image_size and --channels are for images")
    if name == "folder":
        train, val, test, class_names = _load_image_source(
            Path(data_dir), image_size, channels, seed, val_fraction, conditional, data_cache, use_data_cache
        )
    else:
        data, test, class_names = _load_images(name, Path(data_dir), image_size, download, seed)
        generator = torch.Generator().manual_seed(seed)
        if test is None:
            data, test = _hold_out(data, 0.1, generator)
        train, val = _hold_out(data, val_fraction, generator)
        if image_size is not None:
            train, val, test = (_resize(images, image_size) for images in (train, val, test))
        train, val, test = (_to_channels(images, channels) for images in (train, val, test))

    use_hflip = DEFAULT_HFLIP[name] if hflip is None else hflip
    channels, size = train[0].shape[1], None if name in POINT_DATASETS else train[0].shape[-1]
    return DataSplits(
        train=Split(*train, hflip=use_hflip),
        val=Split(*val),
        test=Split(*test),
        class_names=class_names,
        channels=channels,
        image_size=size,
    )


def _load_images(
    name: str, data_dir: Path, image_size: int | None, download: bool, seed: int
) -> tuple[LabelledImages, LabelledImages | None, list[str]]:
    """Returns (training images, official test images or None, class names)."""
    if name == "cifar10":
        return _load_cifar10(data_dir, download)
    if name == "mnist":
        return _load_torchvision_idx(torchvision.datasets.MNIST, data_dir, download)
    if name == "fashion_mnist":
        return _load_torchvision_idx(torchvision.datasets.FashionMNIST, data_dir, download)
    if name in POINT_DATASETS:
        labels = np.random.default_rng(seed).permutation(np.arange(POINTS_PER_DATASET) % len(POINT_CLASS_NAMES[name]))
        points = make_points(name, labels, seed)
        return (
            (torch.from_numpy(points), torch.from_numpy(labels.astype(np.int64))),
            None,
            list(POINT_CLASS_NAMES[name]),
        )
    return _make_synthetic(6000, image_size or 32, seed), None, list(SYNTHETIC_CLASS_NAMES)


def _held_out_count(total: int, fraction: float) -> int:
    """How many of `total` examples a hold-out of `fraction` takes: at least one unless the fraction is 0."""
    count = 0 if fraction == 0 else max(1, math.floor(total * fraction + 1e-9))
    if total - count < 1:
        raise UsageError("too few images: a data set needs at least one image each for train, val and test")
    return count


def _hold_out(
    data: LabelledImages, fraction: float, generator: torch.Generator
) -> tuple[LabelledImages, LabelledImages]:
    """Split off a random `fraction` (at least one example unless the fraction is 0); returns (rest, held_out)."""
    images, labels = data
    count = _held_out_count(len(labels), fraction)
    order = torch.randperm(len(labels), generator=generator)
    held, kept = order[:count], order[count:]
    return (images[kept], labels[kept]), (images[held], labels[held])


def _to_channels(data: LabelledImages, channels: int | None) -> LabelledImages:
    """Grey (1) or RGB (3) images as asked; None keeps them. RGB becomes grey by ITU-R 601 luma (as PIL's "L")."""
    images, labels = data
    if channels is None or images.shape[1] == channels:
        return data
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous(), labels
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8), labels


def _resize(data: LabelledImages, size: int) -> LabelledImages:
    """Resize uint8 images (bilinear, antialiased) in chunks, so CIFAR-10 never needs a big float copy."""
    images, labels = data
    if images.shape[-2:] == (size, size):
        return data
    chunks = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        for chunk in images.split(4096)
    ]
    return torch.cat(chunks).round().clamp(0, 255).to(torch.uint8), labels


def _load_cifar10(data_dir: Path, download: bool) -> tuple[LabelledImages, LabelledImages, list[str]]:
    folder = data_dir / CIFAR10_FOLDER
    if not folder.is_dir():
        _download_cifar10(data_dir, download)
    batches = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])
    test = _read_cifar_batch(folder / "test_batch")
    meta = _unpickle_cifar_file(folder / "batches.meta")
    try:
        class_names = [name.decode() for name in meta[b"label_names"]]
    except Exception as error:
        raise UsageError(f"{folder / 'batches.meta'} is not a CIFAR-10 meta file (no b'label_names')") from error
    return train, test, class_names


def _download_cifar10(data_dir: Path, download: bool) -> None:
    """Let torchvision download, md5-check and extract the archive (it reuses an archive already in data_dir)."""
    place = f"place {CIFAR10_ARCHIVE} ({CIFAR10_URL}) in {data_dir}, or its extracted folder {CIFAR10_FOLDER}/"
    if not download:
        raise UsageError(f"CIFAR-10 not found in {data_dir} and downloading is off: {place}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision reports progress on stdout
            torchvision.datasets.CIFAR10(root=data_dir, download=True)
    except Exception as error:
        raise UsageError(
            f"CIFAR-10 not found in {data_dir} and could not be downloaded ({first_line(error)}): {place}"
        ) from error


def _unpickle_cifar_file(path: Path) -> dict:
    """Read one CIFAR-10 pickle ourselves: torchvision md5-checks every file and so rejects anything generated."""
    if not path.is_file():
        raise UsageError(f"CIFAR-10 file missing: {path} (re-extract {CIFAR10_ARCHIVE} there)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as error:
        raise UsageError(f"CIFAR-10 file unreadable: {path} ({first_line(error)})") from error


def _read_cifar_batch(path: Path) -> LabelledImages:
    """A batch holds b'data', N x 3072 uint8 (the R, G, B planes of a 32x32 image, row-major), and b'labels'."""
    batch = _unpickle_cifar_file(path)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    except Exception as error:
        raise UsageError(f"CIFAR-10 file unreadable: {path} is not a CIFAR-10 batch ({first_line(error)})") from error
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _load_torchvision_idx(
    dataset_class: type, data_dir: Path, download: bool
) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """torchvision reads the uncompressed idx files in <data_dir>/<ClassName>/raw/ (no md5 check)."""
    raw_dir = data_dir / dataset_class.__name__ / "raw"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision reports progress and failed mirrors on stdout
            train = dataset_class(root=data_dir, train=True, download=download)
            test = dataset_class(root=data_dir, train=False, download=download)
    except Exception as error:
        place = f"place {', '.join(MNIST_FILES)} (uncompressed) in {raw_dir}"
        if all((raw_dir / file).is_file() for file in MNIST_FILES):
            problem = f"could not read {dataset_class.__name__} from {raw_dir} ({first_line(error)})"
        elif download:
            problem = f"{dataset_class.__name__} not found in {raw_dir} and could not be downloaded"
        else:
            problem = f"{dataset_class.__name__} not found in {raw_dir} and downloading is off"
        raise UsageError(f"{problem}: {place}") from error
    class_names = [name.split(" - ")[0] for name in dataset_class.classes]  # MNIST's "0 - zero" becomes "0"
    return ((train.data.unsqueeze(1), train.targets.long()), (test.data.unsqueeze(1), test.targets.long()), class_names)


def split_order(train_count: int, official_test: bool, seed: int) -> tuple[np.ndarray, int]:
    """The order of a folder's training files in which `_hold_out`'s splits (from `seed`) are consecutive rows: first
    the held-out test images (none with an official test split), then the rest in the order whose first
    `val_fraction` `_hold_out` takes as validation. Returns (order, number held out as test)."""
    generator = torch.Generator().manual_seed(seed)
    if official_test:
        return torch.randperm(train_count, generator=generator).numpy(), 0
    first = torch.randperm(train_count, generator=generator)
    test_count = _held_out_count(train_count, 0.1)
    rest = first[test_count:]
    return torch.cat([first[:test_count], rest[torch.randperm(len(rest), generator=generator)]]).numpy(), test_count


def _load_image_source(
    data_dir: Path,
    image_size: int | None,
    channels: int | None,
    seed: int,
    val_fraction: float,
    conditional: bool,
    data_cache: str | None,
    use_data_cache: bool,
) -> tuple[LabelledImages, LabelledImages, LabelledImages, list[str]]:
    """A folder or dataset zip (ddpm_imagefolder), decoded once into its cache (ddpm_datacache) and memory-mapped.
    The splits are consecutive rows (`split_order`): views of the map, sharing its pages, not copies.
    Returns (train, val, test, class names)."""
    source = find_images(data_dir)
    if conditional and not source.class_names:
        raise UsageError(
            f"--conditional needs classes and {data_dir} has none: give it one sub-folder per class "
            "(or a zip whose dataset.json has labels), or train without --conditional"
        )
    train_count = len(source.train.names)
    order, test_count = split_order(train_count, source.test is not None, seed)
    val_end = test_count + _held_out_count(train_count - test_count, val_fraction)
    decoded = decoded_images(
        source, image_size or source.native_size or FOLDER_IMAGE_SIZE, channels, order, seed, data_cache, use_data_cache
    )
    images, labels = torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels)
    rows = lambda start, end: (images[start:end], labels[start:end])  # noqa: E731
    test = rows(0, test_count) if test_count else rows(train_count, len(labels))
    return rows(val_end, train_count), rows(test_count, val_end), test, source.class_names


Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _dot_grid_distance(u: np.ndarray) -> np.ndarray:
    """Squared distance along one axis to the nearest of three dot centres."""
    return ((u * 1.5 + 1.5) % 1 - 0.5) ** 2


# Each class is a (shape, colour) pair. A shape is a mask over coordinates (u, v) that run from -1 to 1
# across the object's bounding square (v grows downwards); everything outside that square is background.
SYNTHETIC_CLASSES: tuple[tuple[str, tuple[int, int, int], Shape], ...] = (
    ("red_square", (230, 30, 30), lambda u, v: np.full(u.shape, True)),
    ("green_circle", (40, 210, 40), lambda u, v: u**2 + v**2 <= 1),
    ("blue_triangle", (50, 90, 255), lambda u, v: np.abs(u) <= (v + 1) / 2),
    ("yellow_horizontal_bars", (250, 230, 30), lambda u, v: np.cos(2.5 * np.pi * v) > 0),
    ("cyan_vertical_bars", (30, 230, 230), lambda u, v: np.cos(2.5 * np.pi * u) > 0),
    ("magenta_cross", (230, 40, 230), lambda u, v: np.minimum(np.abs(u), np.abs(v)) <= 0.3),
    ("orange_ring", (255, 140, 0), lambda u, v: np.abs(u**2 + v**2 - 0.7) <= 0.3),
    ("white_diagonal_stripe", (245, 245, 245), lambda u, v: np.abs(u - v) <= 0.45),
    ("pink_checkerboard", (255, 150, 190), lambda u, v: (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0),
    ("purple_dot_grid", (150, 60, 230), lambda u, v: _dot_grid_distance(u) + _dot_grid_distance(v) <= 0.1),
)


SYNTHETIC_CLASS_NAMES = tuple(name for name, _, _ in SYNTHETIC_CLASSES)


def _make_synthetic(count: int, image_size: int, seed: int) -> LabelledImages:
    """Balanced classes of flat-coloured shapes at a random position and size on a dark, noisy grey background."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(SYNTHETIC_CLASSES))
    half_size = rng.uniform(0.22, 0.4, count).astype(np.float32)[:, None, None]  # in image widths
    centre_x, centre_y = (rng.uniform(half_size, 1 - half_size).astype(np.float32) for _ in range(2))
    pixel_centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    u = (pixel_centres[None, None, :] - centre_x) / half_size
    v = (pixel_centres[None, :, None] - centre_y) / half_size
    mask = np.empty((count, image_size, image_size), dtype=bool)
    for label, (_, _, shape) in enumerate(SYNTHETIC_CLASSES):
        chosen = labels == label
        u_chosen, v_chosen = u[chosen], v[chosen]
        inside_square = np.maximum(np.abs(u_chosen), np.abs(v_chosen)) <= 1
        mask[chosen] = inside_square & shape(u_chosen, v_chosen)
    background = rng.uniform(5, 35, (count, 1, 1, 1)).astype(np.float32)
    background = background + 8 * rng.standard_normal((count, 1, image_size, image_size), dtype=np.float32)
    background = np.clip(background, 0, 255).round().astype(np.uint8)
    colours = np.array([colour for _, colour, _ in SYNTHETIC_CLASSES], dtype=np.uint8)[labels]
    pixels = np.where(mask[:, None], colours[:, :, None, None], background)
    return torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))


POINTS_PER_DATASET = 40_000  # of a 2D toy set, before the splits
POINT_CLASS_NAMES = {
    "moons": ("upper", "lower"),
    "circles": ("outer", "inner"),
    "swissroll": ("roll",),
    "gaussians": ("east", "northeast", "north", "northwest", "west", "southwest", "south", "southeast"),
}
POINT_NOISE = {
    "moons": 0.05,
    "circles": 0.05,
    "gaussians": 0.1,
    "swissroll": 0.3,
}  # std of the Gaussian noise added, before standardising


def _raw_points(name: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points (N, 2) of class `labels` before standardising: the two moons and two circles of scikit-learn's make_moons
    and make_circles (factor 0.5), a ring of 8 Gaussians, a swiss roll (make_swiss_roll's x and z), plus noise."""
    n = len(labels)
    if name == "moons":
        theta = rng.uniform(0, np.pi, n)
        upper, lower = (
            np.stack([np.cos(theta), np.sin(theta)], 1),
            np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1),
        )
        points = np.where(labels[:, None] == 0, upper, lower)
    elif name == "circles":
        theta = rng.uniform(0, 2 * np.pi, n)
        points = np.where(labels == 0, 1.0, 0.5)[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
    elif name == "gaussians":
        angle = labels * 2 * np.pi / len(POINT_CLASS_NAMES["gaussians"])
        points = np.stack([np.cos(angle), np.sin(angle)], 1)
    else:
        t = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
        points = np.stack([t * np.cos(t), t * np.sin(t)], 1)
    return points + POINT_NOISE[name] * rng.standard_normal((n, 2))


@functools.lru_cache(maxsize=None)
def point_standardisation(name: str) -> tuple[np.ndarray, float]:
    """The mean and the scale (the root of the mean variance of a coordinate) of 100,000 balanced reference points of
    `name`: fixed per data set, so that every draw (training data, fresh data) is standardised alike."""
    labels = np.arange(100_000) % len(POINT_CLASS_NAMES[name])
    reference = _raw_points(name, labels, np.random.default_rng(0))
    return reference.mean(0), float(np.sqrt(reference.var(0).mean()))


def make_points(name: str, labels: np.ndarray, seed: int) -> np.ndarray:
    """float32 points (N, 2) of the 2D toy set `name`, point i of class labels[i], of about unit variance, drawn from
    `seed`."""
    mean, scale = point_standardisation(name)
    return ((_raw_points(name, labels, np.random.default_rng(seed)) - mean) / scale).astype(np.float32)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a function of (seed, epoch) alone, so resuming needs only the position."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def epoch_batches(
    num_examples: int, batch_size: int, runtime: Runtime, seed: int, epoch: int, start: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (position after the batch, this rank's indices on `device`, where the images are) for the rest
    of an epoch; the last partial batch is dropped. The order moves to the device once per epoch, not per step."""
    order = epoch_permutation(num_examples, seed, epoch).to(device)
    global_batch = batch_size * runtime.world_size
    for begin in range(start, num_examples - global_batch + 1, global_batch):
        yield begin + global_batch, order[begin + runtime.rank : begin + global_batch : runtime.world_size]


def load_batch(
    images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, hflip: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float in [-1, 1] on `device`, each flipped left-right with probability 1/2 when hflip; float
    points as they are."""
    x = images[indices.to(images.device)].to(device, non_blocking=True)
    if not x.is_floating_point():
        x = x.float().div_(127.5).sub_(1)
    if hflip:
        flip = torch.rand(x.shape[0], device=device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x, labels[indices.to(labels.device)].to(device, non_blocking=True)
