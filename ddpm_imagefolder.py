"""Image files as a data set: what a folder or a zip holds, and decoding it to uint8 squares on every core.

Three layouts (`find_images`):
* a flat folder of images: unlabelled, for an unconditional model;
* a folder of class folders, <folder>/<class name>/<image files> (torchvision's ImageFolder: classes sorted by name,
  each class's files found recursively in sorted order);
* a dataset zip as NVlabs/edm's dataset_tool.py writes it: PNG files such as 00000/img00000000.png, and an optional
  dataset.json, {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}; its classes are named by their
  label values.
A folder may instead hold train/ and test/, each in one of the folder layouts (the same classes), used as the splits.

Each image is decoded as ImageFolder's loader with Resize(size) and CenterCrop(size) decodes it: converted to RGB,
its short side scaled to `size` (PIL's bilinear filter, antialiased), the centre square cut out (`decode_image`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ddpm_config import UsageError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
EDM_LABELS = "dataset.json"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)  # ITU-R 601, as ddpm_data's grey
CHUNK = 64  # images per task of a decoding process
LAYOUTS = (
    "a flat folder of images, a folder with one sub-folder per class, train/ and test/ holding either, "
    "or a dataset zip of NVlabs/edm's dataset_tool.py"
)


@dataclass
class ImageFiles:
    """The images of one part of a source in a fixed order: paths relative to the folder, or the zip's member names."""

    names: list[str]
    labels: list[int]  # indices into ImageSource.class_names; all 0 when unlabelled


@dataclass
class ImageSource:
    path: Path  # the folder or the zip
    train: ImageFiles  # every image, or those of train/
    test: Optional[ImageFiles]  # those of test/, when the folder has train/ and test/
    class_names: list[str]  # [] when unlabelled
    native_size: Optional[int] = None  # a zip's square images' size (dataset_tool.py writes one size)

    @property
    def is_zip(self) -> bool:
        return self.path.is_file()

    def stamps(self) -> Iterator[str]:
        """A line "<name>\t<size>\t<modification time in ns>\n" for every file the images come from (of a zip: the zip
        itself), so that a change is seen without reading them."""
        folder = self.path.parent if self.is_zip else self.path
        parts = [self.train, *([self.test] if self.test else [])]
        if self.is_zip:
            parts = [ImageFiles([self.path.name], [0])]
        for part in parts:
            for name in part.names:
                stat = os.stat(os.path.join(folder, name))
                yield f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(path: Path) -> ImageSource:
    """The layout of the folder or zip `path`, its images and classes; a UsageError names what is wrong."""
    if path.is_file():
        return _zip_source(path)
    if not path.is_dir():
        raise UsageError(f"image folder not found: {path} (expected {LAYOUTS})")
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, train_classes = _list_folder(path, "train")
        test, test_classes = _list_folder(path, "test")
        if train_classes != test_classes:
            raise UsageError(
                f"{path}/train and {path}/test must hold the same class folders, not "
                f"{', '.join(train_classes) or '(none)'} and {', '.join(test_classes) or '(none)'}"
            )
        return ImageSource(path, train, test, train_classes)
    files, class_names = _list_folder(path, "")
    return ImageSource(path, files, None, class_names)


def _visible(folder: Path) -> tuple[list[str], list[str]]:
    """The names of the files and of the folders in `folder`, sorted, without hidden ones (the decoded cache's
    .ddpm_cache, macOS's ._ files)."""
    files, folders = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                (folders if entry.is_dir() else files).append(entry.name)
    return sorted(files), sorted(folders)


def _list_folder(root: Path, part: str) -> tuple[ImageFiles, list[str]]:
    """A flat folder (images and no sub-folders) or a folder of class folders; names are relative to `root`."""
    folder = root / part
    loose, class_names = _visible(folder)
    prefix = f"{part}/" if part else ""
    images = [name for name in loose if is_image_name(name)]
    others = [name for name in loose if not is_image_name(name)]
    if images and class_names:
        raise UsageError(
            f"{folder} holds both images (e.g. {images[0]}) and sub-folders (e.g. {class_names[0]}): expected {LAYOUTS}"
        )
    if images:
        return ImageFiles([prefix + name for name in images], [0] * len(images)), []
    if not class_names:
        skipped = f" (it has {len(others)} other files, e.g. {others[0]})" if others else ""
        raise UsageError(
            f"no images in {folder}{skipped}: expected {LAYOUTS}, with {', '.join(IMAGE_EXTENSIONS)} files"
        )
    names, labels = [], []
    for label, class_name in enumerate(class_names):
        found = [prefix + name for name in _images_under(folder / class_name, f"{class_name}/")]
        if not found:
            raise UsageError(f"no images in the class folder {folder / class_name}: expected {LAYOUTS}")
        names += found
        labels += [label] * len(found)
    return ImageFiles(names, labels), class_names


def _images_under(folder: Path, prefix: str) -> Iterator[str]:
    """Image files anywhere below `folder`, in ImageFolder's order (sorted walk, sorted names), hidden ones left out."""
    for directory, subfolders, files in sorted(os.walk(folder, followlinks=True)):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(directory).relative_to(folder).as_posix()
        for name in sorted(files):
            if is_image_name(name) and not name.startswith("."):
                yield prefix + (name if relative == "." else f"{relative}/{name}")


