"""ddpm_imagefolder: the three layouts (flat folder, class folders, EDM dataset zip) as found on disk, decoding as
torchvision's ImageFolder + Resize + CenterCrop decodes, in parallel as in one process, and bad input named."""

import io
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from conftest import indexed_pixels, usage_error, write_edm_zip, write_flat_folder
from ddpm_data import _to_channels
from ddpm_imagefolder import decode_chunk, decode_image, decode_into, find_images, to_grey


@pytest.mark.parametrize(
    "mode, size",
    [("RGB", (40, 24)), ("RGB", (23, 41)), ("L", (17, 17)), ("RGBA", (9, 30)), ("P", (50, 33)), ("RGB", (6, 5))],
)
def test_decoding_is_torchvisions_resize_and_centre_crop_of_the_rgb_image(tmp_path, mode, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    image.save(tmp_path / "image.png")
    reference = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.PILToTensor()])
    expected = reference(torchvision.datasets.folder.pil_loader(str(tmp_path / "image.png")))
    with open(tmp_path / "image.png", "rb") as file:
        assert torch.equal(torch.from_numpy(decode_image(file, 16).copy()), expected)


def test_to_grey_is_ddpm_datas_luma():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (50, 3, 4, 4), dtype=np.uint8))
    assert torch.equal(torch.from_numpy(to_grey(images.numpy())), _to_channels((images, None), 1)[0])


def test_a_flat_folder_is_unlabelled_and_leaves_out_hidden_and_other_files(tmp_path, capsys):
    write_flat_folder(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"macOS metadata")
    (tmp_path / ".ddpm_cache").mkdir()
    source = find_images(tmp_path)
    assert source.train.names == ["000.png", "001.png", "002.png"] and source.train.labels == [0, 0, 0]
    assert source.class_names == [] and source.test is None
    first = (tmp_path / "000.png").stat()
    assert [line.split("\t")[0] for line in "".join(source.stamps()).splitlines()] == source.train.names
    assert "".join(source.stamps()).splitlines()[0] == f"000.png\t{first.st_size}\t{first.st_mtime_ns}"


def test_class_folders_are_found_in_torchvisions_imagefolder_order(image_folder_dir):
    (image_folder_dir / "dog" / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(image_folder_dir / "dog" / "nested" / "0.png")
    (image_folder_dir / "fox" / "readme.txt").write_text("skipped")
    reference = torchvision.datasets.ImageFolder(str(image_folder_dir))
    source = find_images(image_folder_dir)
    assert source.class_names == reference.classes == ["cat", "dog", "fox"]
    assert [str(image_folder_dir / name) for name in source.train.names] == [path for path, _ in reference.samples]
    assert source.train.labels == reference.targets


def test_train_and_test_folders_are_the_two_parts_flat_or_with_classes(tmp_path):
    write_flat_folder(tmp_path / "flat" / "train", 4)
    write_flat_folder(tmp_path / "flat" / "test", 2)
    source = find_images(tmp_path / "flat")
    assert source.train.names == [f"train/{k:03d}.png" for k in range(4)] and source.test.names == [
        "test/000.png",
        "test/001.png",
    ]
    write_flat_folder(tmp_path / "mixed" / "train", 2)
    write_flat_folder(tmp_path / "mixed" / "test" / "cats", 2)
    assert "same class folders, not (none) and cats" in usage_error(find_images, tmp_path / "mixed")


def test_an_edm_zip_is_conditional_with_classes_named_by_their_label_values(tmp_path):
    write_edm_zip(tmp_path / "data.zip", [10, 2, 5, 2, 10, 10], size=8)
    source = find_images(tmp_path / "data.zip")
    assert source.train.names == [f"00000/img{k:08d}.png" for k in range(6)]
    assert source.class_names == ["2", "5", "10"], "sorted by value, named by it"
    assert source.train.labels == [2, 0, 1, 0, 2, 2] and source.native_size == 8
    stat = (tmp_path / "data.zip").stat()
    assert "".join(source.stamps()) == f"data.zip\t{stat.st_size}\t{stat.st_mtime_ns}\n"
    images, grey = decode_chunk(str(tmp_path / "data.zip"), source.train.names[:2], 8, None)
    assert not grey and np.array_equal(images[1], indexed_pixels(1, 8, 8).transpose(2, 0, 1))


@pytest.mark.parametrize("dataset_json", [True, False])
def test_an_edm_zip_with_null_labels_or_without_dataset_json_is_unlabelled(tmp_path, dataset_json):
    write_edm_zip(tmp_path / "data.zip", None, dataset_json=dataset_json)
    source = find_images(tmp_path / "data.zip")
    assert source.class_names == [] and source.train.labels == [0] * 6


def rewrite_labels(path, text: str) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != "dataset.json"}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("dataset.json", text)


