"""ddpm_outputs: atomic writes, the sample files (PNGs and the .npz), grids and labelled rows enlarged to at least
64 pixels per image, JSON and JSON lines."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_outputs import (
    append_jsonl,
    atomic_write,
    display_scale,
    enlarge,
    save_image_grid,
    save_json,
    save_labelled_rows,
    save_samples,
    to_uint8,
)


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "deep" / "file.bin"
    atomic_write(path, lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"

    def half_then_fail(f):
        f.write(b"half of the sec")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"first" and os.listdir(path.parent) == ["file.bin"], (
        "the old file, and no temporary left"
    )
    atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second" and os.listdir(path.parent) == ["file.bin"]


def test_to_uint8_maps_the_range_ends_rounds_half_up_and_puts_channels_last():
    values = torch.tensor([-1.5, -1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 6)
    assert to_uint8(values).flatten().tolist() == [0, 0, 64, 128, 255, 255]
    pixel = to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1))
    assert pixel.dtype == torch.uint8 and pixel.shape == (1, 1, 1, 3) and pixel.flatten().tolist() == [0, 128, 255]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("labels", [None, torch.tensor([3, -1])])
def test_save_samples_writes_one_png_each_and_an_npz(tmp_path, channels, labels):
    images = torch.rand(2, channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_samples(images, labels, tmp_path / "out")
    saved = np.load(tmp_path / "out" / "samples.npz")
    assert saved["images"].dtype == np.uint8 and saved["images"].shape == (2, 8, 8, channels)
    assert np.array_equal(saved["images"], to_uint8(images).numpy())
    assert saved["labels"].dtype == np.int64
    assert saved["labels"].tolist() == ([-1, -1] if labels is None else [3, -1])
    assert sorted(os.listdir(tmp_path / "out" / "samples")) == ["00000.png", "00001.png"]
    png = np.array(Image.open(tmp_path / "out" / "samples" / "00001.png"))
    assert np.array_equal(png, saved["images"][1].squeeze(-1) if channels == 1 else saved["images"][1])


@pytest.mark.parametrize("nrow, width, height", [(None, 4 * 66 + 2, 3 * 66 + 2), (5, 5 * 66 + 2, 2 * 66 + 2)])
def test_save_image_grid_lays_out_padded_rows_of_images_enlarged_to_64_pixels(tmp_path, nrow, width, height):
    """8x8 images are shown 8x (nearest neighbour: 64 px), and torchvision pads each by 2 pixels; ten images make 4 per
    row (ceil(sqrt(10))) by default."""
    images = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_image_grid(images, tmp_path / "grids" / "grid.png", nrow=nrow)
    grid = np.array(Image.open(tmp_path / "grids" / "grid.png").convert("RGB"))
    assert grid.shape == (height, width, 3)
    first_image = grid[2:66, 2:66].astype(int)
    native = to_uint8(images)[0].numpy().astype(int)
    assert np.abs(first_image - native.repeat(8, axis=0).repeat(8, axis=1)).max() <= 1, "each pixel an 8x8 block"
    assert os.listdir(tmp_path / "grids") == ["grid.png"]


def test_images_of_64_pixels_or_more_are_not_enlarged():
    assert [display_scale(width) for width in (8, 16, 28, 32, 63, 64, 256)] == [8, 4, 3, 2, 2, 1, 1]


def test_save_json_creates_folders_and_indents(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    save_json({"loss": 0.5, "classes": ["cat"]}, path)
    assert json.loads(path.read_text()) == {"loss": 0.5, "classes": ["cat"]}
    assert path.read_text().startswith('{\n  "loss"')


def test_enlarge_makes_each_pixel_a_block_and_display_scale_reaches_64_pixels():
    image = torch.arange(6).view(1, 1, 2, 3)
    big = enlarge(image, 3)
    assert big.shape == (1, 1, 6, 9)
    for row in range(2):
        for column in range(3):
            assert (big[0, 0, 3 * row : 3 * row + 3, 3 * column : 3 * column + 3] == image[0, 0, row, column]).all()
    assert torch.equal(enlarge(image, 1), image)
    for width in (1, 7, 8, 9, 16, 20, 28, 32, 33, 63, 64, 65, 100):
        scale = display_scale(width)
        assert scale * width >= 64 and (scale == 1 or (scale - 1) * width < 64), width  # the smallest whole factor


def test_labelled_rows_show_each_image_enlarged_to_64_pixels(tmp_path):
    rows = [
        ("step 1", torch.zeros(3, 8, 8, 3, dtype=torch.uint8)),
        ("step 20", torch.full((2, 8, 8, 3), 128, dtype=torch.uint8)),
    ]
    save_labelled_rows(rows, tmp_path / "rows.png")
    with Image.open(tmp_path / "rows.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] == 2 * 64, "one 64-pixel row per entry"
    label_width = pixels.shape[1] - 3 * 64
    assert (pixels[:64, label_width:] == 0).all(), "three black 8x8 images, each shown 64 px wide"
    assert (pixels[64:, label_width : label_width + 2 * 64] == 128).all(), "two grey ones below"
    assert (pixels[64:, label_width + 2 * 64 :] == 255).all(), "and the white background where the shorter row ends"


def test_append_jsonl_adds_one_line_per_record(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5})
    append_jsonl(path, {"step": 2, "loss": float("nan")})
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"step": 1, "loss": 0.5} and json.loads(lines[1])["step"] == 2
