"""ddpm_datacache: a folder is decoded once and memory-mapped after; a changed source, a damaged cache or a build
killed midway is rebuilt (and says why); never a half cache; the cache's folder when the data's cannot be written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, indexed_pixels, usage_error, write_flat_folder, write_grey_folder
from ddpm_data import _hold_out, load_datasets
from ddpm_datacache import CACHE_FOLDER, decoded_images
from ddpm_imagefolder import find_images

COUNT = 40  # images of the flat folder; decoded at 8 x 8


def load(root: Path, **kwargs):
    return load_datasets("folder", root, image_size=8, **kwargs)


def indices(split) -> list[int]:
    """The images' indices, as write_flat_folder wrote them into the red plane."""
    return split.images[:, 0, 0, 0].tolist()


def cache_files(root: Path) -> list[str]:
    return sorted(path.name.split(".", 1)[1] for path in (root.parent / CACHE_FOLDER).iterdir())


@pytest.fixture
def flat(tmp_path) -> Path:
    write_flat_folder(tmp_path / "images", COUNT)
    return tmp_path / "images"


def test_the_first_start_decodes_and_later_ones_map_the_same_images(flat, capsys):
    first = load(flat)
    err = capsys.readouterr().err
    assert f"decoding {COUNT} images of {flat} with" in err and "mapped from" in err
    assert cache_files(flat) == ["files.tsv", "images.npy", "json", "labels.npy", "lock"]
    again = load(flat)
    err = capsys.readouterr().err
    assert "decoding" not in err and "mapped from" in err
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, split).images, getattr(again, split).images)
    assert (first.class_names, first.channels, first.image_size) == ([], 3, 8)
    image = torch.from_numpy(indexed_pixels(5)[:, 2:10].transpose(2, 0, 1).copy())  # 12 x 8 cropped to its centre 8 x 8
    every = torch.cat([first.train.images, first.val.images, first.test.images])
    assert torch.equal(next(im for im in every if im[0, 0, 0] == 5), image)


def test_the_splits_are_views_of_one_map_in_the_order_hold_out_draws_them(flat):
    data = load(flat, val_fraction=0.2, seed=3)
    storages = {split.images.untyped_storage().data_ptr() for split in (data.train, data.val, data.test)}
    assert len(storages) == 1, "train, val and test share the mapped pages: no copies"
    reference = torch.arange(COUNT), torch.zeros(COUNT)
    generator = torch.Generator().manual_seed(3)
    rest, test = _hold_out(reference, 0.1, generator)
    train, val = _hold_out(rest, 0.2, generator)
    assert (indices(data.test), indices(data.val), indices(data.train)) == (
        test[0].tolist(),
        val[0].tolist(),
        train[0].tolist(),
    )


def test_a_changed_or_added_source_file_rebuilds_the_cache_and_says_why(flat, capsys):
    load(flat)
    capsys.readouterr()
    stamp = (flat / "007.png").stat()
    os.utime(flat / "007.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    load(flat)
    assert "rebuilding the decoded cache" in (err := capsys.readouterr().err) and "1 changed, e.g. 007.png" in err
    (flat / "100.png").write_bytes((flat / "001.png").read_bytes())
    data = load(flat)
    assert "1 added, e.g. 100.png" in capsys.readouterr().err
    assert sum(len(split) for split in (data.train, data.val, data.test)) == COUNT + 1
    load_datasets("folder", flat, image_size=4)
    assert "no decoded cache" in capsys.readouterr().err, "another size is another cache"


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate_images", "images.npy was changed or cut short"),
        ("edit_labels", "labels.npy was changed or cut short"),
        ("delete_images", "images.npy is missing"),
        ("garble_description", "is unreadable"),
        ("edit_description", "its image_size is 9, now 8"),
    ],
)
def test_a_damaged_cache_is_rebuilt_and_says_why(flat, capsys, damage, reason):
    expected = load(flat).train.images.clone()
    stem = next((flat.parent / CACHE_FOLDER).glob("*.json")).with_suffix("")
    part = {
        "images": stem.with_name(stem.name + ".images.npy"),
        "labels": stem.with_name(stem.name + ".labels.npy"),
        "description": stem.with_suffix(".json"),
    }
    if damage == "truncate_images":
        part["images"].write_bytes(part["images"].read_bytes()[:-100])
    elif damage == "edit_labels":
        time.sleep(0.01)
        data = bytearray(part["labels"].read_bytes())
        data[-8] ^= 1
        part["labels"].write_bytes(bytes(data))
    elif damage == "delete_images":
        part["images"].unlink()
    elif damage == "garble_description":
        part["description"].write_text("{ half a description")
    else:
        part["description"].write_text(json.dumps({**json.loads(part["description"].read_text()), "image_size": 9}))
    capsys.readouterr()
    assert torch.equal(load(flat).train.images, expected)
    assert reason in capsys.readouterr().err
    load(flat)
    assert "decoding" not in capsys.readouterr().err, "rebuilt once, then used"


