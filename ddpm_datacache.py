"""The decoded cache of an image folder or zip: decoded once, on every core, then memory-mapped at every start.

A cache is four files in one folder: <name>.images.npy (uint8, N x C x H x W), <name>.labels.npy (int64, N),
<name>.files.tsv, a line per source file (name, size, modification time), and <name>.json, the description: the
listing's SHA-256, the image size, the channels, the order of the rows, and the size and modification time of the
two arrays. A start uses a cache only when its description matches the source (its listing hashed as it is read:
no object per file, which would stay with every process as a few MB per 20,000 files) and the arrays as found;
otherwise it rebuilds it and says why (the listing tells which files changed).

Writing is safe against a kill at any moment: the arrays are written under temporary names and renamed, and the
description, written last (atomically), is what makes a cache valid; it is removed before a rebuild starts. One
process builds at a time (a lock file): under torchrun the first rank to get the lock builds, the others wait and
then map the same files, so the page cache holds one copy per machine, shared by all ranks.

The cache goes to .ddpm_cache/ beside the folder or zip (not inside a folder, where other tools reading it as a
class-folder tree would take it for a class), else, where that cannot be written, to $XDG_CACHE_HOME/ddpm
(~/.cache/ddpm), or to the folder asked for (--data_cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional

import numpy as np

from ddpm_config import UsageError, first_line
from ddpm_imagefolder import ImageSource, available_cores, decode_into, find_images
from ddpm_outputs import atomic_write, temporary_path

try:
    import fcntl
except ImportError:  # Windows: no lock; one process per cache
    fcntl = None

CACHE_FORMAT = 1
CACHE_FOLDER = ".ddpm_cache"
MATCHED = (
    "format",
    "source",
    "image_size",
    "channels_asked",
    "split_seed",
    "files_sha256",
    "train",
    "test",
    "class_names",
)


@dataclass
class Decoded:
    """Images in rows: the training part's files in `order`, then the test part's; labels alike."""

    images: np.ndarray  # uint8 (N, C, H, W): a copy-on-write memory map of the cache, or in memory
    labels: np.ndarray  # int64 (N,)
    cache: Optional[Path]  # the images' .npy file; None: decoded in memory


def say(message: str, every_rank: bool = False) -> None:
    """A line on stderr; under torchrun from one process per machine (LOCAL_RANK 0) unless `every_rank`."""
    if every_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def decoded_images(
    source: ImageSource,
    size: int,
    channels: Optional[int],
    order: np.ndarray,
    seed: int,
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
    workers: Optional[int] = None,
) -> Decoded:
    """The images of `source` as `size` x `size` squares with `channels` (None: grey if all are grey, else RGB), the
    training part's rows in `order` (made from `seed`: ddpm_data's split order), from the cache or decoded into it;
    `use_cache` False decodes into memory. `workers`: decoding processes (None: every available core)."""
    workers, started = workers or available_cores(), time.perf_counter()
    if not use_cache:
        names, labels = rows_of(source, order)
        images = _decode(source, names, size, channels, workers, np.empty)
        return Decoded(images, np.asarray(labels, dtype=np.int64), None)
    expected = describe(source, size, channels, seed)
    folder = cache_folder(source.path, cache_dir)
    stem = folder / cache_name(source.path, size, channels, seed)
    with _locked(stem):
        reason = why_stale(stem, expected)
        if reason is not None:
            say(reason, every_rank=True)
            build(stem, source, order, size, channels, expected, workers)
            started = time.perf_counter()
        decoded = Decoded(
            np.load(_part(stem, "images"), mmap_mode="c"),
            np.load(_part(stem, "labels"), mmap_mode="c"),
            _part(stem, "images"),
        )
    shape = "x".join(str(side) for side in decoded.images.shape[1:])
    say(
        f"data: {len(decoded.labels)} images ({shape}) checked and mapped from {decoded.cache} in "
        f"{time.perf_counter() - started:.2f} s"
    )
    return decoded


def rows_of(source: ImageSource, order: np.ndarray) -> tuple[list[str], list[int]]:
    """The file names and labels of the cache's rows: the training part in `order`, then the test part."""
    names = [source.train.names[i] for i in order] + (source.test.names if source.test else [])
    labels = [source.train.labels[i] for i in order] + (source.test.labels if source.test else [])
    return names, labels


