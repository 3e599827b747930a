"""diffusers both ways: export a checkpoint as a `save_pretrained` DDPMPipeline folder, import a UNet2DModel folder.

    python ddpm_main.py --export_diffusers exported/ --model_path models/run/ckpt.pt
    python ddpm_main.py --import_diffusers ddpm-cifar10-32/ --model_path models/ddpm_cifar10_32/ckpt.pt

The tool's UNet is diffusers' UNet2DModel with DownBlock2D / AttnDownBlock2D levels, the sinusoidal time
embedding [sin, cos] with frequencies 10000^(-i / (half - 1)) (flip_sin_to_cos=False, freq_shift=1), a 4x wider
embedding MLP, ResnetBlock2D with "scale_shift" (film=True) or "default" (additive, film=False) time conditioning
and single-projection attention; only the names differ, and the fused qkv 1x1 convolution becomes to_q, to_k,
to_v. A class-conditional model keeps its null label (the last row of class_embedding), so classifier-free
guidance works in diffusers too. Exporting needs diffusers (`pip install "ddpm[diffusers]"`, imported here only);
importing reads config.json and the safetensors (or .bin) weights itself.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ddpm_checkpoint import ModelDescription, build_network, load_model, save_checkpoint
from ddpm_config import UsageError
from ddpm_diffusion import MAX_BETA, linear_beta_range, make_beta_schedule
from ddpm_model import MLP_PRESET, UNet
from ddpm_samplers import VARIANCES

GROUPS = 32  # diffusers' norm_num_groups; ours is gcd(32, channels) per layer
TOOL_FILE = "ddpm_tool.json"  # what diffusers' files do not say: data set, class names, the null label
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The tool's prediction types (the checkpoint's "diffusion" dict; eps when absent) by diffusers' names.
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}  # ours -> DDPMScheduler's

# Our state_dict names -> UNet2DModel's, applied in order (re.sub). Attention's qkv is split separately.
_RENAMES = (
    (r"^time_embed\.1\.", "time_embedding.linear_1."),
    (r"^time_embed\.3\.", "time_embedding.linear_2."),
    (r"^label_embed\.", "class_embedding."),
    (r"^(down|up)_blocks\.(\d+)\.(\d+)\.res\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)_blocks\.(\d+)\.(\d+)\.attn\.", r"\1_blocks.\2.attentions.\3."),
    (r"^downsamples\.(\d+)\.", r"down_blocks.\1.downsamplers.0."),
    (r"^upsamples\.(\d+)\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid_block1\.", "mid_block.resnets.0."),
    (r"^mid_block2\.", "mid_block.resnets.1."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.emb_proj\.1\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
)


def diffusers_key(key: str) -> str:
    """The UNet2DModel name of one of our state_dict keys (for qkv: the name with `qkv` still in it)."""
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def to_diffusers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under UNet2DModel's names: qkv split into to_q, to_k, to_v; 1x1 attention convolutions as Linear."""
    converted = {}
    for key, value in state_dict.items():
        name = diffusers_key(key)
        if ".qkv." in name:
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                converted[name.replace("qkv", part)] = (
                    chunk.flatten(1).contiguous() if chunk.ndim > 1 else chunk.contiguous()
                )
        elif ".to_out.0.weight" in name:
            converted[name] = value.flatten(1).contiguous()
        else:
            converted[name] = value.contiguous()
    return converted


def from_diffusers_state_dict(weights: dict[str, torch.Tensor], model: UNet, source: Path) -> dict[str, torch.Tensor]:
    """UNet2DModel weights as `model`'s state_dict; every tensor must be used and have the shape `model` expects."""
    unused = set(weights)
    state = {}
    for key, expected in model.state_dict().items():
        name = diffusers_key(key)
        names = [name.replace("qkv", part) for part in ("to_q", "to_k", "to_v")] if ".qkv." in name else [name]
        missing = [n for n in names if n not in weights]
        if missing:
            raise UsageError(f"{source} does not match its config.json: no weight {missing[0]}")
        value = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
        if value.numel() != expected.numel():
            raise UsageError(f"{source} does not match its config.json: {names[0]} has shape {tuple(value.shape)}")
        state[key] = value.reshape(expected.shape).to(expected.dtype)
        unused.difference_update(names)
    if unused:
        raise UsageError(f"{source} holds weights this tool's U-Net has no place for, e.g. {sorted(unused)[0]}")
    return state


