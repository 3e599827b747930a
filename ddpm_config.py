"""Typed configuration of a run, below the command line.

`ddpm_main.py` parses and validates the flags and builds these; everything below it takes them (or
plain keyword arguments), never argparse's Namespace. A checkpoint stores `RunConfig.to_dict()`, a
versioned plain dict, so a resumed run reads back what was asked for and nothing that was found out
at run time (the device, the number of processes: those live in `ddpm_runtime.Runtime`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from ddpm_model import MLP_PRESET, preset_config
from ddpm_samplers import default_steps


class UsageError(Exception):
    """Bad input the user can fix. The CLI prints str(e) as one line on stderr and exits with code 2."""


def first_line(error: BaseException) -> str:
    """An exception as one line (its type and the first line of its message), for a UsageError that names its cause."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


CONFIG_VERSION = 2  # 1: the flat vars(args) of the first versions, with run-time facts mixed in


# Classifier-free guidance of images unless told: on real digits w = 1.5 kept every class right at a third of w = 3's
# Frechet distance (docs/after_training.md#measured-on-real-digits); stronger guidance trades diversity for typicality.
GUIDANCE_SCALE = 1.5
POINT_GUIDANCE_SCALE = 1.0  # of 2D points: plain conditional sampling measured closest to the data, w > 1 empties the moons' tips (docs/toy.md)
POINT_DATASETS = ("moons", "circles", "gaussians", "swissroll")  # 2D toy data, drawn from the seed (ddpm_data.make_points)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"
    data_dir: str = "./data"
    image_size: Optional[int] = None  # None: the data set's own size
    hflip: Optional[bool] = None  # random left-right flips in training; None: the data set's default
    channels: Optional[int] = None  # 1 or 3; None: the data set's own
    val_fraction: float = 0.1  # of the training images, held out for the validation loss
    data_cache: Optional[str] = None  # folder of a folder's or zip's decoded cache (ddpm_datacache); None: beside the data
    use_data_cache: bool = True  # False: decode a folder or zip into memory at every start


