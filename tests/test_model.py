import inspect
import json
import math

import pytest
import torch
from torch import nn

from ddpm_diffusers import to_diffusers_state_dict, unet2d_config
from ddpm_model import PRESETS, AttentionBlock, MLPDenoiser, UNet, count_parameters, network_from_config, preset_config


def tiny(image_size: int = 32, in_channels: int = 3, **overrides) -> UNet:
    config = preset_config("tiny", image_size) | overrides
    return UNet(in_channels=in_channels, image_size=image_size, **config)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the (partly zero) initial weights by small random ones, so every input matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def inputs(batch: int = 2, channels: int = 3, size: int = 32, seed: int = 1):
    """A batch of random images and random timesteps in [0, 1000)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    return x, torch.randint(0, 1000, (batch,), generator=gen)


def diffusers_twin(model: UNet) -> nn.Module:
    """diffusers' UNet2DModel of `model`'s layout holding its weights (ddpm_diffusers' names): the same network written
    independently. diffusers normalises every layer in one number of groups, ours in gcd(32, C); each of its GroupNorms
    is given our count, so that widths below 32 (the tiny preset's 16) compare too."""
    diffusers = pytest.importorskip("diffusers")
    config = model.config
    widths = [config["base_dim"] * mult for mult in config["dim_mults"]]
    # unet2d_config refuses widths that are not multiples of 32: it is given such widths, then ours replace them
    exportable = config | {"base_dim": config["base_dim"] * 32 // math.gcd(32, config["base_dim"])}
    groups = math.gcd(32, *widths)
    heads = config["num_heads"]
    theirs = diffusers.UNet2DModel(
        **unet2d_config(exportable)
        | {
            "block_out_channels": widths,
            "norm_num_groups": groups,
            "attn_norm_num_groups": groups,
            "attention_head_dim": None if heads == 1 else widths[-1] // heads,
        }
    )
    for module in theirs.modules():
        if isinstance(module, nn.GroupNorm):
            module.num_groups = math.gcd(32, module.num_channels)
    theirs.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    return theirs.eval()


def assert_matches_diffusers(
    model: UNet, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """model(x, t, labels) equals diffusers' output to 1e-5 of its largest value; returns it."""
    with torch.no_grad():
        ours = model(x, t, labels)
        expected = diffusers_twin(model)(x, t, class_labels=labels).sample
    assert ours.shape == x.shape
    error = (ours - expected).abs().max().item()
    assert error < 1e-5 * expected.abs().max().item(), error
    return ours


@pytest.mark.parametrize(
    "preset,channels,size,num_classes",
    [
        ("tiny", 3, 32, None),
        ("tiny", 1, 28, None),
        ("tiny", 3, 16, 3),
        ("tiny", 3, 64, None),
        ("small", 3, 32, None),
        ("small", 1, 28, 3),
    ],
)
def test_output_is_diffusers_unet2dmodel_with_the_same_weights(preset, channels, size, num_classes):
    """Every preset at every size gives diffusers' UNet2DModel's output for the same weights, at two timesteps (and, for
    conditional models, a class and the null label), so a block left out, a skip taken in the wrong order, t or the
    label ignored, or the input passed through all fail. The time embedding's weights are 20x the others (as a trained
    network's), so that t moves the output well above the tolerance."""
    config = preset_config(preset, size)
    model = randomize(UNet(in_channels=channels, image_size=size, num_classes=num_classes, **config))
    with torch.no_grad():
        for layer in (model.time_embed[1], model.time_embed[3]):
            layer.weight.mul_(20)
    x, t = inputs(channels=channels, size=size)
    labels = None if num_classes is None else torch.tensor([0, num_classes])
    assert_matches_diffusers(model, x, t, labels)


def test_ddpm_parameter_count_matches_ho_et_al():
    with torch.device("meta"):
        ho = UNet(**PRESETS["ddpm"] | {"film": False})
        film = UNet(**PRESETS["ddpm"])
        conditional = UNet(**PRESETS["ddpm"], num_classes=10)
    assert 35.6e6 < count_parameters(ho) < 35.8e6  # Ho et al. 2020: 35.7M
    assert 38.1e6 < count_parameters(film) < 38.5e6
    assert count_parameters(conditional) - count_parameters(film) == 11 * 512


def test_tiny_preset_is_tiny():
    """The count of the table in ddpm_model's docstring (3x32x32, unconditional, film=True)."""
    assert count_parameters(tiny()) < 1_000_000
    assert count_parameters(tiny()) == 190_947
    assert count_parameters(tiny(film=False)) == 177_427


def test_fresh_model_outputs_zero():
    """The final conv is zero-initialised (Ho et al. init_scale=0), so the untrained output is 0."""
    model = UNet(**preset_config("tiny", 32), num_classes=3)
    x, t = inputs()
    assert torch.equal(model(x, t, torch.tensor([0, 3])), torch.zeros_like(x))


@torch.no_grad()
def test_timestep_changes_output():
    """t reaches the network through the time embedding and only through it. With time-embedding weights of std 1 (the
    size a trained network's reach; randomize's 0.05 leaves t a 0.1% effect), t = 0 and t = 500 move the output by
    more than 5% of its mean magnitude (12% measured); the same t gives the same output; the output at t = 0 with the
    embedding of t = 500 put in its place is the output at t = 500; and with the embedding zeroed, t changes nothing."""
    model = randomize(tiny())
    for layer in (model.time_embed[1], model.time_embed[3]):
        layer.weight.mul_(20)
        layer.bias.mul_(20)
    x, _ = inputs()
    at = lambda step: model(x, torch.full((2,), step))  # noqa: E731
    early, late = at(0), at(500)
    assert not torch.allclose(early, late)
    assert (early - late).abs().mean() > 0.05 * late.abs().mean()
    assert torch.equal(at(500), late)

    embedding_of_500 = model.time_embed(torch.full((2,), 500))
    swap = model.time_embed.register_forward_hook(
        lambda module, args, output: embedding_of_500
    )  # the network's only view of t
    assert torch.equal(at(0), late)
    swap.remove()

    model.time_embed[3].weight.zero_()
    model.time_embed[3].bias.zero_()
    assert torch.equal(at(0), at(500))


def test_sinusoidal_embedding_is_ho_et_al_get_timestep_embedding():
    """[sin(t f_i), cos(t f_i)] with f_i = 10000^(-i / (half - 1)), i < half (Ho et al.'s nn.get_timestep_embedding)."""
    from ddpm_model import SinusoidalPosEmb

    t = torch.tensor([0, 1, 37, 999])
    half = 8
    frequencies = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / (half - 1))
    angles = t.double()[:, None] * frequencies
    expected = torch.cat([angles.sin(), angles.cos()], dim=1).float()
    torch.testing.assert_close(SinusoidalPosEmb(2 * half)(t), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="even"):
        SinusoidalPosEmb(7)


@torch.no_grad()
def test_labels_change_output_and_null_label_is_distinct():
    model = randomize(tiny(num_classes=3))
    x, t = inputs()
    null = model(x, t, torch.full((2,), model.null_label))
    outputs = [model(x, t, torch.full((2,), y)) for y in range(3)]
    assert model.null_label == model.num_classes == 3
    assert not torch.allclose(outputs[0], outputs[1])
    for out in outputs:
        assert not torch.allclose(out, null)
    assert torch.equal(model(x, t), null)


def test_labels_on_unconditional_model_raise():
    model = tiny()
    assert model.num_classes is None and model.null_label is None
    x, t = inputs()
    with pytest.raises(ValueError):
        model(x, t, torch.zeros(2, dtype=torch.long))


@torch.no_grad()
def test_config_round_trip_rebuilds_identical_model():
    # Every kwarg differs from its default, so a key missing from config changes the model.
    model = randomize(
        UNet(
            in_channels=1,
            image_size=28,
            base_dim=16,
            dim_mults=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(14,),
            dropout=0.2,
            num_classes=10,
            num_heads=2,
            film=False,
        )
    )
    assert set(model.config) == set(inspect.signature(UNet).parameters)
    config = json.loads(json.dumps(model.config))  # checkpoints may store it as plain JSON
    rebuilt = UNet(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    assert (rebuilt.in_channels, rebuilt.image_size, rebuilt.num_classes) == (1, 28, 10)
    x, t = inputs(channels=1, size=28)
    labels = torch.tensor([2, 10])
    assert torch.equal(rebuilt(x, t, labels), model(x, t, labels))


def test_invalid_image_size_raises():
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=30, dim_mults=(1, 2, 2, 2), attn_resolutions=())


def test_absent_attention_resolution_raises():
    with pytest.raises(ValueError, match="attention resolution"):
        UNet(image_size=32, dim_mults=(1, 2), attn_resolutions=(8,))


@torch.no_grad()
def test_channels_last_matches_contiguous():
    model = randomize(tiny())
    x, t = inputs()
    expected = model(x, t)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t), expected, atol=1e-5, rtol=0)
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_examples_are_independent_in_a_batch():
    """Catches normalisation or attention that mixes examples of the batch."""
    model = randomize(tiny(num_classes=3))
    x, t = inputs(batch=3)
    labels = torch.tensor([0, 1, 3])
    batched = model(x, t, labels)
    for i in range(3):
        torch.testing.assert_close(
            model(x[i : i + 1], t[i : i + 1], labels[i : i + 1]), batched[i : i + 1], atol=1e-5, rtol=0
        )


def test_multi_head_attention_is_diffusers_with_the_same_heads():
    """With 4 heads the whole network gives diffusers' output (its attention_head_dim = width / 4: heads are
    consecutive channel groups of q, k and v), so a wrong head split or num_heads not reaching every attention layer
    fails. The q, k, v weights are 30x the others (and proj_out's 3x), so that attention is far from uniform (with
    small q and k, every head averages the same values and any split gives one output): the same weights with one
    head then move the output by 1.7% of its largest value (measured)."""
    model = randomize(tiny(num_heads=4))
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, AttentionBlock)):
            block.qkv.weight.mul_(30)
            block.proj_out.weight.mul_(3)
    x, t = inputs()
    four_heads = assert_matches_diffusers(model, x, t)
    one_head = tiny(num_heads=1).eval()
    one_head.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (one_head(x, t) - four_heads).abs().max() > 5e-3 * four_heads.abs().max()