# ----------------------------------------------------------------------------- configurations


def unet2d_config(model_config: dict) -> dict:
    """UNet2DModel's configuration of one of our UNets (its `config` dict); UsageError for those it cannot express.

    Not exportable: models whose layers would need different GroupNorm group counts (diffusers has one
    norm_num_groups, ours takes gcd(32, channels), so every normalised width must be a multiple of 32: the
    `tiny` preset is not), and multi-head models with attention at levels of different widths (diffusers derives
    the heads of every attention layer from one attention_head_dim).
    """
    if model_config.get("architecture") == MLP_PRESET:
        raise UsageError("an MLP of 2D points has no diffusers counterpart (diffusers exports UNet2DModel)")
    base, mults = model_config["base_dim"], model_config["dim_mults"]
    widths = [base * mult for mult in mults]
    if base % GROUPS or any(width % GROUPS for width in widths):
        raise UsageError(
            f"cannot export: diffusers normalises every layer in {GROUPS} groups, so every width must be a "
            f"multiple of {GROUPS}; this model's widths are {widths} (e.g. the `tiny` preset cannot be exported)"
        )
    size = model_config["image_size"]
    attention = [size // 2**level in model_config["attn_resolutions"] for level in range(len(widths))]
    heads = model_config["num_heads"]
    attention_widths = {width for width, attn in zip(widths, attention) if attn} | {widths[-1]}  # and the middle
    if heads > 1 and len(attention_widths) > 1:
        raise UsageError(
            f"cannot export: {heads}-head attention at widths {sorted(attention_widths)}; diffusers gives every "
            f"attention layer width / attention_head_dim heads, so multi-head attention needs one width"
        )
    num_classes = model_config["num_classes"]
    return {
        "sample_size": size,
        "in_channels": model_config["in_channels"],
        "out_channels": model_config["in_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention],
        "up_block_types": ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": model_config["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if model_config.get("tf_padding", False) else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": model_config["dropout"],
        "act_fn": "silu",
        "attention_head_dim": None if heads == 1 else widths[-1] // heads,
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,
        "norm_eps": model_config.get("norm_eps", 1e-5),
        "resnet_time_scale_shift": "scale_shift" if model_config["film"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None if num_classes is None else num_classes + 1,  # + the null label
    }


# UNet2DModel's defaults, for keys a (older) config.json leaves out.
UNET2D_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
# The settings this tool's network has fixed, with the value it needs.
_REQUIRED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "add_attention": True,
    "class_embed_type": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "time_embedding_dim": None,
    "norm_num_groups": GROUPS,
}


def square_size(size: int | list[int] | tuple[int, ...], refuse: Callable[[str], UsageError]) -> int:
    """UNet2DModel's sample_size as one side of a square image."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise refuse(f"sample_size={list(size)}: only square images")
        size = size[0]
    if not isinstance(size, int):
        raise refuse(f"sample_size={size!r}: an image size is needed")
    return size


def number_of_heads(head_dim: Optional[int], attention_widths: set[int], refuse: Callable[[str], UsageError]) -> int:
    """The attention heads of every attention block (one where head_dim is None), which must be one number."""
    heads = {1} if head_dim is None else {width // head_dim for width in attention_widths}
    if head_dim is not None and (len(heads) > 1 or any(width % head_dim for width in attention_widths)):
        raise refuse(
            f"attention_head_dim={head_dim} gives different numbers of heads at widths {sorted(attention_widths)}"
        )
    return heads.pop()


def unet_config_from_unet2d(config: dict, source: Path) -> dict:
    """Our UNet's keyword arguments for a UNet2DModel configuration; UsageError, in one line, for what it cannot
    express."""

    def refuse(problem: str) -> UsageError:
        return UsageError(f"cannot import {source}: {problem}")

    config = {**UNET2D_DEFAULTS, **config}
    for key, needed in _REQUIRED.items():
        if config[key] != needed:
            raise refuse(f"{key}={config[key]!r} is not supported (this tool's U-Net has {key}={needed!r})")
    widths = list(config["block_out_channels"])
    in_channels, out_channels = config["in_channels"], config["out_channels"]
    if out_channels != in_channels:
        raise refuse(f"out_channels={out_channels} with in_channels={in_channels}: learned variances are not supported")
    base = widths[0]
    if any(width % base for width in widths) or any(width % GROUPS for width in widths):
        raise refuse(f"block_out_channels={widths} must be multiples of the first and of {GROUPS}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    known = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if len(down) != len(widths) or any(block not in known for block in down):
        raise refuse(f"down_block_types={down}: only DownBlock2D and AttnDownBlock2D, one per block_out_channels entry")
    attention = [known[block] for block in down]
    if up != ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)]:
        raise refuse(f"up_block_types={up} must mirror down_block_types={down}")
    size = square_size(config["sample_size"], refuse)
    shift = config["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise refuse(f"resnet_time_scale_shift={shift!r}: only 'default' (additive) and 'scale_shift'")
    if config["attn_norm_num_groups"] not in (None, GROUPS) or (
        shift == "scale_shift" and config["attn_norm_num_groups"] is None
    ):
        raise refuse("the middle block's attention must be normalised in 32 groups (attn_norm_num_groups=32)")
    padding = config["downsample_padding"]
    if padding not in (0, 1):
        raise refuse(f"downsample_padding={padding}: only 0 (TensorFlow's SAME) and 1")
    attention_widths = {width for width, attn in zip(widths, attention) if attn} | {widths[-1]}
    heads = number_of_heads(config["attention_head_dim"], attention_widths, refuse)
    num_class_embeds = config["num_class_embeds"]
    return dict(
        in_channels=in_channels,
        image_size=size,
        base_dim=base,
        dim_mults=[width // base for width in widths],
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=[size // 2**level for level, attn in enumerate(attention) if attn],
        dropout=float(config["dropout"]),
        num_classes=None if num_class_embeds is None else num_class_embeds - 1,
        num_heads=heads,
        film=shift == "scale_shift",
        norm_eps=float(config["norm_eps"]),
        tf_padding=padding == 0,
    )


def scheduler_config(diffusion: dict) -> dict:
    """DDPMScheduler's configuration of a checkpoint's diffusion (its "diffusion" dict): the schedule by name, or as
    trained_betas where ours clips betas at MAX_BETA and diffusers' named schedule would not (linear and sigmoid
    with fewer than 21 steps)."""
    timesteps, schedule = diffusion["timesteps"], diffusion["schedule"]
    beta_start, beta_end = linear_beta_range(timesteps)
    clipped = schedule != "cosine" and beta_end > MAX_BETA
    return {
        "num_train_timesteps": timesteps,
        "beta_schedule": SCHEDULES[schedule],
        "beta_start": beta_start,
        "beta_end": beta_end,
        "trained_betas": make_beta_schedule(schedule, timesteps).tolist() if clipped else None,
        "variance_type": diffusion.get("variance", "fixed_small"),
        "prediction_type": PREDICTION_TYPES[diffusion.get("prediction_type", "eps")],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "thresholding": False,
        # The tool respaces on round(linspace(T - 1, 0, N)); DDPMScheduler then steps from each to the next.
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def diffusion_from_scheduler(config: Optional[dict], source: Path) -> dict:
    """Our "diffusion" dict for a DDPMScheduler configuration (None: DDPMScheduler's defaults)."""
    config = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "trained_betas": None,
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        **(config or {}),
    }
    timesteps = int(config["num_train_timesteps"])
    schedule = {theirs: ours for ours, theirs in SCHEDULES.items()}.get(config["beta_schedule"])
    if config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        matching = [
            name
            for name in SCHEDULES
            if len(betas) == timesteps and torch.allclose(betas, make_beta_schedule(name, timesteps), rtol=1e-6, atol=0)
        ]
        if not matching:
            raise UsageError(
                f"cannot import {source}: its trained_betas are none of this tool's schedules ({', '.join(SCHEDULES)})"
            )
        schedule = matching[0]
    elif schedule is None:
        raise UsageError(
            f"cannot import {source}: beta_schedule={config['beta_schedule']!r}; this tool has "
            f"{', '.join(SCHEDULES.values())}"
        )
    if schedule != "cosine" and config["trained_betas"] is None:
        expected = linear_beta_range(timesteps)
        given = (config["beta_start"], config["beta_end"])
        if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(given, expected)):
            raise UsageError(
                f"cannot import {source}: betas from {given[0]} to {given[1]} over {timesteps} steps; this tool's "
                f"{schedule} schedule runs from {expected[0]:g} to {expected[1]:g}"
            )
    prediction_type = {theirs: ours for ours, theirs in PREDICTION_TYPES.items()}.get(config["prediction_type"])
    if prediction_type is None:
        raise UsageError(
            f"cannot import {source}: prediction_type={config['prediction_type']!r}; this tool has "
            f"{', '.join(PREDICTION_TYPES.values())}"
        )
    variance = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}.get(
        config["variance_type"], config["variance_type"]
    )
    if variance not in VARIANCES:
        raise UsageError(
            f"cannot import {source}: variance_type={config['variance_type']!r}; this tool has {', '.join(VARIANCES)}"
        )
    return {"timesteps": timesteps, "schedule": schedule, "prediction_type": prediction_type, "variance": variance}


