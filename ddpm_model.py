"""The noise-prediction networks: the U-Net of Ho et al. 2020, "Denoising Diffusion Probabilistic Models", and
an MLP for 2D points (`MLPDenoiser`, `--model_size mlp`).

This file is only the network eps_theta(x_t, t, y): it maps a noisy sample, its timestep
and (optionally) a class label to the predicted noise. Diffusion math, data and training
live in the other ddpm_* modules.

Layout (Ho et al., appendix B, CIFAR-10 model), with the channels of the `ddpm` preset:

    x (3x32x32) -> conv_in -> 128x32x32
    encoder   32x32: 2 ResnetBlocks (128)             -> Downsample
              16x16: 2 ResnetBlocks (256) + attention -> Downsample
               8x8 : 2 ResnetBlocks (256)             -> Downsample
               4x4 : 2 ResnetBlocks (256)
    middle     4x4 : ResnetBlock, AttentionBlock, ResnetBlock
    decoder   mirror of the encoder with num_res_blocks + 1 blocks per level, each block
              concatenating one skip saved by the encoder, then Upsample
    out       GroupNorm, SiLU, conv -> 3x32x32 predicted noise

Every ResnetBlock receives the timestep embedding (plus the class embedding when the
model is class-conditional).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESET_IMAGE_SIZE = 32  # the attention resolutions in PRESETS are written for 32x32 images

# Measured with in_channels=3, image_size=32, unconditional (see count_parameters).
# A conditional model adds (num_classes + 1) * 4 * base_dim, e.g. 11 * 512 = 5,632 for
# `ddpm` with 10 classes.
#
#   preset        film=True      film=False
#   tiny            190,947         177,427
#   small         6,949,187       6,472,195
#   ddpm         38,307,203      35,746,307   (Ho et al. report 35.7M)
#   ddpm-large   52,542,979      49,062,787
#   ddpm-ho                      35,746,307   (film=False is its definition)
PRESETS: dict[str, dict] = {
    # For tests and quick experiments.
    "tiny": dict(
        base_dim=16, dim_mults=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, num_heads=1, film=True
    ),
    # A few million parameters: a mid-sized model for MNIST or CIFAR-10.
    "small": dict(
        base_dim=64, dim_mults=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_heads=1, film=True
    ),
    # Ho et al.'s CIFAR-10 network (with FiLM conditioning instead of an added bias).
    "ddpm": dict(
        base_dim=128,
        dim_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_heads=1,
        film=True,
    ),
    # Nichol & Dhariwal 2021 (improved DDPM) CIFAR-10 network: 3 blocks per level,
    # attention at 16x16 and 8x8 with 4 heads, dropout 0.3.
    "ddpm-large": dict(
        base_dim=128,
        dim_mults=(1, 2, 2, 2),
        num_res_blocks=3,
        attn_resolutions=(16, 8),
        dropout=0.3,
        num_heads=4,
        film=True,
    ),
    # Ho et al.'s network exactly as released (google/ddpm-cifar10-32 in diffusers): the time embedding added
    # before the second GroupNorm, GroupNorm eps 1e-6 and TensorFlow's "SAME" padding in the downsampling
    # convolutions. What `--import_diffusers` builds for that model.
    "ddpm-ho": dict(
        base_dim=128,
        dim_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_heads=1,
        film=False,
        norm_eps=1e-6,
        tf_padding=True,
    ),
}


def preset_config(name: str, image_size: int) -> dict:
    """The kwargs of preset `name` (without in_channels, image_size, num_classes), with its
    attention resolutions moved to the same U-Net depth for `image_size`: 16 at 32px
    (one downsampling deep) becomes 14 at 28px, 8 at 16px and 32 at 64px."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[name])
    config["attn_resolutions"] = tuple(image_size // (PRESET_IMAGE_SIZE // res) for res in config["attn_resolutions"])
    return config


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in Ho et al.; fewer (a divisor of `channels`) for narrow layers. Ho et al.'s
    TensorFlow code normalises with eps 1e-6, PyTorch's default is 1e-5."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module`, so a residual branch starts as the identity
    (Ho et al.'s init_scale=0; improved-diffusion's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def add_label_embedding(model: nn.Module, emb: Tensor, labels: Tensor | None) -> Tensor:
    """The time embedding `emb` (B, D) plus the class embedding of `labels` for a conditional model (UNet or
    MLPDenoiser); labels None mean the null label, "no class". Labels given to an unconditional model are an error."""
    if model.num_classes is None:
        if labels is not None:
            raise ValueError("labels were given to an unconditional model (num_classes=None)")
        return emb
    if labels is None:
        labels = torch.full((emb.shape[0],), model.null_label, dtype=torch.long, device=emb.device)
    return emb + model.label_embed(labels)


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal position embedding of the timestep (Vaswani et al. 2017),
    written as in Ho et al.'s get_timestep_embedding: [sin(t * f_i), cos(t * f_i)]."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"timestep embedding dimension must be even, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=1)


class TimestepEmbedding(nn.Sequential):
    """Sinusoidal embedding of t followed by a 2-layer MLP: dim -> emb_dim -> emb_dim."""

    def __init__(self, dim: int, emb_dim: int):
        super().__init__(
            SinusoidalPosEmb(dim),
            nn.Linear(dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection, conditioned on the embedding `emb`.

    film=True: the embedding gives a per-channel scale and shift applied after the second
    GroupNorm, h = norm(h) * (1 + scale) + shift (improved-diffusion's use_scale_shift_norm).
    film=False: the embedding gives a bias added before the second GroupNorm, as in Ho et al.
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, film: bool = True, norm_eps: float = 1e-5
    ):
        super().__init__()
        self.film = film
        self.norm1 = group_norm(in_ch, norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if film else out_ch))
        self.norm2 = group_norm(out_ch, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb)[:, :, None, None]
        if self.film:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int, num_heads: int = 1, norm_eps: float = 1e-5):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {channels} attention channels")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """The 1x1 convolutions are applied as matrix products over the H*W tokens (the same weights): on a
        CPU this is 1.4x faster than convolutions for the block, and it hands scaled_dot_product_attention
        q, k, v with contiguous channels, which its fused (flash) kernels require."""
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, H*W, 3C)
        q, k, v = qkv.view(B, H * W, 3 * self.num_heads, C // self.num_heads).transpose(1, 2).chunk(3, dim=1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C // heads)
        h = F.linear(h.transpose(1, 2).reshape(B, H * W, C), self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class ResAttnBlock(nn.Module):
    """One step of a U-Net level: a ResnetBlock, followed by self-attention if `attn`."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        film: bool,
        attn: bool,
        num_heads: int,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.res = ResnetBlock(in_ch, out_ch, emb_dim, dropout, film, norm_eps)
        self.attn = AttentionBlock(out_ch, num_heads, norm_eps) if attn else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution.

    tf_padding: TensorFlow's "SAME" padding, as in Ho et al.'s code: for even sizes one row and column of
    zeros at the bottom and right only (diffusers' downsample_padding=0), instead of one on every side.
    """

    def __init__(self, channels: int, tf_padding: bool = False):
        super().__init__()
        self.tf_padding = tf_padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if tf_padding else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.tf_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_resolutions(
    image_size: int, dim_mults: tuple[int, ...], attn_resolutions: tuple[int, ...], num_classes: int | None
) -> list[int]:
    """The feature-map size of each U-Net level, after checking that the arguments describe a U-Net."""
    num_levels = len(dim_mults)
    if num_levels == 0:
        raise ValueError("dim_mults must have at least one entry")
    if image_size % 2 ** (num_levels - 1):
        raise ValueError(
            f"image_size {image_size} must be divisible by {2 ** (num_levels - 1)} "
            f"for {num_levels} U-Net levels (dim_mults={tuple(dim_mults)})"
        )
    resolutions = [image_size // 2**level for level in range(num_levels)]
    for res in attn_resolutions:
        if res not in resolutions:
            raise ValueError(
                f"attention resolution {res} is not a feature-map size of this U-Net; choose from {resolutions}"
            )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive or None, got {num_classes}")
    return resolutions


class UNet(nn.Module):
    """Noise predictor eps_theta(x_t, t, y) of Ho et al. 2020, optionally class-conditional.

    With num_classes set, label `num_classes` is the null label ("no class", used for
    classifier-free guidance, Ho & Salimans 2022); forward(x, t) without labels uses it.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        base_dim: int = 128,
        dim_mults: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_classes: int | None = None,
        num_heads: int = 1,
        film: bool = True,
        norm_eps: float = 1e-5,
        tf_padding: bool = False,
    ):
        super().__init__()
        resolutions = level_resolutions(image_size, dim_mults, attn_resolutions, num_classes)

        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            base_dim=base_dim,
            dim_mults=list(dim_mults),
            num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            dropout=dropout,
            num_classes=num_classes,
            num_heads=num_heads,
            film=film,
            norm_eps=norm_eps,
            tf_padding=tf_padding,
        )
        self.in_channels, self.image_size = in_channels, image_size
        self.num_classes = self.null_label = num_classes

        emb_dim = 4 * base_dim
        self.time_embed = TimestepEmbedding(base_dim, emb_dim)
        if num_classes is not None:
            self.label_embed = nn.Embedding(num_classes + 1, emb_dim)  # last row: null label

        def block(in_ch: int, out_ch: int, res: int) -> ResAttnBlock:
            return ResAttnBlock(in_ch, out_ch, emb_dim, dropout, film, res in attn_resolutions, num_heads, norm_eps)

        self.conv_in = nn.Conv2d(in_channels, base_dim, 3, padding=1)

        widths = [base_dim * mult for mult in dim_mults]
        skip_chs = self.build_encoder(block, base_dim, widths, num_res_blocks, resolutions, tf_padding)
        ch = skip_chs[-1]
        self.mid_block1 = ResnetBlock(ch, ch, emb_dim, dropout, film, norm_eps)
        self.mid_attn = AttentionBlock(ch, num_heads, norm_eps)
        self.mid_block2 = ResnetBlock(ch, ch, emb_dim, dropout, film, norm_eps)
        ch = self.build_decoder(block, skip_chs, widths, num_res_blocks, resolutions)
        self.norm_out = group_norm(ch, norm_eps)
        self.conv_out = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))

    def build_encoder(
        self,
        block: Callable,
        base_dim: int,
        widths: list[int],
        num_res_blocks: int,
        resolutions: list[int],
        tf_padding: bool,
    ) -> list[int]:
        """The encoder's levels (`widths` channels each), halving the resolution between them; returns the channels of
        every activation saved for the decoder, in order."""
        self.down_blocks, self.downsamples, skip_chs = nn.ModuleList(), nn.ModuleList(), [base_dim]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(skip_chs[-1], width, resolutions[level]))
                skip_chs.append(width)
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(skip_chs[-1], tf_padding))
                skip_chs.append(skip_chs[-1])
        return skip_chs

    def build_decoder(
        self, block: Callable, skip_chs: list[int], widths: list[int], num_res_blocks: int, resolutions: list[int]
    ) -> int:
        """The decoder: one more block per level than the encoder, so every saved activation (`skip_chs`, consumed
        from the end) is concatenated once; returns its output channels."""
        ch = skip_chs[-1]
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_chs.pop(), widths[level], resolutions[level]))
                ch = widths[level]
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(ch))
        return ch

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the noise in x (B, C, H, W) at integer timesteps t (B,).

        labels (B,) are class indices, `null_label` meaning "no class"; None means
        unconditional (the null label for every example of a conditional model).
        """
        emb = add_label_embedding(self, self.time_embed(t), labels)

        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                hs.append(h)

        h = self.mid_block1(h, emb)
        h = self.mid_attn(h)
        h = self.mid_block2(h, emb)

        for level, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if level < len(self.upsamples):
                h = self.upsamples[level](h)

        return self.conv_out(F.silu(self.norm_out(h)))


MLP_PRESET = "mlp"  # --model_size of MLPDenoiser; its config says architecture "mlp" (network_from_config)


class MLPBlock(nn.Module):
    """A residual MLP block conditioned on the embedding: h + W2 SiLU(W1 LayerNorm(h) + proj(emb))."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, width))
        self.fc2 = zero_module(nn.Linear(width, width))

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb_proj(emb)))


