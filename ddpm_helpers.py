"""Data sets, checkpoints and output files for the DDPM tool.

Every data set is held in memory as a uint8 tensor (N, C, H, W) plus int64 labels,
split into train / val / test, and served as float images in [-1, 1].
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm.auto import tqdm


class UsageError(Exception):
    """Bad input the user can fix. The CLI prints str(e) as one line on stderr and exits with code 2."""


DATASETS = ("cifar10", "mnist", "fashion_mnist", "folder", "synthetic")
# Random left-right flips by default: CIFAR-10's objects are mirror-symmetric as a class; a folder's content may
# not be (digits, text, faces with a known side), so there they are asked for with --hflip.
DEFAULT_HFLIP = {"cifar10": True, "mnist": False, "fashion_mnist": False, "folder": False, "synthetic": True}
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CHECKPOINT_FORMAT = "ddpm-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

LabelledImages = tuple[torch.Tensor, torch.Tensor]  # (uint8 images N,C,H,W, int64 labels N)


# ----------------------------------------------------------------------------- data sets

class ImageTensorDataset(Dataset):
    """uint8 images in memory, served as float32 in [-1, 1], optionally flipped left-right at random."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False):
        self.images = images
        self.labels = labels
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float() / 127.5 - 1
        if self.hflip and torch.rand(()) < 0.5:  # global RNG, so torch.manual_seed reproduces it
            image = image.flip(-1)
        return image, int(self.labels[index])