def describe(source: ImageSource, size: int, channels: Optional[int], seed: int) -> dict:
    """What a cache of `source` must have been built from (the description, before the arrays' own stamps)."""
    return {
        "format": CACHE_FORMAT,
        "source": str(source.path.resolve()),
        "image_size": size,
        "channels_asked": channels,
        "split_seed": seed,
        "train": len(source.train.names),
        "test": len(source.test.names) if source.test else 0,
        "class_names": source.class_names,
        "files_sha256": listing_digest(source.stamps()),
    }


def listing_digest(lines: Iterator[str], copy_to: Optional[IO[bytes]] = None) -> str:
    """SHA-256 of the listing's lines, hashed as they come (and copied to `copy_to`)."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        if copy_to is not None:
            copy_to.write(line.encode())
    return digest.hexdigest()


def cache_name(source: Path, size: int, channels: Optional[int], seed: int) -> str:
    """<source name>-<size>px-<key>: the key tells apart sources of one name and settings of one size."""
    key = hashlib.sha256(json.dumps([str(source.resolve()), size, channels, seed]).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source.name)}-{size}px-{key}"


def _part(stem: Path, part: str, suffix: str = "npy") -> Path:
    return stem.with_name(f"{stem.name}.{part}.{suffix}")


def _description_path(stem: Path) -> Path:
    return stem.with_name(f"{stem.name}.json")


def user_cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_folder(source: Path, asked: Optional[str]) -> Path:
    """--data_cache DIR when given; else .ddpm_cache beside the folder or zip, else the user's cache folder."""
    if asked is not None:
        if not _writable(Path(asked)):
            raise UsageError(f"--data_cache {asked}: cannot write the decoded cache there")
        return Path(asked)
    beside = source.resolve().parent / CACHE_FOLDER
    if _writable(beside):
        return beside
    fallback = user_cache_folder()
    if not _writable(fallback):
        raise UsageError(
            f"cannot write the decoded cache to {beside} nor {fallback}: give --data_cache DIR or --no_data_cache"
        )
    say(f"cannot write to {beside}: the decoded cache goes to {fallback}")
    return fallback


@contextlib.contextmanager
def _locked(stem: Path) -> Iterator[None]:
    """Hold <stem>.lock (flock, released by the system if the process dies) while checking and building."""
    with open(stem.with_name(f"{stem.name}.lock"), "a+b") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another process decoding into {stem.parent}")
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def why_stale(stem: Path, expected: dict) -> Optional[str]:
    """None when the cache at `stem` matches `expected` and its arrays are as written; else why it is (re)built."""
    described = _description_path(stem)
    if not described.is_file():
        return f"no decoded cache of {expected['source']} yet: building {stem}"
    rebuild = f"rebuilding the decoded cache {stem}"
    try:
        stored = json.loads(described.read_text())
        for key in MATCHED:
            if key == "files_sha256" and stored[key] != expected[key]:
                return f"{rebuild}: the source changed ({_changes(_part(stem, 'files', 'tsv'), expected['source'])})"
            if stored[key] != expected[key]:
                return f"{rebuild}: its {key} is {stored[key]!r}, now {expected[key]!r}"
        count, size = expected["train"] + expected["test"], expected["image_size"]
        arrays = (("images", (count, stored["channels"], size, size), np.uint8), ("labels", (count,), np.int64))
        for part, shape, dtype in arrays:
            problem = _array_problem(_part(stem, part), stored[part], shape, dtype)
            if problem:
                return f"{rebuild}: {problem}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{rebuild}: its description {described} is unreadable ({first_line(error)})"
    return None


def _changes(listing: Path, source: str) -> str:
    """Files added, removed or changed (size or modification time) since `listing` was written, an example of each."""
    if not listing.is_file():
        return f"{listing.name} is missing"
    before = dict(line.split("\t", 1) for line in listing.read_text().splitlines())
    now = dict(line.rstrip("\n").split("\t", 1) for line in find_images(Path(source)).stamps())
    kinds = (
        ("added", sorted(now.keys() - before.keys())),
        ("removed", sorted(before.keys() - now.keys())),
        ("changed", sorted(name for name in now.keys() & before.keys() if now[name] != before[name])),
    )
    return ", ".join(f"{len(names)} {kind}, e.g. {names[0]}" for kind, names in kinds if names) or "reordered"


