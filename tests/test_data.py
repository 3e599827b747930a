"""ddpm_data: the data sets read from their real file formats (small fakes written by conftest.py), the splits, the
images as the training loop serves them (load_batch), and the epoch order."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import IMAGE_FOLDER_COLOURS, run_cli, usage_error, write_edm_zip, write_flat_folder, write_grey_folder
from ddpm_checkpoint import load_checkpoint
from ddpm_data import (
    POINTS_PER_DATASET,
    SYNTHETIC_CLASS_NAMES,
    epoch_batches,
    epoch_permutation,
    load_batch,
    load_datasets,
)
from ddpm_runtime import Runtime


def served(value) -> torch.Tensor:
    """A uint8 value as the data sets serve it, in [-1, 1]."""
    return torch.as_tensor(value, dtype=torch.float32) / 127.5 - 1


def first_served(split) -> tuple[torch.Tensor, int]:
    """The first image and label of a split as the training loop serves them (ddpm_data.load_batch, flips included)."""
    images, labels = load_batch(split.images, split.labels, torch.tensor([0]), split.hflip, torch.device("cpu"))
    return images[0], int(labels[0])


def fixture_indices(dataset) -> list[int]:
    """The fixtures fill each image's first plane with its index (see conftest.py)."""
    return dataset.images[:, 0, 0, 0].tolist()


def expected_cifar_image(index: int) -> torch.Tensor:
    """What conftest's cifar10_dir writes for image `index`: red = index, green = 255 - index, blue = 8 * column."""
    image = torch.empty(3, 32, 32, dtype=torch.uint8)
    image[0], image[1], image[2] = index, 255 - index, 8 * torch.arange(32)
    return image


def is_flipped(image: torch.Tensor) -> bool:
    """The fixture's blue plane grows from left to right; mirrored, it falls."""
    return bool(image[2, 0, 0] > image[2, 0, -1])


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_decodes_the_rgb_planes_labels_and_class_names(cifar10_dir):
    data = load_datasets("cifar10", cifar10_dir, download=False)
    assert (data.channels, data.image_size, data.num_classes) == (3, 32, 10)
    assert data.class_names[:3] == ["airplane", "automobile", "bird"]
    for split in (data.train, data.val, data.test):
        for position, index in enumerate(fixture_indices(split)):
            assert torch.equal(split.images[position], expected_cifar_image(index))
            assert split.labels[position] == index % 10
    index = fixture_indices(data.val)[0]
    image, label = first_served(data.val)
    assert image.dtype == torch.float32 and label == index % 10
    assert torch.equal(image[:, 5, 7], served([index, 255 - index, 8 * 7]))


def test_cifar10_val_is_a_fixed_tenth_of_train_and_test_is_test_batch(cifar10_dir):
    first, again = (load_datasets("cifar10", cifar10_dir, download=False) for _ in range(2))
    other_seed = load_datasets("cifar10", cifar10_dir, download=False, seed=1)
    assert (len(first.train), len(first.val), len(first.test)) == (90, 10, 20)
    assert fixture_indices(first.val) == fixture_indices(again.val)
    assert set(fixture_indices(first.val)) != set(fixture_indices(other_seed.val))
    train, val = set(fixture_indices(first.train)), set(fixture_indices(first.val))
    assert not train & val and train | val == set(range(100))
    assert sorted(fixture_indices(first.test)) == list(range(100, 120))


def test_hflip_flips_only_training_images_and_only_when_enabled(cifar10_dir):
    data = load_datasets("cifar10", cifar10_dir, download=False)
    torch.manual_seed(0)
    train_flips = [is_flipped(first_served(data.train)[0]) for _ in range(64)]
    assert any(train_flips) and not all(train_flips)
    torch.manual_seed(0)
    assert [is_flipped(first_served(data.train)[0]) for _ in range(64)] == train_flips
    assert not any(is_flipped(first_served(split)[0]) for split in (data.val, data.test) for _ in range(64))
    unflipped = load_datasets("cifar10", cifar10_dir, hflip=False, download=False)
    assert not any(is_flipped(first_served(unflipped.train)[0]) for _ in range(64))