@dataclass
class DataSplits:
    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    class_names: list[str]
    channels: int
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_datasets(name: str, data_dir: str | os.PathLike, image_size: int | None = None, hflip: bool | None = None,
                  download: bool = True, seed: int = 0, channels: int | None = None, val_fraction: float = 0.1) -> DataSplits:
    """Load a data set and split it into train / val / test; the same seed always gives the same split.

    Data sets without an official test split (a folder without train/ and test/, synthetic) first hold out 10%
    as test. Validation is `val_fraction` of what remains for training (0: no validation split). `channels`
    forces grey (1) or RGB (3) images; by default a data set keeps its own (a folder whose images are all
    grey is grey).
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    data, test, class_names = _load_images(name, Path(data_dir), image_size, download, seed)
    generator = torch.Generator().manual_seed(seed)
    if test is None:
        data, test = _hold_out(data, 0.1, generator)
    train, val = _hold_out(data, val_fraction, generator)
    if image_size is not None:
        train, val, test = (_resize(images, image_size) for images in (train, val, test))
    train, val, test = (_to_channels(images, channels) for images in (train, val, test))

    use_hflip = DEFAULT_HFLIP[name] if hflip is None else hflip
    channels, size = train[0].shape[1], train[0].shape[-1]
    return DataSplits(train=ImageTensorDataset(*train, hflip=use_hflip), val=ImageTensorDataset(*val),
                      test=ImageTensorDataset(*test), class_names=class_names, channels=channels, image_size=size)


def _load_images(name: str, data_dir: Path, image_size: int | None, download: bool,
                 seed: int) -> tuple[LabelledImages, LabelledImages | None, list[str]]:
    """Returns (training images, official test images or None, class names)."""
    if name == "cifar10":
        return _load_cifar10(data_dir, download)
    if name == "mnist":
        return _load_torchvision_idx(torchvision.datasets.MNIST, data_dir, download)
    if name == "fashion_mnist":
        return _load_torchvision_idx(torchvision.datasets.FashionMNIST, data_dir, download)
    if name == "folder":
        return _load_split_folders(data_dir, image_size or 32)
    return _make_synthetic(6000, image_size or 32, seed), None, list(SYNTHETIC_CLASS_NAMES)


def _hold_out(data: LabelledImages, fraction: float, generator: torch.Generator) -> tuple[LabelledImages, LabelledImages]:
    """Split off a random `fraction` (at least one example unless the fraction is 0); returns (rest, held_out)."""
    images, labels = data
    count = 0 if fraction == 0 else max(1, math.floor(len(labels) * fraction + 1e-9))
    if len(labels) - count < 1:
        raise UsageError("too few images: a data set needs at least one image each for train, val and test")
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
    chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
              for chunk in images.split(4096)]
    return torch.cat(chunks).round().clamp(0, 255).to(torch.uint8), labels


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# CIFAR-10 ---------------------------------------------------------------------

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
        raise UsageError(f"CIFAR-10 not found in {data_dir} and could not be downloaded "
                         f"({_first_line(error)}): {place}") from error


def _unpickle_cifar_file(path: Path) -> dict:
    """Read one CIFAR-10 pickle ourselves: torchvision md5-checks every file and so rejects anything generated."""
    if not path.is_file():
        raise UsageError(f"CIFAR-10 file missing: {path} (re-extract {CIFAR10_ARCHIVE} there)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as error:
        raise UsageError(f"CIFAR-10 file unreadable: {path} ({_first_line(error)})") from error


def _read_cifar_batch(path: Path) -> LabelledImages:
    """A batch holds b'data', N x 3072 uint8 (the R, G, B planes of a 32x32 image, row-major), and b'labels'."""
    batch = _unpickle_cifar_file(path)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    except Exception as error:
        raise UsageError(f"CIFAR-10 file unreadable: {path} is not a CIFAR-10 batch ({_first_line(error)})") from error
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


# MNIST and Fashion-MNIST ------------------------------------------------------

def _load_torchvision_idx(dataset_class: type, data_dir: Path,
                          download: bool) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """torchvision reads the uncompressed idx files in <data_dir>/<ClassName>/raw/ (no md5 check)."""
    raw_dir = data_dir / dataset_class.__name__ / "raw"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision reports progress and failed mirrors on stdout
            train = dataset_class(root=data_dir, train=True, download=download)
            test = dataset_class(root=data_dir, train=False, download=download)
    except Exception as error:
        place = f"place {', '.join(MNIST_FILES)} (uncompressed) in {raw_dir}"
        if all((raw_dir / file).is_file() for file in MNIST_FILES):
            problem = f"could not read {dataset_class.__name__} from {raw_dir} ({_first_line(error)})"
        elif download:
            problem = f"{dataset_class.__name__} not found in {raw_dir} and could not be downloaded"
        else:
            problem = f"{dataset_class.__name__} not found in {raw_dir} and downloading is off"
        raise UsageError(f"{problem}: {place}") from error
    class_names = [name.split(" - ")[0] for name in dataset_class.classes]  # MNIST's "0 - zero" becomes "0"
    return ((train.data.unsqueeze(1), train.targets.long()),
            (test.data.unsqueeze(1), test.targets.long()), class_names)


# image folder -----------------------------------------------------------------

def _folder_layout_error(data_dir: Path, problem: str) -> UsageError:
    return UsageError(f"{problem}: --dataset folder expects {data_dir}/<class name>/<image files>, "
                      f"e.g. {data_dir}/cats/001.png")


def _load_split_folders(data_dir: Path, image_size: int) -> tuple[LabelledImages, LabelledImages | None, list[str]]:
    """A class folder, or one with train/ and test/ class folders (the same classes), used as the two splits."""
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        train, train_classes = _load_image_folder(data_dir / "train", image_size)
        test, test_classes = _load_image_folder(data_dir / "test", image_size)
        if train_classes != test_classes:
            raise UsageError(f"{data_dir}/train and {data_dir}/test must hold the same class folders, "
                             f"not {', '.join(train_classes)} and {', '.join(test_classes)}")
        return train, test, train_classes
    images, class_names = _load_image_folder(data_dir, image_size)
    return images, None, class_names


def _load_image_folder(data_dir: Path, image_size: int) -> tuple[LabelledImages, list[str]]:
    """Decode every image, scale its short side to image_size and crop the centre square; grey (1 channel) if
    every image is grey (R = G = B, whatever its file's mode), else RGB."""
    if not data_dir.is_dir():
        raise _folder_layout_error(data_dir, f"image folder not found: {data_dir}")
    to_square = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.PILToTensor()])
    try:
        folder = torchvision.datasets.ImageFolder(str(data_dir), transform=to_square)
    except FileNotFoundError as error:
        raise _folder_layout_error(data_dir, f"no class folders with images in {data_dir}") from error
    images = torch.stack([_read_folder_image(folder, index)
                          for index in tqdm(range(len(folder)), desc=f"decoding {data_dir}", unit="img", leave=False)])
    if torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]):
        images = images[:, :1]
    return (images, torch.tensor(folder.targets, dtype=torch.int64)), folder.classes