class MLPDenoiser(nn.Module):
    """Noise predictor eps_theta(x_t, t, y) for points x of `dim` coordinates (2D toy data): a linear map to `width`,
    `depth` residual MLPBlocks, a linear map back. Timestep and class embeddings as in the UNet (a sinusoidal
    embedding and an MLP; with num_classes set, label `num_classes` is the null label of classifier-free guidance)."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, num_classes: int | None = None):
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        self.config = dict(architecture=MLP_PRESET, dim=dim, width=width, depth=depth, num_classes=num_classes)
        self.num_classes = self.null_label = num_classes
        self.time_embed = TimestepEmbedding(width, width)
        if num_classes is not None:
            self.label_embed = nn.Embedding(num_classes + 1, width)  # last row: null label
        self.input = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width, width) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.output = zero_module(nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the noise in x (B, dim) at integer timesteps t (B,); labels as for UNet.forward."""
        emb = add_label_embedding(self, self.time_embed(t), labels)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.norm_out(h)))


def network_from_config(config: dict) -> nn.Module:
    """The (untrained) network of a `config` dict (a network's `.config`, as checkpoints store it): an MLPDenoiser
    where it says architecture "mlp", else the UNet."""
    if config.get("architecture") == MLP_PRESET:
        return MLPDenoiser(**{key: value for key, value in config.items() if key != "architecture"})
    return UNet(**config)