def test_image_size_resizes_every_split_at_load_time(cifar10_dir):
    data = load_datasets("cifar10", cifar10_dir, image_size=16, download=False)
    assert data.image_size == 16
    for split in (data.train, data.val, data.test):
        assert split.images.shape[1:] == (3, 16, 16) and split.images.dtype == torch.uint8
        assert (split.images[:, 0] == split.images[:, 0, :1, :1]).all()  # a flat plane stays flat


def test_missing_cifar10_without_download_says_what_to_place_where(tmp_path):
    message = usage_error(load_datasets, "cifar10", tmp_path, download=False)
    assert "cifar-10-python.tar.gz" in message and "cifar-10-batches-py" in message and str(tmp_path) in message


def test_failed_cifar10_download_is_a_usage_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    message = usage_error(load_datasets, "cifar10", tmp_path, download=True)
    assert "could not be downloaded" in message and "cifar-10-python.tar.gz" in message


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_missing_or_broken_cifar10_batch_is_named(cifar10_dir, damage):
    batch = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    if damage == "delete":
        batch.unlink()
    else:
        batch.write_bytes(batch.read_bytes()[:100])
    assert "data_batch_3" in usage_error(load_datasets, "cifar10", cifar10_dir, download=False)


# ----------------------------------------------------------------------------- MNIST, image folder


@pytest.mark.parametrize(
    "name, folder_fixture, first_class",
    [("mnist", "mnist_dir", "0"), ("fashion_mnist", "fashion_mnist_dir", "T-shirt/top")],
)
def test_mnist_style_data_sets_read_the_idx_files(name, folder_fixture, first_class, request):
    data = load_datasets(name, request.getfixturevalue(folder_fixture), download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 10)
    assert (data.channels, data.image_size, data.class_names[0], data.train.hflip) == (1, 28, first_class, False)
    assert sorted(fixture_indices(data.test)) == list(range(100, 110))
    index = fixture_indices(data.val)[0]
    image, label = first_served(data.val)
    assert image.shape == (1, 28, 28) and label == index % 10
    assert torch.equal(image[0], served(index + 4 * torch.arange(28)).expand(28, 28))


def test_missing_mnist_names_the_four_files_and_the_folder(tmp_path):
    message = usage_error(load_datasets, "mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_image_folder_classes_colours_and_resize(image_folder_dir):
    data = load_datasets("folder", image_folder_dir, image_size=16)
    assert data.class_names == ["cat", "dog", "fox"] and (data.channels, data.image_size) == (3, 16), (
        "one colour image: RGB"
    )
    assert (len(data.train), len(data.val), len(data.test)) == (11, 1, 1)
    for split in (data.train, data.val, data.test):
        for image, label in zip(split.images, split.labels):
            colour = tuple(image[:, 8, 8].tolist())
            assert colour in (IMAGE_FOLDER_COLOURS[data.class_names[label]], (128, 128, 128))
            assert (image == image[:, :1, :1]).all()
    assert load_datasets("folder", image_folder_dir).image_size == 32


def test_a_folder_of_grey_images_stays_grey_and_unflipped_unless_asked(tmp_path):
    write_grey_folder(tmp_path, "flat")
    data = load_datasets("folder", tmp_path, image_size=8)
    assert data.channels == 1 and data.train.images.shape[1:] == (1, 8, 8)
    assert data.train.hflip is False, "folders: flips only with --hflip"
    assert load_datasets("folder", tmp_path, image_size=8, hflip=True).train.hflip is True
    assert load_datasets("folder", tmp_path, image_size=8, channels=3).channels == 3
    written = {np.asarray(Image.open(path)).tobytes() for path in tmp_path.rglob("*.png")}
    assert all(image[0].numpy().tobytes() in written for image in data.train.images), "the grey pixels as written"


def test_a_folder_of_rgb_images_can_be_trained_grey(image_folder_dir):
    data = load_datasets("folder", image_folder_dir, image_size=8, channels=1)
    assert data.channels == 1
    red_cat = next(
        image
        for image, label in zip(data.train.images, data.train.labels)
        if data.class_names[label] == "cat" and image.float().mean() < 120
    )
    assert red_cat[0, 4, 4].item() == round(0.299 * 255), "ITU-R 601 luma of pure red"


def test_a_folder_with_train_and_test_subfolders_uses_them_as_the_splits(tmp_path):
    write_grey_folder(tmp_path, "split")
    data = load_datasets("folder", tmp_path, image_size=8, val_fraction=0)
    assert data.class_names == ["a", "b"]
    assert (len(data.train), len(data.val), len(data.test)) == (8, 0, 4)
    assert sorted(data.test.labels.tolist()) == [0, 0, 1, 1]
    assert (len(load_datasets("folder", tmp_path, image_size=8).val)) == 1, "--val_fraction 0.1 of 8, at least one"
    (tmp_path / "test" / "c").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "test" / "c" / "0.png")
    assert "same class folders" in usage_error(load_datasets, "folder", tmp_path)