@pytest.mark.parametrize(
    "labels, message",
    [
        ('{"labels": [["00000/img00000000.png", 1]]}', "no label for 00000/img00000001.png"),
        (
            '{"labels": [["00000/img00000000.png", 0], ["00000/img00000001.png", [0.5, 1.0]]]}',
            "the label of 00000/img00000001.png is [0.5, 1.0], not a class number",
        ),
        ("{not json", "data.zip:dataset.json is not dataset_tool.py's labels"),
        ('{"labels": 3}', "data.zip:dataset.json is not dataset_tool.py's labels"),
    ],
)
def test_bad_labels_of_a_zip_are_named(tmp_path, labels, message):
    write_edm_zip(tmp_path / "data.zip", [0, 1])
    rewrite_labels(tmp_path / "data.zip", labels)
    assert message in usage_error(find_images, tmp_path / "data.zip")


def test_a_zip_without_images_and_a_file_that_is_no_zip_are_named(tmp_path):
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "no images")
    assert f"no images in {tmp_path / 'empty.zip'}" in usage_error(find_images, tmp_path / "empty.zip")
    (tmp_path / "fake.zip").write_bytes(b"not a zip at all")
    assert f"cannot read {tmp_path / 'fake.zip'} as a dataset zip" in usage_error(find_images, tmp_path / "fake.zip")


def test_empty_mixed_and_missing_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert f"no images in {tmp_path / 'empty'} (it has 1 other files, e.g. notes.txt)" in usage_error(
        find_images, tmp_path / "empty"
    )
    write_flat_folder(tmp_path / "mixed", 1)
    (tmp_path / "mixed" / "cats").mkdir()
    assert "both images (e.g. 000.png) and sub-folders (e.g. cats)" in usage_error(find_images, tmp_path / "mixed")
    (tmp_path / "classes" / "cats").mkdir(parents=True)
    assert f"no images in the class folder {tmp_path / 'classes' / 'cats'}" in usage_error(
        find_images, tmp_path / "classes"
    )
    assert f"image folder not found: {tmp_path / 'missing'}" in usage_error(find_images, tmp_path / "missing")


@pytest.mark.parametrize("content", [b"this is text, not a PNG", "truncated"])
def test_a_corrupt_truncated_or_non_image_file_is_named(tmp_path, content):
    write_flat_folder(tmp_path, 3)
    whole = (tmp_path / "001.png").read_bytes()
    (tmp_path / "001.png").write_bytes(whole[: len(whole) // 2] if content == "truncated" else content)
    message = usage_error(decode_chunk, str(tmp_path), ["000.png", "001.png"], 8, None)
    assert message.startswith(f"cannot read image {tmp_path / '001.png'} (")


def test_a_corrupt_member_of_a_zip_is_named(tmp_path):
    write_edm_zip(tmp_path / "data.zip", [0, 1])
    with zipfile.ZipFile(tmp_path / "data.zip", "a") as archive:
        archive.writestr("00000/img00000002.png", b"garbage")
    message = usage_error(decode_chunk, str(tmp_path / "data.zip"), ["00000/img00000002.png"], 8, None)
    assert message.startswith(f"cannot read image {tmp_path / 'data.zip'}:00000/img00000002.png (")


def test_parallel_decoding_fills_the_same_rows_as_one_process(tmp_path):
    write_flat_folder(tmp_path, 30, width=9, height=14)
    names = [f"{k:03d}.png" for k in np.random.default_rng(0).permutation(30)]
    serial, parallel = (np.zeros((30, 1, 8, 8), dtype=np.uint8) for _ in range(2))
    assert decode_into(serial, tmp_path, names, 8, 1, workers=1) is False
    assert decode_into(parallel, tmp_path, names, 8, 1, workers=2, chunk=1) is False, (
        "30 chunks, more than decoded ahead"
    )
    assert np.array_equal(serial, parallel)
    with open(tmp_path / names[7], "rb") as file:
        assert np.array_equal(parallel[7], to_grey(decode_image(file, 8)[None])[0])
    (tmp_path / names[21]).write_bytes(b"broken")
    assert str(tmp_path / names[21]) in usage_error(decode_into, parallel, tmp_path, names, 8, 1, workers=2, chunk=4)


def test_decoding_says_when_every_image_is_grey(tmp_path):
    for index in range(3):
        Image.new("L" if index else "RGB", (8, 8), (40 * index,) * (1 if index else 3)).save(tmp_path / f"{index}.png")
    images, grey = decode_chunk(str(tmp_path), ["0.png", "1.png", "2.png"], 8, None)
    assert grey and images.shape == (3, 3, 8, 8)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="png")
    (tmp_path / "3.png").write_bytes(buffer.getvalue())
    assert decode_chunk(str(tmp_path), ["0.png", "3.png"], 8, None)[1] is False