@pytest.mark.parametrize("num_heads", [1, 4])
@torch.no_grad()
def test_attention_block_is_textbook_multi_head_attention(num_heads):
    """softmax(q k^T / sqrt(d)) v per head, with the qkv channels split [q heads | k heads | v heads]
    (the layout of the 1x1-convolution version, so its checkpoints keep their meaning)."""
    block = randomize(AttentionBlock(64, num_heads))
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    qkv = nn.functional.conv2d(block.norm(x), block.qkv.weight, block.qkv.bias).flatten(2)  # (B, 3C, HW)
    q, k, v = qkv.view(2, 3, num_heads, 64 // num_heads, 64).unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / (64 // num_heads) ** 0.5, dim=-1)
    h = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(2, 64, 8, 8)
    expected = x + nn.functional.conv2d(h, block.proj_out.weight, block.proj_out.bias)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_preset_config_moves_attention_to_the_same_depth():
    assert preset_config("ddpm", 32)["attn_resolutions"] == (16,)
    assert preset_config("ddpm", 64)["attn_resolutions"] == (32,)
    assert preset_config("tiny", 28)["attn_resolutions"] == (14,)
    assert preset_config("small", 16)["attn_resolutions"] == (8,)
    assert preset_config("ddpm-large", 64)["attn_resolutions"] == (32, 16)
    assert PRESETS["tiny"]["attn_resolutions"] == (16,)  # the preset itself is untouched
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("huge", 32)


def test_ddpm_ho_preset_is_ho_et_al_exactly():
    """Additive time embedding (35,746,307 parameters, Ho et al.'s 35.7M), GroupNorm eps 1e-6 everywhere, TF padding."""
    model = UNet(**preset_config("ddpm-ho", 32))
    assert count_parameters(model) == 35_746_307
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(norm.eps == 1e-6 for norm in norms)
    assert all(block.tf_padding for block in model.downsamples)


def test_tf_padding_pads_only_bottom_and_right():
    """TensorFlow's SAME padding for a stride-2 3x3 convolution of an even size: one row and column of zeros at the
    bottom and right. Output pixel (0, 0) then sees input rows and columns 0-2, not -1..1."""
    from ddpm_model import Downsample

    tf, symmetric = Downsample(4, tf_padding=True), Downsample(4)
    symmetric.load_state_dict(tf.state_dict())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x[:, :, :3, :3], tf.conv.weight, tf.conv.bias)[0, :, 0, 0]
        assert torch.allclose(tf(x)[0, :, 0, 0], expected, atol=1e-6)
        assert tf(x).shape == symmetric(x).shape == (1, 4, 4, 4)
        assert not torch.allclose(tf(x), symmetric(x))


def test_norm_eps_and_tf_padding_keep_the_state_dict_layout():
    plain, ho = tiny(), tiny(norm_eps=1e-6, tf_padding=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ho.state_dict().items()}
    assert ho.config["norm_eps"] == 1e-6 and ho.config["tf_padding"] is True


def test_the_mlp_takes_points_and_the_null_label_like_the_unet():
    torch.manual_seed(0)
    model = MLPDenoiser(dim=2, width=32, depth=2, num_classes=3)
    with torch.no_grad():  # the last layers start at zero: perturbed so that the labels show in the output
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x, t = torch.randn(5, 2), torch.randint(0, 1000, (5,))
    assert model(x, t, torch.zeros(5, dtype=torch.long)).shape == (5, 2)
    assert model.null_label == 3
    assert torch.equal(model(x, t), model(x, t, torch.full((5,), 3)))
    assert not torch.allclose(model(x, t, torch.zeros(5, dtype=torch.long)), model(x, t))
    rebuilt = network_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert type(rebuilt) is MLPDenoiser and torch.equal(rebuilt(x, t), model(x, t))
    with pytest.raises(ValueError):
        MLPDenoiser(num_classes=None)(x, t, torch.zeros(5, dtype=torch.long))