def test_a_flat_folder_trains_an_unconditional_model_and_refuses_conditional(tmp_path, capsys):
    write_flat_folder(tmp_path / "flat", 20)
    tiny = (
        "--dataset folder --data_dir flat --image_size 8 --model_size tiny --timesteps 20 --batch_size 4 --max_steps 2 "
        "--sample_every 0"
    )
    assert run_cli(f"{tiny} --save_model --run_name F --save_dir out", tmp_path) == 0
    assert "17 train / 1 val / 2 test images of 3x8x8" in capsys.readouterr().out
    checkpoint = load_checkpoint(tmp_path / "models/F/ckpt.pt")
    assert checkpoint["data"]["class_names"] == [] and checkpoint["model_config"]["num_classes"] is None
    assert run_cli(f"{tiny} --conditional", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--conditional needs classes and flat has none" in err


def test_an_edm_zip_with_labels_trains_a_conditional_model_with_its_label_values_as_classes(tmp_path, capsys):
    write_edm_zip(tmp_path / "edm.zip", [7, 3, 7, 12, 3, 3, 7, 12, 12, 3, 7, 3])
    assert (
        run_cli(
            "--dataset folder --data_dir edm.zip --model_size tiny --timesteps 20 --batch_size 4 --max_steps 2 "
            "--sample_every 0 --conditional --save_model --run_name Z --save_dir out",
            tmp_path,
        )
        == 0
    )
    assert "images of 3x8x8" in capsys.readouterr().out, "the zip's own size (dataset_tool.py's --resolution)"
    checkpoint = load_checkpoint(tmp_path / "models/Z/ckpt.pt")
    assert checkpoint["data"]["class_names"] == ["3", "7", "12"] and checkpoint["model_config"]["num_classes"] == 3
    assert (tmp_path / ".ddpm_cache").is_dir(), "a zip's cache goes beside it"


def test_a_folder_with_a_bad_image_is_one_line_naming_it_and_leaves_no_cache(tmp_path, capsys):
    write_flat_folder(tmp_path / "flat", 6)
    (tmp_path / "flat" / "003.png").write_bytes(b"GIF89a, and then nothing")
    assert run_cli("--dataset folder --data_dir flat --image_size 8 --model_size tiny --max_steps 1", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot read image flat/003.png (")
    assert "Traceback" not in "\n".join(err)
    assert sorted(path.name.split(".", 1)[1] for path in (tmp_path / ".ddpm_cache").iterdir()) == ["lock"]


def test_an_unknown_data_set_name_lists_the_choices(tmp_path):
    assert "cifar10" in usage_error(load_datasets, "imagenet", tmp_path)


# ----------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic():
    return load_datasets("synthetic", "unused")


def test_synthetic_is_deterministic_balanced_and_split(synthetic):
    assert (len(synthetic.train), len(synthetic.val), len(synthetic.test)) == (4860, 540, 600)
    assert synthetic.class_names == list(SYNTHETIC_CLASS_NAMES) and synthetic.num_classes == 10
    again, other_seed = load_datasets("synthetic", "unused"), load_datasets("synthetic", "unused", seed=1)
    assert torch.equal(synthetic.train.images, again.train.images)
    assert not torch.equal(synthetic.train.images[:10], other_seed.train.images[:10])
    labels = torch.cat([synthetic.train.labels, synthetic.val.labels, synthetic.test.labels])
    assert torch.bincount(labels).tolist() == [600] * 10


def drawn_colour(images: torch.Tensor) -> torch.Tensor:
    """Mean colour (N, 3) of the pixels brighter than the dark background."""
    drawn = (images.max(1).values > 100).unsqueeze(1)
    return (images * drawn).flatten(2).sum(2) / drawn.flatten(2).sum(2).clamp(min=1)


def test_synthetic_classes_differ_in_mean_image_and_drawn_colour(synthetic):
    train_images, train_labels = synthetic.train.images.float(), synthetic.train.labels
    mean_images = torch.stack([train_images[train_labels == label].mean(0) for label in range(10)]).flatten(1)
    distances = torch.cdist(mean_images, mean_images) + torch.eye(10) * 1e9
    assert distances.min() > 100  # every pair of class means differs by clearly visible amounts
    mean_colours = torch.stack([drawn_colour(train_images[train_labels == label]).mean(0) for label in range(10)])
    predicted = torch.cdist(drawn_colour(synthetic.test.images.float()), mean_colours).argmin(1)
    assert (predicted == synthetic.test.labels).float().mean() > 0.95


@pytest.mark.parametrize("size", [16, 28, 64])
def test_synthetic_is_drawn_at_the_requested_size(size):
    data = load_datasets("synthetic", "unused", image_size=size)
    assert data.image_size == size and data.train.images.shape[1:] == (3, size, size)


# ----------------------------------------------------------------------------- serving and epoch order


def test_load_batch_maps_uint8_to_minus_one_one_and_keeps_the_labels():
    images = torch.tensor([0, 64, 128, 255], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 3).contiguous()
    labels = torch.tensor([7, 8, 9, 6])
    x, y = load_batch(images, labels, torch.tensor([3, 0, 2]), False, torch.device("cpu"))
    assert x.dtype == torch.float32 and x.shape == (3, 1, 2, 3)
    assert x[:, 0, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6) and y.tolist() == [6, 7, 9]


def test_the_epoch_order_is_a_function_of_seed_and_epoch_alone():
    first = epoch_permutation(100, seed=3, epoch=2)
    assert sorted(first.tolist()) == list(range(100)), "a permutation"
    assert torch.equal(first, epoch_permutation(100, seed=3, epoch=2))
    assert not torch.equal(first, epoch_permutation(100, seed=3, epoch=3)) and not torch.equal(
        first, epoch_permutation(100, seed=4, epoch=2)
    )


def test_epoch_batches_resume_mid_epoch_drop_the_last_partial_batch_and_share_each_batch_over_the_ranks():
    cpu = torch.device("cpu")
    order = epoch_permutation(50, seed=1, epoch=0)
    whole = list(epoch_batches(50, 8, Runtime(cpu), seed=1, epoch=0, start=0, device=cpu))
    assert [position for position, _ in whole] == [8, 16, 24, 32, 40, 48], "50 = 6 x 8 + 2: the last 2 are dropped"
    assert torch.equal(torch.cat([indices for _, indices in whole]), order[:48])
    resumed = list(epoch_batches(50, 8, Runtime(cpu), seed=1, epoch=0, start=24, device=cpu))
    assert [(p, i.tolist()) for p, i in resumed] == [(p, i.tolist()) for p, i in whole[3:]], (
        "from a saved position, the same rest"
    )
    ranks = [list(epoch_batches(50, 4, Runtime(cpu, rank, 2), seed=1, epoch=0, start=0, device=cpu)) for rank in (0, 1)]
    for (position, indices), rank0, rank1 in zip(whole, *ranks):
        assert rank0[0] == rank1[0] == position, "a global batch of 2 x 4 moves both ranks to the same position"
        assert sorted(rank0[1].tolist() + rank1[1].tolist()) == sorted(indices.tolist()), "the ranks split one batch"


def test_a_point_data_set_is_float_points_split_like_every_other():
    data = load_datasets("moons", "unused", seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (32_400, 3_600, 4_000)
    assert sum((len(data.train), len(data.val), len(data.test))) == POINTS_PER_DATASET
    assert data.train.images.dtype == torch.float32 and data.train.images.shape == (32_400, 2)
    assert (
        data.image_size is None
        and data.sample_shape == (2,)
        and data.class_names == ["upper", "lower"]
        and not data.train.hflip
    )
    assert data.train.images.var(0).mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(load_datasets("moons", "unused", seed=0).train.images, data.train.images)
    x, labels = load_batch(data.train.images, data.train.labels, torch.arange(4), False, torch.device("cpu"))
    assert torch.equal(x, data.train.images[:4]) and torch.equal(labels, data.train.labels[:4])
    assert "--image_size and --channels are for images" in usage_error(load_datasets, "moons", "unused", image_size=8)
