"""ddpm_kinds: images and 2D points behind one interface, each default resolved once where the model is known."""

import pytest
import torch

from ddpm_checkpoint import ModelDescription
from ddpm_config import GUIDANCE_SCALE, POINT_GUIDANCE_SCALE, SamplingConfig, UsageError
from ddpm_data import load_datasets
from ddpm_kinds import ImageKind, PointKind, kind_of_data, kind_of_model


def description(image_size, channels, dataset="synthetic"):
    return ModelDescription(
        model_config={},
        diffusion={},
        conditional=True,
        data={"dataset": dataset, "class_names": ["a", "b"], "image_size": image_size, "channels": channels},
    )


def test_the_kind_comes_from_the_data_or_the_checkpoint_alike(tmp_path):
    points = load_datasets("moons", tmp_path)
    assert isinstance(kind_of_data("moons", points), PointKind) and kind_of_data("moons", points).sample_shape == (2,)
    images = load_datasets("synthetic", tmp_path, image_size=8)
    assert isinstance(kind_of_data("synthetic", images), ImageKind) and kind_of_data(
        "synthetic", images
    ).sample_shape == (3, 8, 8)
    assert isinstance(kind_of_model(description(None, 2, "moons")), PointKind)
    assert kind_of_model(description(16, 1)).sample_shape == (1, 16, 16)


def test_sampling_defaults_are_resolved_once_from_the_kind_and_the_sampler():
    images, points = ImageKind(3, 8), PointKind("moons", 2, ["upper", "lower"])
    assert images.sampling_settings(SamplingConfig(), 1000).guidance_scale == GUIDANCE_SCALE == 1.5
    assert points.sampling_settings(SamplingConfig(), 1000).guidance_scale == POINT_GUIDANCE_SCALE == 1.0
    given = SamplingConfig(guidance_scale=2.5, sampler="ddim")
    assert points.sampling_settings(given, 1000).guidance_scale == 2.5
    assert images.sampling_settings(given, 1000).steps == 50 and images.sampling_settings(given, 20).steps == 20
    assert images.sampling_settings(SamplingConfig(sampler="ddpm"), 300).steps == 300
    assert images.sampling_settings(SamplingConfig(sampler="ddim", steps=7), 1000).steps == 7


def test_images_are_saved_as_uint8_pixels_and_points_as_floats_unclipped():
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 2.0]]]])
    assert torch.equal(ImageKind(1, 2).to_saved(x), torch.tensor([[[[0], [128]], [[255], [255]]]], dtype=torch.uint8))
    points = torch.tensor([[-3.5, 2.25]], dtype=torch.float64)
    assert torch.equal(PointKind("moons", 2, ["upper", "lower"]).to_saved(points), points.float())
    assert ImageKind.clip_denoised and not PointKind.clip_denoised


def test_training_pictures_take_the_kinds_number_of_samples():
    assert ImageKind(3, 8).training_count(None, None) == 16 and ImageKind(3, 8).training_count(None, 10) == 20
    assert PointKind("moons", 2, ["upper", "lower"]).training_count(None, 2) == 1000
    assert ImageKind(3, 8).training_count(5, 10) == 5


def test_commands_that_need_images_refuse_points_in_one_line():
    points = PointKind("moons", 2, ["upper", "lower"])
    with pytest.raises(UsageError, match="--sweep ranks by FID or KID, which need images"):
        points.sweep(None, SamplingConfig(), None)
    with pytest.raises(UsageError, match="--compare_checkpoints draws rows of images"):
        points.compare([], SamplingConfig(), None)