def _zip_source(path: Path) -> ImageSource:
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(
                info.filename for info in archive.infolist() if not info.is_dir() and is_image_name(info.filename)
            )
            if not names:
                raise UsageError(f"no images in {path}: expected {LAYOUTS} (PNG files and an optional {EDM_LABELS})")
            labels_text = archive.read(EDM_LABELS) if EDM_LABELS in archive.namelist() else None
            with archive.open(names[0]) as first, Image.open(first) as image:
                width, height = image.size
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise UsageError(f"cannot read {path} as a dataset zip ({first_line(error)})") from None
    labels, class_names = _edm_labels(f"{path}:{EDM_LABELS}", labels_text, names)
    return ImageSource(path, ImageFiles(names, labels), None, class_names, width if width == height else None)


def _edm_labels(where: str, text: Optional[bytes], names: list[str]) -> tuple[list[int], list[str]]:
    """dataset_tool.py's labels: class numbers by file name; classes are the distinct values, sorted, named by them."""
    expected = '{"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}'
    try:
        entries = None if text is None else json.loads(text)["labels"]
        by_name = {} if entries is None else {str(name): value for name, value in entries}
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{where} is not dataset_tool.py's labels ({first_line(error)}): expected {expected}"
        ) from None
    if entries is None:
        return [0] * len(names), []
    missing = [name for name in names if name not in by_name]
    if missing:
        raise UsageError(f"{where} has no label for {missing[0]} ({len(missing)} of {len(names)} images unlabelled)")
    values = [by_name[name] for name in names]
    wrong = next((name for name, value in zip(names, values) if type(value) is not int), None)
    if wrong is not None:
        raise UsageError(f"{where}: the label of {wrong} is {by_name[wrong]!r}, not a class number")
    classes = sorted(set(values))
    index = {value: position for position, value in enumerate(classes)}
    return [index[value] for value in values], [str(value) for value in classes]


def decode_image(file: IO[bytes], size: int) -> np.ndarray:
    """(3, size, size) uint8: torchvision's Resize(size) then CenterCrop(size) of the image as RGB, on PIL."""
    with Image.open(file) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    scaled_long = int(size * long / short)
    new_size = (size, scaled_long) if width <= height else (scaled_long, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def to_grey(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, 1, H, W) uint8 by ITU-R 601 luma, in float32 rounded half to even (as ddpm_data's)."""
    luma = (images.astype(np.float32) * LUMA).sum(1, keepdims=True)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)


_OPEN_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}  # per process: a forked worker must not share its parent's


def _opener(path: str) -> Callable[[str], IO[bytes]]:
    if not os.path.isfile(path):
        return lambda name: open(os.path.join(path, name), "rb")
    key = (os.getpid(), path)
    if key not in _OPEN_ZIPS:
        _OPEN_ZIPS[key] = zipfile.ZipFile(path)
    return _OPEN_ZIPS[key].open


def decode_chunk(path: str, names: list[str], size: int, channels: Optional[int]) -> tuple[np.ndarray, bool]:
    """Decode `names` of the folder or zip `path`: (images (n, C, size, size), whether each is grey, R = G = B).
    C is 1 when channels is 1 (luma), else 3."""
    images = np.empty((len(names), 3, size, size), dtype=np.uint8)
    open_file = _opener(path)
    for position, name in enumerate(names):
        try:
            with open_file(name) as file:
                images[position] = decode_image(file, size)
        except Exception as error:
            where = f"{path}:{name}" if os.path.isfile(path) else os.path.join(path, name)
            raise UsageError(f"cannot read image {where} ({first_line(error)})") from None
    grey = bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())
    return (to_grey(images) if channels == 1 else images), grey


def available_cores() -> int:
    """The cores this process may run on (its affinity: taskset, a container's cpuset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_into(
    out: np.ndarray, path: Path, names: list[str], size: int, channels: Optional[int], workers: int, chunk: int = CHUNK
) -> bool:
    """Decode image names[i] into out[i] with `workers` processes (1: in this one), a progress bar on stderr;
    returns whether every image is grey."""
    tasks = [(str(path), names[start : start + chunk], size, channels) for start in range(0, len(names), chunk)]
    grey = True
    with _processes(min(workers, len(tasks))) as pool:
        results = _in_order(pool, tasks, 4 * workers) if pool else (decode_chunk(*task) for task in tasks)
        with tqdm(total=len(names), desc=f"decoding {path.name}", unit="img", leave=False) as bar:
            for start, (images, chunk_grey) in zip(range(0, len(names), chunk), results):
                out[start : start + len(images)] = images
                grey &= chunk_grey
                bar.update(len(images))
    return grey


@contextlib.contextmanager
def _processes(workers: int) -> Iterator[Optional[ProcessPoolExecutor]]:
    """Forked processes where the platform forks (as PyTorch's DataLoader starts its workers on Linux), None for one."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    executor = ProcessPoolExecutor(workers, mp_context=context)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _in_order(pool: ProcessPoolExecutor, tasks: list[tuple], in_flight: int) -> Iterator[tuple[np.ndarray, bool]]:
    """decode_chunk of each task, in order, at most `in_flight` decoded ahead. The first are submitted (and the
    processes forked) now, before the progress bar starts its thread."""
    queued = iter(tasks)
    pending = collections.deque(pool.submit(decode_chunk, *task) for _, task in zip(range(in_flight), queued))

    def results() -> Iterator[tuple[np.ndarray, bool]]:
        while pending:
            result = pending.popleft().result()
            following = next(queued, None)
            if following is not None:
                pending.append(pool.submit(decode_chunk, *following))
            yield result

    return results()
