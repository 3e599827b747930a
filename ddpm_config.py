"""Typed configuration of a run, below the command line.

`ddpm_main.py` parses and validates the flags and builds these; everything below it takes them (or
plain keyword arguments), never argparse's Namespace. A checkpoint stores `RunConfig.to_dict()`, a
versioned plain dict, so a resumed run reads back what was asked for and nothing that was found out
at run time (the device, the number of processes: those live in `ddpm_runtime.Runtime`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from ddpm_diffusion import LOSS_TYPES, PREDICTION_TYPES, SCHEDULES
from ddpm_model import MLP_PRESET, PRESETS, preset_config
from ddpm_samplers import DPM3M_STEPS, FEW_STEPS, SAMPLERS, SPACINGS, VARIANCES, sampler_class


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
# Of 2D points: plain conditional sampling measured closest to the data, w > 1 empties the moons' tips (docs/toy.md).
POINT_GUIDANCE_SCALE = 1.0
POINT_DATASETS = (
    "moons",
    "circles",
    "gaussians",
    "swissroll",
)  # 2D toy data, drawn from the seed (ddpm_data.make_points)
DATASETS = ("cifar10", "mnist", "fashion_mnist", "folder", "synthetic", *POINT_DATASETS)
TRAINING_GRID_SAMPLER, TRAINING_GRID_STEPS = "dpm++2m", 20  # see the README's sampler table
INFERENCE_SAMPLES = 64  # --num_samples of --inference and --compare_checkpoints
SAVE_EVERY_MINUTES = (
    30.0  # ckpt.pt is refreshed at least this often, so a preempted multi-day run loses minutes, not hours
)
POINT_SAMPLES = 1000  # samples of a 2D run's training scatter and distance, and of --inference without --num_samples


def option(
    default: Any,
    help: str = "",
    *,
    flag: Optional[str] = None,
    choices: Optional[Sequence] = None,
    optional: bool = False,
    group: Optional[str] = None,
    const: Any = None,
    metavar: Optional[str] = None,
) -> Any:
    """A configuration field declared together with its command-line flag (`config_flags` reads them back, and
    ddpm_main builds the parser and the configuration from them). `flag`: its name where it is not --<field name>;
    `help` and `choices` as argparse's, `help` empty for a field that shares the flag of an earlier one (--amp,
    --variance); `optional`: the flag defaults to None, "not given", and the field then keeps its own default (the
    OBJECTIVE's fields stay None for `with_objective`), a help that names that default writes %(config_default)s;
    `group`: the --help section where it is not the field's configuration's; `const`: the value of the flag given
    without one (--resume); `metavar` as argparse's. A bool field is a switch away from its default (--no_ema for
    use_ema = True); an Optional[bool] a pair --X / --no_X, None when neither is given."""
    metadata = dict(flag=flag, help=help, choices=choices, optional=optional, group=group, const=const, metavar=metavar)
    return field(default=default, metadata={"option": metadata})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("cifar10", "the data set", choices=DATASETS)
    data_dir: str = option("./data", "dataset location (downloads go here); for 'folder', the image folder")
    image_size: Optional[int] = option(None, "resize images to this size (derived: the dataset's own)")
    hflip: Optional[bool] = option(
        None, "random horizontal flips in training (derived: on for cifar10 and synthetic only)"
    )
    channels: Optional[int] = option(
        None,
        "train on grey (1) or RGB (3) images (derived: the data set's own; a folder of grey images is grey)",
        choices=(1, 3),
    )
    val_fraction: float = option(0.1, "share of the training images held out for the validation loss (0: none)")
    data_cache: Optional[str] = option(
        None,
        "folder of the decoded cache of an image folder or zip (ddpm_datacache; derived: .ddpm_cache beside the "
        "folder or zip, else $XDG_CACHE_HOME/ddpm)",
        metavar="DIR",
    )
    use_data_cache: bool = option(
        True, "decode an image folder or zip into memory at every start, no cache", flag="--no_data_cache"
    )


@dataclass(frozen=True)
class ModelConfig:
    """A preset of ddpm_model.PRESETS with explicit overrides laid over it (None: the preset's value), or the MLP of
    2D points (preset "mlp", ddpm_model.MLPDenoiser) with its width and depth."""

    preset: str = option(
        "ddpm",
        f"architecture preset: a U-Net, or {MLP_PRESET} (an MLP, for the 2D data sets {', '.join(POINT_DATASETS)})",
        flag="--model_size",
        choices=sorted(PRESETS) + [MLP_PRESET],
    )
    base_dim: Optional[int] = option(None, "channels of the first level (default: the preset's)")
    dim_mults: Optional[tuple[int, ...]] = option(
        None, "channel multiplier per level, e.g. 1,2,2,2 (default: the preset's)"
    )
    num_res_blocks: Optional[int] = option(None, "residual blocks per level (default: the preset's)")
    attn_resolutions: Optional[tuple[int, ...]] = option(
        None, "feature-map sizes with self-attention, e.g. 16 (default: the preset's)"
    )
    dropout: Optional[float] = option(None, "(default: the preset's)")
    conditional: bool = option(False, "class-conditional model, trained for classifier-free guidance")
    mlp_width: int = option(128, f"--model_size {MLP_PRESET}: hidden units per layer")
    mlp_depth: int = option(3, f"--model_size {MLP_PRESET}: residual blocks")

    def network_config(self, sample_shape: tuple[int, ...], num_classes: Optional[int]) -> dict:
        """The network's keyword arguments (ddpm_model.network_from_config) for samples of `sample_shape`: (C, H, W)
        images or (D,) points."""
        if self.preset == MLP_PRESET:
            return dict(
                architecture=MLP_PRESET,
                dim=sample_shape[0],
                width=self.mlp_width,
                depth=self.mlp_depth,
                num_classes=num_classes,
            )
        return dict(
            in_channels=sample_shape[0],
            image_size=sample_shape[-1],
            num_classes=num_classes,
            **self.unet_kwargs(sample_shape[-1]),
        )

    def unet_kwargs(self, image_size: int) -> dict:
        """The UNet's architecture keyword arguments for `image_size` (without in_channels and num_classes)."""
        kwargs = preset_config(self.preset, image_size)
        for name in ("base_dim", "dim_mults", "num_res_blocks", "attn_resolutions", "dropout"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = option(1000, "diffusion steps T")
    schedule: str = option("linear", "noise schedule of the betas", choices=SCHEDULES)
    loss_type: str = option("l2", "distance of the training loss", choices=LOSS_TYPES)
    # what the network outputs (ddpm_diffusion.Diffusion); None: with_objective
    prediction_type: Optional[str] = option(
        "v",
        "what the network predicts: v (Salimans & Ho 2022), eps (Ho et al.) or x0 (new runs: %(config_default)s, "
        "chosen by scripts/quality_benchmark.py; --resume keeps the run's)",
        choices=PREDICTION_TYPES,
        optional=True,
    )
    # min-SNR-gamma loss weighting (Hang et al. 2023); 0: none (L_simple); None: with_objective
    snr_gamma: Optional[float] = option(
        5.0,
        "min-SNR-gamma loss weighting (Hang et al. 2023); 0: none, Ho et al.'s L_simple (new runs: %(config_default)g; "
        "--resume keeps the run's)",
        optional=True,
    )
    variance: str = option(  # the ancestral sampler's default, recorded in the checkpoint
        "fixed_small",
        "the ddpm sampler's sigma_t^2: fixed_small (posterior) or fixed_large (beta_t, Ho et al.'s CIFAR-10 numbers); "
        "training records it in the checkpoint (default: %(config_default)s), sampling overrides the checkpoint's",
        choices=VARIANCES,
        optional=True,
    )


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a network: the sampler and classifier-free guidance."""

    sampler: str = option(  # the --inference default, by measurement (ddpm_samplers.DPM3M_STEPS)
        "dpm++3m",
        f"(default: %(config_default)s; training grids: {TRAINING_GRID_SAMPLER})",
        choices=SAMPLERS,
        optional=True,
    )
    steps: Optional[int] = (
        option(  # network evaluations; None: the sampler's default (ddpm_samplers.Sampler.default_steps)
            None,
            f"network evaluations (default: {DPM3M_STEPS} for dpm++3m, all timesteps for ddpm, {FEW_STEPS} otherwise; "
            f"training grids: {TRAINING_GRID_STEPS})",
            flag="--sampling_steps",
        )
    )
    eta: float = option(
        0.0,
        "DDIM noise: 0 deterministic, 1 ancestral; only for the samplers that take it (default: %(config_default)s)",
        optional=True,
    )
    timestep_spacing: Optional[str] = option(  # None: the sampler's own (ddpm_samplers.Sampler.default_spacing)
        None,
        "how the steps are spread: time (uniform in t), logsnr (uniform in log-SNR), edm (Karras et al. 2022's noise "
        "levels, rho 7); not for ddpm (default: the sampler's own: "
        + ", ".join(f"{name} {cls.default_spacing}" for name, cls in SAMPLERS.items() if cls.takes_spacing)
        + ")",
        choices=SPACINGS,
    )
    guidance_scale: Optional[float] = option(  # None: the kind of samples' (ddpm_kinds.SampleKind.sampling_settings)
        None,
        f"classifier-free guidance: 0 unconditional, 1 conditional, >1 stronger (default: {GUIDANCE_SCALE:g}; 2D "
        f"points: {POINT_GUIDANCE_SCALE:g})",
    )
    guidance_rescale: float = option(
        0.0, "rescale guided predictions to the conditional one's std, 0 (off) to 1 (Lin et al. 2023)"
    )
    guidance_interval: Optional[tuple[float, float]] = option(
        None,
        "guide only at noise levels LO < sigma_t <= HI, plain conditional elsewhere (Kynkaanniemi et al. 2024)",
        metavar="LO,HI",
    )
    variance: Optional[str] = option(
        None, flag="--variance"
    )  # the ancestral sampler's sigma_t^2; None: the checkpoint's
    guide_model: Optional[str] = (
        option(  # autoguidance's weaker network (ddpm_sampling.load_guide); None: classifier-free guidance
            None,
            "autoguidance (Karras et al. 2024): guide with this weaker model of the same data and diffusion (an "
            "earlier snapshot, a shorter post-hoc EMA, a smaller model) instead of the unconditional branch; also for "
            "unconditional models",
            metavar="CKPT",
        )
    )
    # the network's autocast (as --amp: bf16 on GPUs that support it); the sampler's own arithmetic stays in float32
    amp: str = option("auto", flag="--amp")

    @classmethod
    def for_training_grids(cls, timesteps: int, **flags) -> SamplingConfig:
        """The grids of a training run: a fast sampler unless one is asked for, so that grids cost little of a run."""
        if flags.get("sampler") is None:
            flags["sampler"] = TRAINING_GRID_SAMPLER
            if flags.get("steps") is None:
                flags["steps"] = min(TRAINING_GRID_STEPS, timesteps)
        return cls(**flags)

    def resolved_steps(self, num_timesteps: int) -> int:
        """Network evaluations per image (twice that many batch rows when guidance mixes two branches)."""
        return sampler_class(self.sampler).default_steps(num_timesteps) if self.steps is None else self.steps


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings; each is documented where ddpm_train uses it."""

    run_name: str = option("DDPM", "name of the run: models/<run_name>/, file names in --save_dir", group="run")
    save_dir: str = option("outputs", "where images, loss history and metrics go", group="run")
    models_dir: str = option("models", "checkpoints go to <models_dir>/<run_name>/", group="run")
    seed: int = option(0, "seeds the run and its samples", group="run")
    epochs: int = option(100, "epochs to train")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = option(128, "per process and micro-batch")
    lr: float = option(2e-4, "learning rate")
    p_uncond: float = option(0.1, "probability of training on the null label (--conditional)")
    optimizer: str = option("adamw", "the optimizer", choices=("adamw", "adam", "lion"))
    weight_decay: float = option(0.0, "decoupled weight decay")
    beta1: float = option(0.9, "the optimizer's first beta")
    beta2: float = option(0.999, "the optimizer's second beta")
    warmup_steps: Optional[int] = option(  # None: derived from the planned steps (ddpm_optim.derived_warmup)
        None, "linear learning-rate warm-up (derived: 5%% of the planned steps, at most Ho et al.'s 5000)"
    )
    lr_schedule: str = option("constant", "after the warm-up", choices=("constant", "cosine", "step"))
    grad_clip: float = option(1.0, "clip the gradient norm (0: off)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    ema_decay: Optional[float] = option(  # None: a half-life growing with the run (ddpm_optim.EMA); 0: no EMA
        None,
        "fixed EMA decay with TensorFlow's warm-up, as Ho et al.'s 0.9999 (0: no EMA; derived: an EMA whose half-life "
        "is 5%% of the steps so far, at most 0.9999's, as EDM's ramp-up)",
    )
    phema_every: Optional[int] = (
        option(  # steps between post-hoc EMA snapshots (ddpm_phema); None: snapshot_interval; 0: none
            None,
            "steps between post-hoc EMA snapshots (EDM2's sigma_rel 0.05 and 0.10 profiles, float16) in <run "
            "folder>/phema/, with --save_model (0: none; derived: 20 to 40 per run)",
        )
    )
    # evaluate, sample grids and (sampling) draw with the EMA weights; --no_ema: the raw ones
    use_ema: bool = option(True, "evaluate and sample with the raw weights instead of the EMA", flag="--no_ema")
    amp: str = option(
        "auto",
        "mixed precision of the network, in training and sampling (auto: bf16 on GPUs that support it, else none)",
        choices=("auto", "bf16", "fp16", "none"),
    )
    channels_last: bool = option(False, "channels-last memory format (faster on recent GPUs)")
    compile: bool = option(
        False,
        "torch.compile the network, for training or sampling (faster after a one-off compilation of a minute or more)",
    )
    log_interval: int = option(100, "steps between logged losses")
    eval_every: Optional[int] = option(  # epochs between losses on the whole val/test splits; None: at the end only
        None,
        "epochs between losses on the whole validation and test splits (they are taken every epoch on fixed subsets "
        "that cost under 5%% of the time, and on the whole splits at the end)",
    )
    sample_every: int = option(10, "epochs between sample grids (0: never)")
    num_samples: Optional[int] = option(  # of a training grid; None: 16, or two per class
        None,
        f"images to sample (default: {INFERENCE_SAMPLES}; training grids: 16, or two per class; 2D models: "
        f"{POINT_SAMPLES})",
        group="sampling",
    )
    quality_every: Optional[int] = (
        option(  # None: QualitySchedule's derived interval where the run is long enough; 0: off
            None,
            "images seen between points of the sample quality curve (ddpm_quality; 0: none; derived: at most 10%% of "
            "the time in optimizer steps, off for a run shorter than one interval)",
        )
    )
    quality_samples: int = option(500, "samples per point of the quality curve")
    save_model: bool = option(False, "write checkpoints to <models_dir>/<run_name>/")
    save_every: int = option(10, "epochs between kept snapshots ckpt_epochNNNN.pt")
    save_every_steps: int = option(0, "also refresh ckpt.pt every N steps (0: at epoch ends only)")
    save_every_minutes: Optional[float] = option(  # None: SAVE_EVERY_MINUTES with --save_model
        None,
        f"also refresh ckpt.pt after this many minutes of training since the last one, so that a run stopped without "
        f"warning loses at most that much (0: off; derived: {SAVE_EVERY_MINUTES:g})",
    )
    keep_checkpoints: int = option(3, "how many ckpt_epochNNNN.pt snapshots to keep")
    resume: Optional[str] = option(  # "auto": <models_dir>/<run_name>/ckpt.pt; else a path
        None, "continue a run from <models_dir>/<run_name>/ckpt.pt, or from the given checkpoint", const="auto"
    )
    logger: str = option(  # "tensorboard": also TensorBoard events (ddpm_logging.TensorBoardLog)
        "jsonl",
        "jsonl: the metrics JSON lines only; tensorboard: also TensorBoard events in <save_dir>/tensorboard/<run_name>",
        choices=("jsonl", "tensorboard"),
    )


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


CONFIG_SECTIONS = {section.name: section.default_factory for section in fields(RunConfig)}  # "data": DataConfig, ...


@dataclass(frozen=True)
class ConfigFlag:
    """The command-line flag of one configuration field, as `option` declared it."""

    flag: str  # "--model_size"
    section: str  # the RunConfig field: "model"
    name: str  # the configuration field: "preset"
    kind: Any  # the field's type without Optional: int, float, str, bool, tuple[int, ...], tuple[float, float]
    nullable: bool  # the field's type admits None
    default: Any  # the field's default
    help: str
    choices: Optional[Sequence]
    optional: bool
    group: str  # the --help section: `option`'s group, else the section
    const: Any
    metavar: Optional[str]

    @property
    def dest(self) -> str:
        """The flag's attribute in argparse's Namespace."""
        return self.flag[2:]


def config_flags(section: Optional[str] = None) -> list[ConfigFlag]:
    """The flags of every configuration field (of one `section` of RunConfig, where given), in the order of the
    fields."""
    flags = []
    for name, config_class in CONFIG_SECTIONS.items():
        if section not in (None, name):
            continue
        hints = get_type_hints(config_class)
        for each in fields(config_class):
            declared = each.metadata["option"]
            kind, nullable = hints[each.name], False
            if get_origin(kind) is Union:
                kind, nullable = next(arg for arg in get_args(kind) if arg is not type(None)), True
            flags.append(
                ConfigFlag(
                    flag=declared["flag"] or f"--{each.name}",
                    section=name,
                    name=each.name,
                    kind=kind,
                    nullable=nullable,
                    default=each.default,
                    help=declared["help"],
                    choices=declared["choices"],
                    optional=declared["optional"],
                    group=declared["group"] or name,
                    const=declared["const"],
                    metavar=declared["metavar"],
                )
            )
    return flags


# Settings that define the model, the data or the diffusion: a resumed run must keep them. Named by their flag.
FIXED_ON_RESUME = {
    "dataset": ("data", "dataset"),
    "image_size": ("data", "image_size"),
    "conditional": ("model", "conditional"),
    "timesteps": ("diffusion", "timesteps"),
    "schedule": ("diffusion", "schedule"),
    "loss_type": ("diffusion", "loss_type"),
    "prediction_type": ("diffusion", "prediction_type"),
    "val_fraction": ("data", "val_fraction"),
    "model_size": ("model", "preset"),
    "base_dim": ("model", "base_dim"),
    "dim_mults": ("model", "dim_mults"),
    "num_res_blocks": ("model", "num_res_blocks"),
    "attn_resolutions": ("model", "attn_resolutions"),
    "mlp_width": ("model", "mlp_width"),
    "mlp_depth": ("model", "mlp_depth"),
}


OBJECTIVE = (
    "prediction_type",
    "snr_gamma",
)  # left to a resumed run when not given; DiffusionConfig's defaults for new runs


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
FIRST_DEFAULTS = {
    "prediction_type": "eps",
    "snr_gamma": 0.0,
    "val_fraction": 0.1,
    "mlp_width": ModelConfig.mlp_width,
    "mlp_depth": ModelConfig.mlp_depth,
}


def fixed_settings(saved: dict) -> dict:
    """The FIXED_ON_RESUME settings of a checkpoint's stored configuration, by flag name, from either
    version: version 2 (RunConfig.to_dict) or version 1 (the flat flags of the first versions)."""
    if saved.get("version") == CONFIG_VERSION:
        values = {
            flag: saved[section].get(name, FIRST_DEFAULTS.get(flag))
            for flag, (section, name) in FIXED_ON_RESUME.items()
        }
    else:
        values = {
            flag: saved.get(flag, FIRST_DEFAULTS.get(flag))
            for flag in FIXED_ON_RESUME
            if flag in saved or flag in FIRST_DEFAULTS
        }
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
    image_only = {
        "--image_size": config.data.image_size,
        "--channels": config.data.channels,
        "--hflip": config.data.hflip,
        "--base_dim": model.base_dim,
        "--dim_mults": model.dim_mults,
        "--num_res_blocks": model.num_res_blocks,
        "--attn_resolutions": model.attn_resolutions,
        "--dropout": model.dropout,
        "--channels_last": config.train.channels_last or None,
    }
    given = [flag for flag, value in image_only.items() if value is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)}: image settings, meaningless for the 2D points of --dataset {config.data.dataset}"
        )