# ----------------------------------------------------------------------------- export


def model_card(checkpoint: dict, unet_config: dict, sampler_config: dict, weights: str) -> str:
    """A short README.md for the Hub: what the model is and the lines that sample it."""
    data, conditional = checkpoint["data"], checkpoint["conditional"]
    step = checkpoint.get("train_state", {}).get("step")
    tag = "class-conditional-image-generation" if conditional else "unconditional-image-generation"
    usage = (
        "images = pipeline(batch_size=16).images  # PIL images"
        if not conditional
        else "# DDPMPipeline passes no labels; sample classes with the UNet and the scheduler (see the tool's README)"
    )
    classes = (
        f"\nClasses (index = label; label {len(data['class_names'])} is the null label of classifier-free guidance): "
        f"{', '.join(data['class_names'])}.\n"
        if conditional
        else ""
    )
    trained = f" for {step} steps" if step else ""
    diffusion = checkpoint["diffusion"]
    return f"""---
library_name: diffusers
tags:
- ddpm
- {tag}
---

# DDPM on {data["dataset"]} ({data["channels"]}x{data["image_size"]}x{data["image_size"]})

A denoising diffusion probabilistic model (Ho et al. 2020) trained with the DDPM tool{trained},
exported with `python ddpm_main.py --export_diffusers`: `UNet2DModel` ({weights} weights) and `DDPMScheduler`
({diffusion["timesteps"]} steps, {diffusion["schedule"]} schedule, variance `{sampler_config["variance_type"]}`,
prediction `{sampler_config["prediction_type"]}`, time conditioning `{unet_config["resnet_time_scale_shift"]}`).
{classes}
```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("THIS_FOLDER")
{usage}
```
"""