KILLED_BUILD = """
import sys, time
sys.path.insert(0, {repo!r})
import ddpm_imagefolder
decode = ddpm_imagefolder.decode_chunk
def slow(*args):
    time.sleep(0.5)
    return decode(*args)
ddpm_imagefolder.decode_chunk = slow
import ddpm_data
ddpm_data.load_datasets("folder", {root!r}, image_size=8)
"""


def test_a_build_killed_midway_leaves_no_cache_that_is_used(flat, capsys):
    """SIGKILL a real process while it decodes (slowed to 0.5 s per chunk of 64): its temporary file is there, its
    description is not; the next start rebuilds, and clears the temporary file."""
    script = KILLED_BUILD.format(repo=str(REPO), root=str(flat))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((flat.parent / CACHE_FOLDER).glob("*.images.npy.tmp")) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert list((flat.parent / CACHE_FOLDER).glob("*.images.npy.tmp")), "killed while writing"
    cache = flat.parent / CACHE_FOLDER
    assert not list(cache.glob("*.json")) and not list(cache.glob("*.images.npy"))
    capsys.readouterr()
    data = load(flat)
    assert "no decoded cache" in capsys.readouterr().err
    assert sorted(indices(data.train) + indices(data.val) + indices(data.test)) == list(range(COUNT))
    assert not list((flat.parent / CACHE_FOLDER).glob("*.tmp"))


def test_an_unwritable_data_folder_puts_the_cache_in_the_user_cache_folder(flat, tmp_path, monkeypatch, capsys):
    (flat.parent / CACHE_FOLDER).write_text("a file where the cache folder would go: it cannot be created")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = load(flat)
    assert f"the decoded cache goes to {tmp_path / 'xdg' / 'ddpm'}" in capsys.readouterr().err
    assert len(list((tmp_path / "xdg" / "ddpm").glob("images-8px-*.images.npy"))) == 1
    assert len(data.train) + len(data.val) + len(data.test) == COUNT


def test_data_cache_chooses_the_folder_and_no_data_cache_writes_nothing(flat, tmp_path):
    cached = load(flat, data_cache=str(tmp_path / "elsewhere"))
    assert len(list((tmp_path / "elsewhere").glob("*.images.npy"))) == 1 and not (flat.parent / CACHE_FOLDER).exists()
    in_memory = load(flat, use_data_cache=False)
    assert not (flat.parent / CACHE_FOLDER).exists()
    assert torch.equal(in_memory.train.images, cached.train.images) and torch.equal(
        in_memory.test.labels, cached.test.labels
    )
    (tmp_path / "a_file").write_text("x")
    assert "--data_cache" in usage_error(load, flat, data_cache=str(tmp_path / "a_file"))


def test_a_grey_folder_is_cached_as_one_plane_and_forced_channels_are_their_own_cache(tmp_path):
    write_grey_folder(tmp_path / "grey", "flat")
    grey = load_datasets("folder", tmp_path / "grey", image_size=8)
    assert grey.channels == 1
    assert np.load(next((tmp_path / CACHE_FOLDER).glob("*.images.npy")), mmap_mode="r").shape[1] == 1
    rgb = load_datasets("folder", tmp_path / "grey", image_size=8, channels=3)
    assert rgb.channels == 3 and torch.equal(rgb.train.images[:, 1], grey.train.images[:, 0])
    assert len(list((tmp_path / CACHE_FOLDER).glob("*.images.npy"))) == 2


def test_decoded_images_reports_the_cache_file(flat):
    source = find_images(flat)
    decoded = decoded_images(source, 8, None, np.arange(COUNT)[::-1].copy(), seed=0)
    assert isinstance(decoded.images, np.memmap) and Path(decoded.images.filename) == decoded.cache
    assert decoded.images[0, 0, 0, 0] == COUNT - 1, "rows in the order given"
