"""Fixtures and helpers shared by the test modules."""
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpm_main

REPO = Path(__file__).resolve().parent.parent


def run_cli(command: str, cwd: Path) -> int:
    """Run ddpm_main in-process from `cwd`, as `python ddpm_main.py <command>` would; return its exit code."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return ddpm_main.main(shlex.split(command))
    finally:
        os.chdir(previous)


@pytest.fixture
def tensor_reads(monkeypatch) -> dict:
    """Counts the reads of a tensor's value on the host (.item(), .tolist(), bool(), float(), int()): on a GPU
    each one waits for all queued work. The count is in the returned dict's "count"; set it to 0 to restart."""
    import torch

    reads = {"count": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


# Small data sets in their real on-disk formats (CIFAR-10 pickles, MNIST idx files, an image folder), so tests
# load them through the real code paths. Each fixture returns the data_dir to pass to load_datasets; what the
# files hold is described in the fixture's docstring.

CIFAR10_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_IMAGES_PER_BATCH = 20


def _fake_cifar_images(first_index: int, count: int) -> np.ndarray:
    """count x 3072 uint8 rows: R plane = index, G plane = 255 - index, B plane = 8 * column."""
    index = np.arange(first_index, first_index + count)[:, None, None]
    planes = np.empty((count, 3, 32, 32), dtype=np.uint8)
    planes[:, 0] = index
    planes[:, 1] = 255 - index
    planes[:, 2] = 8 * np.arange(32)
    return planes.reshape(count, 3072)


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """See write_cifar10."""
    return write_cifar10(tmp_path)


def write_cifar10(tmp_path: Path) -> Path:
    """<tmp>/cifar-10-batches-py with 5 training batches of 20 images (training image k = 0..99) and a
    test_batch of 20 (test image k = 100..119). Image k has label k % 10, red plane filled with k, green
    plane filled with 255 - k and blue pixel (row, column) = 8 * column, so it is not mirror-symmetric."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    n = CIFAR10_IMAGES_PER_BATCH
    batches = [(f"data_batch_{b}", (b - 1) * n) for b in range(1, 6)] + [("test_batch", 5 * n)]
    for name, first in batches:
        _write_pickle(folder / name, {b"batch_label": name.encode(), b"data": _fake_cifar_images(first, n),
                                      b"labels": [k % 10 for k in range(first, first + n)]})
    _write_pickle(folder / "batches.meta", {b"label_names": [name.encode() for name in CIFAR10_CLASS_NAMES],
                                            b"num_cases_per_batch": n, b"num_vis": 3072})
    return tmp_path


def _write_idx(path: Path, data: np.ndarray) -> None:
    """idx format: big-endian magic (2051 images, 2049 labels), one big-endian int32 per dimension, uint8 data."""
    magic = 2051 if data.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(f">{1 + data.ndim}i", magic, *data.shape))
        f.write(data.astype(np.uint8).tobytes())


def _write_fake_mnist(raw_dir: Path) -> None:
    raw_dir.mkdir(parents=True)
    for prefix, first, count in (("train", 0, 30), ("t10k", 100, 10)):
        index = np.arange(first, first + count)
        images = np.broadcast_to(index[:, None, None] + 4 * np.arange(28), (count, 28, 28))
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", index % 10)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """<tmp>/MNIST/raw with 30 training images (k = 0..29) and 10 test images (k = 100..109), 28x28.
    Image k has label k % 10 and pixel (row, column) = k + 4 * column."""
    _write_fake_mnist(tmp_path / "MNIST" / "raw")
    return tmp_path


@pytest.fixture
def fashion_mnist_dir(tmp_path: Path) -> Path:
    """Same content as mnist_dir, under <tmp>/FashionMNIST/raw."""
    _write_fake_mnist(tmp_path / "FashionMNIST" / "raw")
    return tmp_path


IMAGE_FOLDER_COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


@pytest.fixture
def image_folder_dir(tmp_path: Path) -> Path:
    """<tmp>/images/{cat,dog,fox}/ with 4 PNGs each (40 wide, 24 high), filled with one colour per class:
    cat red, dog green, fox blue, plus a fifth cat image stored greyscale (mode "L", grey level 128): 13 images."""
    root = tmp_path / "images"
    for name, colour in IMAGE_FOLDER_COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (40, 24), colour).save(root / name / f"{index}.png")
    Image.new("L", (40, 24), 128).save(root / "cat" / "grey.png")
    return root


def write_grey_folder(root: Path, layout: str) -> None:
    """Grey PNGs (mode "L", a vertical bar brighter on its left edge: not mirror-symmetric) for classes a and b:
    layout "flat" is root/<class>/, "split" is root/train/<class>/ (4 each) and root/test/<class>/ (2 each)."""
    splits = {"train": 4, "test": 2} if layout == "split" else {"": 6}
    for split, count in splits.items():
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.zeros((8, 8), dtype=np.uint8)
                pixels[:, 2 + label] = 200 + index
                pixels[:, 1 + label] = 100
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