@dataclass(frozen=True)
class ModelConfig:
    """A preset of ddpm_model.PRESETS with explicit overrides laid over it (None: the preset's value), or the MLP of
    2D points (preset "mlp", ddpm_model.MLPDenoiser) with its width and depth."""

    preset: str = "ddpm"
    base_dim: Optional[int] = None
    dim_mults: Optional[tuple[int, ...]] = None
    num_res_blocks: Optional[int] = None
    attn_resolutions: Optional[tuple[int, ...]] = None
    dropout: Optional[float] = None
    conditional: bool = False
    mlp_width: int = 128
    mlp_depth: int = 3

    def network_config(self, sample_shape: tuple[int, ...], num_classes: Optional[int]) -> dict:
        """The network's keyword arguments (ddpm_model.network_from_config) for samples of `sample_shape`: (C, H, W)
        images or (D,) points."""
        if self.preset == MLP_PRESET:
            return dict(architecture=MLP_PRESET, dim=sample_shape[0], width=self.mlp_width, depth=self.mlp_depth, num_classes=num_classes)
        return dict(in_channels=sample_shape[0], image_size=sample_shape[-1], num_classes=num_classes, **self.unet_kwargs(sample_shape[-1]))

    def unet_kwargs(self, image_size: int) -> dict:
        """The UNet's architecture keyword arguments for `image_size` (without in_channels and num_classes)."""
        kwargs = preset_config(self.preset, image_size)
        for name in ("base_dim", "dim_mults", "num_res_blocks", "attn_resolutions", "dropout"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"
    loss_type: str = "l2"
    prediction_type: Optional[str] = "v"  # what the network outputs: eps, v or x0 (ddpm_diffusion.Diffusion); None: with_objective
    snr_gamma: Optional[float] = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0: none (L_simple); None: with_objective
    variance: str = "fixed_small"  # the ancestral sampler's default, recorded in the checkpoint


TRAINING_GRID_SAMPLER, TRAINING_GRID_STEPS = "dpm++2m", 20  # see the README's sampler table
INFERENCE_SAMPLES = 64  # --num_samples of --inference and --compare_checkpoints


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a network: the sampler and classifier-free guidance."""

    sampler: str = "ddpm"
    steps: Optional[int] = None  # network evaluations; None: all T for ddpm, 50 otherwise
    eta: float = 0.0  # DDIM's noise
    guidance_scale: Optional[float] = None  # None: derived from the kind of samples (derived)
    guidance_rescale: float = 0.0
    guidance_interval: Optional[tuple[float, float]] = None
    variance: Optional[str] = None  # the ancestral sampler's sigma_t^2; None: the checkpoint's
    guide_model: Optional[str] = None  # autoguidance's weaker network (ddpm_sampling.load_guide); None: classifier-free guidance
    amp: str = "auto"  # the network's autocast (as --amp: bf16 on GPUs that support it); the sampler's own arithmetic stays in float32

    @classmethod
    def for_training_grids(cls, timesteps: int, **flags) -> SamplingConfig:
        """The grids of a training run: a fast sampler unless one is asked for, so that grids cost little of a run."""
        if flags.get("sampler") is None:
            flags["sampler"] = TRAINING_GRID_SAMPLER
            if flags.get("steps") is None:
                flags["steps"] = min(TRAINING_GRID_STEPS, timesteps)
        return cls(**flags)

    def derived(self, points: bool) -> SamplingConfig:
        """The settings with the guidance scale of the samples' kind where none was given: GUIDANCE_SCALE for images,
        POINT_GUIDANCE_SCALE for 2D points."""
        if self.guidance_scale is not None:
            return self
        return replace(self, guidance_scale=POINT_GUIDANCE_SCALE if points else GUIDANCE_SCALE)

    def resolved_steps(self, num_timesteps: int) -> int:
        """Network evaluations per image (twice that many batch rows when guidance mixes two branches)."""
        return default_steps(self.sampler, num_timesteps) if self.steps is None else self.steps


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings; each is documented where ddpm_train uses it."""

    run_name: str = "DDPM"
    save_dir: str = "outputs"
    models_dir: str = "models"
    seed: int = 0
    epochs: int = 100
    max_steps: Optional[int] = None
    batch_size: int = 128
    lr: float = 2e-4
    p_uncond: float = 0.1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: Optional[int] = None  # None: derived from the planned steps (ddpm_train.derived_warmup)
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: Optional[float] = None  # None: a half-life growing with the run (ddpm_train.EMA); 0: no EMA
    phema_every: Optional[int] = None  # steps between post-hoc EMA snapshots (ddpm_phema); None: snapshot_interval; 0: none
    use_ema: bool = True  # evaluate, sample grids and (sampling) draw with the EMA weights; --no_ema: the raw ones
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    log_interval: int = 100
    eval_every: Optional[int] = None  # epochs between losses on the whole val/test splits; None: at the end only
    sample_every: int = 10
    num_samples: Optional[int] = None  # of a training grid; None: 16, or two per class
    save_model: bool = False
    save_every: int = 10
    save_every_steps: int = 0
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # "auto": <models_dir>/<run_name>/ckpt.pt; else a path
    logger: str = "jsonl"  # "tensorboard": also TensorBoard events (ddpm_train.TensorBoardLog)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run was asked to do."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict:
        """A plain, versioned dict (tuples become lists), as checkpoints store it."""
        return {"version": CONFIG_VERSION, **asdict(self)}


# Settings that define the model, the data or the diffusion: a resumed run must keep them. Named by their flag.
FIXED_ON_RESUME = {
    "dataset": ("data", "dataset"), "image_size": ("data", "image_size"), "conditional": ("model", "conditional"),
    "timesteps": ("diffusion", "timesteps"), "schedule": ("diffusion", "schedule"), "loss_type": ("diffusion", "loss_type"),
    "prediction_type": ("diffusion", "prediction_type"), "val_fraction": ("data", "val_fraction"),
    "model_size": ("model", "preset"), "base_dim": ("model", "base_dim"), "dim_mults": ("model", "dim_mults"),
    "num_res_blocks": ("model", "num_res_blocks"), "attn_resolutions": ("model", "attn_resolutions"),
    "mlp_width": ("model", "mlp_width"), "mlp_depth": ("model", "mlp_depth"),
}


OBJECTIVE = ("prediction_type", "snr_gamma")  # left to a resumed run when not given; DiffusionConfig's defaults for new runs


def with_objective(config: RunConfig, resumed: Optional[dict]) -> RunConfig:
    """The training objective not given on the command line (None): a resumed run's own (`resumed`: its stored
    configuration, of either version), else DiffusionConfig's defaults (chosen by scripts/quality_benchmark.py).
    Checkpoints of the first version trained Ho et al.'s L_simple (FIRST_DEFAULTS)."""
    chosen = {}
    for name in OBJECTIVE:
        given = getattr(config.diffusion, name)
        if given is not None:
            chosen[name] = given
        elif resumed is None:
            chosen[name] = getattr(DiffusionConfig, name)
        elif resumed.get("version") == CONFIG_VERSION:
            chosen[name] = resumed["diffusion"].get(name, FIRST_DEFAULTS[name])
        else:
            chosen[name] = FIRST_DEFAULTS[name]
    return replace(config, diffusion=replace(config.diffusion, **chosen))


# What settings added after a checkpoint was written meant then.
FIRST_DEFAULTS = {"prediction_type": "eps", "snr_gamma": 0.0, "val_fraction": 0.1, "mlp_width": ModelConfig.mlp_width,
                  "mlp_depth": ModelConfig.mlp_depth}


def fixed_settings(saved: dict) -> dict:
    """The FIXED_ON_RESUME settings of a checkpoint's stored configuration, by flag name, from either
    version: version 2 (RunConfig.to_dict) or version 1 (the flat flags of the first versions)."""
    if saved.get("version") == CONFIG_VERSION:
        values = {flag: saved[section].get(name, FIRST_DEFAULTS.get(flag)) for flag, (section, name) in FIXED_ON_RESUME.items()}
    else:
        values = {flag: saved.get(flag, FIRST_DEFAULTS.get(flag)) for flag in FIXED_ON_RESUME if flag in saved or flag in FIRST_DEFAULTS}
    return {flag: tuple(value) if isinstance(value, list) else value for flag, value in values.items()}


def current_settings(config: RunConfig) -> dict:
    """The FIXED_ON_RESUME settings of `config`, by flag name; those left to the resumed run (None) are not compared."""
    values = {flag: getattr(getattr(config, section), name) for flag, (section, name) in FIXED_ON_RESUME.items()}
    return {flag: value for flag, value in values.items() if value is not None or flag not in OBJECTIVE}


def check_model_fits_data(config: RunConfig) -> None:
    """The MLP takes 2D points (POINT_DATASETS) and the UNet images; image-only settings are refused for points."""
    points, model = config.data.dataset in POINT_DATASETS, config.model
    if points != (model.preset == MLP_PRESET):
        wanted = f"--model_size {MLP_PRESET}" if points else "an image model (--model_size tiny, small, ddpm, ...)"
        raise UsageError(f"--dataset {config.data.dataset} needs {wanted}, not --model_size {model.preset}")
    if not points:
        return
    image_only = {"--image_size": config.data.image_size, "--channels": config.data.channels, "--hflip": config.data.hflip,
                  "--base_dim": model.base_dim, "--dim_mults": model.dim_mults, "--num_res_blocks": model.num_res_blocks,
                  "--attn_resolutions": model.attn_resolutions, "--dropout": model.dropout,
                  "--channels_last": config.train.channels_last or None}
    given = [flag for flag, value in image_only.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: image settings, meaningless for the 2D points of --dataset {config.data.dataset}")