def _array_problem(path: Path, stamp: dict, shape: tuple, dtype: type) -> Optional[str]:
    """Why the array file at `path` is not the one the description stamped, or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    found = path.stat()
    if (found.st_size, found.st_mtime_ns) != (stamp["bytes"], stamp["mtime_ns"]):
        written = stamp["bytes"]
        return f"{path.name} was changed or cut short since it was written ({found.st_size} bytes, {written} written)"
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        return f"{path.name} is not a readable .npy file ({first_line(error)})"
    if array.shape != shape or array.dtype != dtype:
        return f"{path.name} holds {array.dtype} {array.shape}, not {np.dtype(dtype)} {shape}"
    return None


def _decode(
    source: ImageSource,
    names: list[str],
    size: int,
    channels: Optional[int],
    workers: int,
    allocate,
    grey_path: Optional[Path] = None,
) -> np.ndarray:
    """Decode `names` into the array allocate(shape, dtype) gives (np.empty, or a .npy file's memory map); with
    channels None, images that are all grey become one plane (into `grey_path`'s file when given)."""
    count, planes = len(names), 1 if channels == 1 else 3
    used = min(workers, count)
    say(
        f"decoding {count} images of {source.path} with {used} process{'es' if used > 1 else ''} "
        f"({available_cores()} cores)",
        every_rank=True,
    )
    started = time.perf_counter()
    images = allocate((count, planes, size, size), np.uint8)
    grey = decode_into(images, source.path, names, size, channels, workers)
    seconds = time.perf_counter() - started
    say(f"decoded {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s)", every_rank=True)
    if channels is None and grey:
        one_plane = (
            allocate((count, 1, size, size), np.uint8)
            if grey_path is None
            else np.lib.format.open_memmap(grey_path, "w+", np.uint8, (count, 1, size, size))
        )
        for start in range(0, count, 4096):
            one_plane[start : start + 4096] = images[start : start + 4096, :1]
        return one_plane
    return images


def build(
    stem: Path, source: ImageSource, order: np.ndarray, size: int, channels: Optional[int], expected: dict, workers: int
) -> None:
    """Decode into temporary files, rename them into place, then write the description that makes them valid."""
    names, labels = rows_of(source, order)
    images_path, labels_path, described = _part(stem, "images"), _part(stem, "labels"), _description_path(stem)
    described.unlink(missing_ok=True)  # from here on the old arrays are not a valid cache
    temporaries = [
        temporary_path(images_path),
        temporary_path(images_path.with_name(images_path.name + ".grey")),
        temporary_path(labels_path),
    ]
    for leftover in temporaries:  # of a build that was killed
        leftover.unlink(missing_ok=True)
    listed = {}  # the listing as it is before decoding: a file changed meanwhile is seen at the next start
    try:
        atomic_write(_part(stem, "files", "tsv"), lambda f: listed.update(sha256=listing_digest(source.stamps(), f)))
        images = _decode(
            source,
            names,
            size,
            channels,
            workers,
            lambda shape, dtype: np.lib.format.open_memmap(temporaries[0], "w+", dtype, shape),
            temporaries[1],
        )
        written = temporaries[1] if images.shape[1] == 1 and channels is None else temporaries[0]
        images.flush()
        del images
        with open(temporaries[2], "wb") as handle:
            np.save(handle, np.asarray(labels, dtype=np.int64))
        for path in (written, temporaries[2]):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(written, images_path)
        os.replace(temporaries[2], labels_path)
    except BaseException:
        _part(stem, "files", "tsv").unlink(missing_ok=True)
        raise
    finally:
        for leftover in temporaries:
            leftover.unlink(missing_ok=True)
    stamps = {
        part: {"bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
        for part, path in (("images", images_path), ("labels", labels_path))
    }
    channels_found = np.load(images_path, mmap_mode="r").shape[1]
    description = {**expected, "files_sha256": listed["sha256"], "channels": channels_found, **stamps}
    atomic_write(described, lambda f: f.write(json.dumps(description).encode()))