def _read_folder_image(folder: torchvision.datasets.ImageFolder, index: int) -> torch.Tensor:
    try:
        return folder[index][0]
    except Exception as error:
        raise UsageError(f"cannot read image {folder.samples[index][0]} ({_first_line(error)})") from error


# synthetic --------------------------------------------------------------------

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


# ----------------------------------------------------------------------------- checkpoints

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """The one temporary name a write of `path` goes through: a writer killed mid-write leaves at most this one
    file behind, which the next write of `path` replaces (and the next training start removes)."""
    return path.with_name(path.name + TEMPORARY_SUFFIX)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what killed checkpoint writers left in a run's folder: `<checkpoint>.tmp` (and `<weights>.safetensors.tmp`), and the
    `<checkpoint>.tmp-<pid>` of earlier versions of the tool whose process is gone. Nothing else is touched."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"*.pt{TEMPORARY_SUFFIX}*"):
        suffix = leftover.name.rsplit(".pt", 1)[1]
        pid = suffix[len(TEMPORARY_SUFFIX) + 1:]
        if suffix == TEMPORARY_SUFFIX or (suffix.startswith(TEMPORARY_SUFFIX + "-") and pid.isdigit() and not _process_alive(int(pid))):
            leftover.unlink(missing_ok=True)
    for leftover in folder.glob(f"*.safetensors{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
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


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Save atomically; the file is tagged with the checkpoint format so load_checkpoint can recognise it."""
    tagged = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, **state}
    _atomic_write(path, lambda f: torch.save(tagged, f))


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a saved checkpoint atomically (cheaper than serialising the same state again), and its weights file."""
    for source_file, target in ((Path(source), Path(path)), (weights_path(source), weights_path(path))):
        if source_file.is_file():
            with open(source_file, "rb") as f:
                _atomic_write(target, lambda out: shutil.copyfileobj(f, out))


def weights_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where the sampling weights of a checkpoint go: ckpt.pt -> ckpt.safetensors."""
    return Path(checkpoint_path).with_suffix(".safetensors")


def save_weights(state_dict: dict[str, torch.Tensor], description: dict, path: str | os.PathLike) -> None:
    """The sampling weights alone, as safetensors (no optimizer state: a tenth of a training checkpoint), with what
    --inference needs (load_checkpoint's keys model_config, diffusion, data, conditional, ...) as JSON metadata."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "description": json.dumps(description)}
    _atomic_write(path, lambda f: f.write(save(tensors, metadata)))


def _load_weights(path: Path) -> dict:
    """save_weights' file as a checkpoint dict whose weights are its "ema" (and "model")."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise UsageError(f"{path} is not a readable safetensors file ({_first_line(error)})") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a weights file written by this tool (no description of the model in it)")
    return {**json.loads(metadata["description"]), "model": weights, "ema": weights}


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (weights_only=True: no code is ever unpickled), or the weights
    file of save_weights (.safetensors)."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if Path(path).suffix == ".safetensors":
        return _load_weights(Path(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch reports both forbidden classes ("Unsupported global", "unsupported GLOBAL os.system", "... was not an
        # allowed global") and garbage bytes ("Unsupported operand") as UnpicklingError
        if not re.search(r"unsupported global|not an allowed global", str(error), re.IGNORECASE):
            raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt)") from error
        raise UsageError(f"{path} holds objects other than tensors and plain values; refusing to load it "
                         f"(only checkpoints written by this tool are accepted)") from error
    except Exception as error:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt)") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint written by this tool")
    return state


# ----------------------------------------------------------------------------- processes

@dataclass
class Runtime:
    """This process's place in a run: its device, and its rank among `world_size` processes (torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    control_group: Any = None  # a gloo group, for small CPU-side agreements that must not wait for the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_on_device(self) -> bool:
        """Whether the training set is moved to the device once (GPUs), rather than each batch."""
        return self.device.type == "cuda"


def setup_runtime(device: str, timeout: timedelta | None = None) -> Runtime:
    """One process, or one of WORLD_SIZE processes started by torchrun: NCCL between GPUs (each process
    on the GPU of its LOCAL_RANK), gloo between CPU processes. `timeout` bounds how long a collective
    waits for the slowest rank (PyTorch's default when None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world_size == 1:
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Runtime(device, rank, world_size, dist.new_group(backend="gloo", timeout=timeout))


def shard(count: int, rt: Runtime) -> range:
    """This rank's contiguous share of range(count); shares differ in size by at most one."""
    return range(count * rt.rank // rt.world_size, count * (rt.rank + 1) // rt.world_size)


def gather_rows(rows: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Every rank's `rows` (any number, the same trailing shape) concatenated in rank order, on every rank."""
    if rt.world_size == 1:
        return rows
    local = rows.to(rt.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=rt.device) for _ in range(rt.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=rt.device))
    sizes = [int(size) for size in sizes]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=rt.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(rt.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(rows.device)


# ----------------------------------------------------------------------------- outputs

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) to uint8 (N, H, W, C): -1 -> 0, 0 -> 128, 1 -> 255.

    Rounds half up, the same mapping torchvision.utils.save_image uses; values outside [-1, 1] are clamped.
    """
    scaled = (images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5
    return scaled.floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save [-1, 1] images as one PNG grid, ceil(sqrt(N)) per row unless nrow is given."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    _atomic_write(path, lambda f: torchvision.utils.save_image(
        images.detach().float().cpu(), f, format="png", nrow=nrow, normalize=True, value_range=(-1, 1)))


def save_samples(images: torch.Tensor, labels: torch.Tensor | None, out_dir: str | os.PathLike) -> None:
    """Write out_dir/samples/00000.png, ... and out_dir/samples.npz with uint8 images (N, H, W, C) and int64
    labels (-1 marks an unconditional sample)."""
    out_dir = Path(out_dir)
    pixels = to_uint8(images).numpy()
    save_pngs(pixels, out_dir / "samples")
    save_sample_arrays(pixels, None if labels is None else labels.detach().cpu().long().numpy(), out_dir / "samples.npz")


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
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def seed_everything(seed: int) -> None:
    """Seed Python's random, NumPy and torch (torch.manual_seed also seeds every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_tf32() -> None:
    """TensorFloat-32 for float32 matmuls on Ampere and later GPUs: several times the float32 rate, with a
    10-bit mantissa that training does not notice (PyTorch notes, "TensorFloat-32 on Ampere"); cuDNN
    convolutions already use it by default."""
    torch.set_float32_matmul_precision("high")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device` (None: full precision); auto is bf16 on GPUs that support it."""
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


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
    _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))
    plt.close(figure)


def save_labelled_rows(rows: list[tuple[str, torch.Tensor]], path: str | os.PathLike) -> None:
    """One row of uint8 images (N, H, W, C) per entry, its label written on the left: progressions over
    epochs, guidance sweeps, checkpoint comparisons."""
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
    _atomic_write(path, lambda f: canvas.save(f, format="png"))