def export_diffusers(model_path: Path, out_dir: Path, use_ema: bool = True) -> None:
    """Write `out_dir` as DDPMPipeline.save_pretrained does (unet/ with safetensors, scheduler/, model_index.json),
    plus README.md (a model card) and ddpm_tool.json (data set, class names, null label), from a checkpoint."""
    try:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError:
        raise UsageError(
            '--export_diffusers needs diffusers: pip install diffusers (or pip install ".[diffusers]")'
        ) from None
    loaded = load_model(model_path, "cpu", use_ema)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir} exists and is not empty: choose another folder for --export_diffusers")
    checkpoint, use_ema = loaded.checkpoint, loaded.use_ema
    config = unet2d_config(loaded.description.model_config)
    unet = UNet2DModel(**config)
    unet.load_state_dict(to_diffusers_state_dict(loaded.model.state_dict()), strict=True)
    sampler_config = scheduler_config(checkpoint["diffusion"])
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**sampler_config)).save_pretrained(out_dir, safe_serialization=True)
    data = checkpoint["data"]
    (out_dir / "README.md").write_text(model_card(checkpoint, config, sampler_config, "EMA" if use_ema else "raw"))
    (out_dir / TOOL_FILE).write_text(
        json.dumps(
            {
                "dataset": data["dataset"],
                "class_names": data["class_names"],
                "channels": data["channels"],
                "image_size": data["image_size"],
                "null_label": len(data["class_names"]) if checkpoint["conditional"] else None,
                "checkpoint": str(model_path),
                "step": checkpoint.get("train_state", {}).get("step"),
                "weights": "ema" if use_ema else "raw",
            },
            indent=2,
        )
        + "\n"
    )
    print(
        f"wrote {out_dir}: UNet2DModel ({'EMA' if use_ema else 'raw'} weights) and DDPMScheduler; "
        f"load it with DDPMPipeline.from_pretrained({str(out_dir)!r})"
    )


# ----------------------------------------------------------------------------- import


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is not readable JSON ({type(error).__name__})") from None


def _unet_folder(folder: Path) -> Path:
    """The folder holding UNet2DModel's config.json: `folder` itself or its unet/ (a pipeline folder)."""
    if not folder.is_dir():
        raise UsageError(f"diffusers folder not found: {folder}")
    for candidate in (folder / "unet", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise UsageError(f"{folder} is not a diffusers UNet2DModel folder: no config.json in it or in {folder / 'unet'}")


def _scheduler_config(folder: Path) -> Optional[dict]:
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if path.is_file():
            return _read_json(path)
    return None


def read_unet_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """diffusion_pytorch_model.safetensors, or the .bin of older folders (read with weights_only=True)."""
    for name in WEIGHT_FILES:
        path = unet_dir / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(f"{path} is not a readable weights file ({type(error).__name__})") from None
    raise UsageError(f"no weights in {unet_dir}: expected {' or '.join(WEIGHT_FILES)}")


def import_diffusers(folder: Path, out_path: Path, *, dataset: str, variance: Optional[str] = None) -> dict:
    """Convert a diffusers UNet2DModel folder (with its DDPMScheduler config, if any) into a checkpoint of this tool
    at `out_path`; return it. The data set (for --evaluate's reference) and class names come from ddpm_tool.json when
    the folder was exported by this tool, else `dataset`; `variance` overrides the scheduler's variance_type."""
    if out_path.exists():
        raise UsageError(f"{out_path} exists: choose another --model_path for the imported checkpoint")
    unet_dir = _unet_folder(folder)
    config = _read_json(unet_dir / "config.json")
    if config.get("_class_name") != "UNet2DModel":
        raise UsageError(f"{unet_dir / 'config.json'} describes a {config.get('_class_name')!r}, not a UNet2DModel")
    model_config = unet_config_from_unet2d(config, folder)
    tool = _read_json(folder / TOOL_FILE) if (folder / TOOL_FILE).is_file() else {}
    if model_config["num_classes"] is not None and tool.get("null_label") != model_config["num_classes"]:
        raise UsageError(
            f"cannot import {folder}: a class-conditional UNet2DModel needs a null label for classifier-free "
            f"guidance, and only folders exported by this tool ({TOOL_FILE}) say which row is one"
        )
    diffusion = diffusion_from_scheduler(_scheduler_config(folder), folder)
    if variance is not None:
        diffusion["variance"] = variance
    description = ModelDescription(
        model_config=model_config,
        diffusion=diffusion,
        conditional=model_config["num_classes"] is not None,
        data={
            "dataset": tool.get("dataset", dataset),
            "class_names": tool.get("class_names", []),
            "image_size": model_config["image_size"],
            "channels": model_config["in_channels"],
        },
    )
    model = build_network(description)
    state = from_diffusers_state_dict(read_unet_weights(unet_dir), model, unet_dir)
    checkpoint = {
        **description.to_dict(),
        "model_config": model.config,
        # One set of weights (diffusers keeps no separate EMA); stored under both names, which torch.save writes once.
        "model": state,
        "ema": state,
        "source": {"diffusers_folder": str(folder), "weights": tool.get("weights", "as published")},
    }
    save_checkpoint(checkpoint, out_path)
    print(
        f"wrote {out_path}: {sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters from {folder}, "
        f"{diffusion['timesteps']} steps, {diffusion['schedule']} schedule, variance {diffusion['variance']}"
    )
    return checkpoint
