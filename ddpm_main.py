"""Command line of the DDPM tool: train (default) or sample (--inference). No model math here.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64

Bad input ends with one line on stderr and exit code 2, before anything is written.
"""

import argparse
import math
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ddpm_checkpoint import RunLock, load_model, load_resume_checkpoint
from ddpm_config import (
    CONFIG_SECTIONS,
    OBJECTIVE,
    ConfigFlag,
    RunConfig,
    SamplingConfig,
    UsageError,
    check_model_fits_data,
    config_flags,
    with_objective,
)
from ddpm_data import load_datasets
from ddpm_diffusers import export_diffusers, import_diffusers
from ddpm_evaluate import run_evaluation
from ddpm_kinds import kind_of_model
from ddpm_metrics import FEATURE_EXTRACTORS
from ddpm_model import network_from_config
from ddpm_phema import write_posthoc_ema
from ddpm_runtime import Runtime, enable_tf32, setup_runtime
from ddpm_samplers import SAMPLERS, sampler_class
from ddpm_sampling import run_inference
from ddpm_sweep import best_preset, parse_samplers

# Under torchrun the other ranks wait in a collective while rank 0 alone computes FID statistics
# (the training set's, once, then each sample set's): far longer than a sampling step.
SAMPLING_COLLECTIVE_TIMEOUT = timedelta(hours=2)


def comma_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class DefaultsHelp(argparse.HelpFormatter):
    """Help lines end with the flag's default where it has a value; a flag whose value is derived says so itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
        if shown and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text.strip()


# The --help sections, in order: the configuration's (ddpm_config.CONFIG_SECTIONS, and an option's own group) and the
# modes'.
GROUPS = {
    "run": "mode and run",
    "data": "data",
    "model": "model (a preset, then overrides)",
    "diffusion": "diffusion",
    "train": "training",
    "sampling": "sampling",
    "evaluation": "evaluation (see ddpm_evaluate.py)",
}
FLAG_TYPES = {int: int, float: float, tuple[int, ...]: comma_ints}  # else the text, parsed into its field by run_config


def add_config_flag(group: argparse._ArgumentGroup, option: ConfigFlag) -> None:
    """The flag of one configuration field, its name, default, help and choices from its declaration
    (ddpm_config.option)."""
    if option.kind is bool and option.nullable:
        pair = group.add_mutually_exclusive_group()
        pair.add_argument(
            option.flag, dest=option.dest, action="store_const", const=True, default=None, help=option.help
        )
        pair.add_argument(
            f"--no_{option.dest}",
            dest=option.dest,
            action="store_const",
            const=False,
            help=f"the opposite of {option.flag}",
        )
        return
    if option.kind is bool:
        action = group.add_argument(option.flag, action="store_true", help=option.help)
    else:
        extra = {"nargs": "?", "const": option.const} if option.const is not None else {}
        action = group.add_argument(
            option.flag,
            type=FLAG_TYPES.get(option.kind),
            default=None if option.optional else option.default,
            choices=option.choices,
            metavar=option.metavar,
            help=option.help,
            **extra,
        )
    action.config_default = (
        option.default
    )  # for a help that names the default of a flag given as None (%(config_default)s)


def add_config_flags(groups: dict[str, argparse._ArgumentGroup]) -> None:
    """Every configuration field's flag, once (a flag that two fields share is declared by the first)."""
    added = set()
    for option in config_flags():
        if option.flag not in added:
            add_config_flag(groups[option.group], option)
            added.add(option.flag)


def build_parser() -> argparse.ArgumentParser:
    """The flags of the configuration (ddpm_config's dataclasses, their one home) and of the modes."""
    parser = argparse.ArgumentParser(
        description="Train a DDPM (Ho et al. 2020) or sample from one, with classifier-free guidance.",
        formatter_class=DefaultsHelp,
    )
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    mode = groups["run"]
    mode.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    mode.add_argument(
        "--export_diffusers",
        default=None,
        metavar="OUT_DIR",
        help="write --model_path as a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler, safetensors)",
    )
    mode.add_argument(
        "--import_diffusers",
        default=None,
        metavar="FOLDER",
        help="convert a diffusers UNet2DModel folder (e.g. google/ddpm-cifar10-32) into the checkpoint --model_path",
    )
    mode.add_argument(
        "--posthoc_ema",
        default=None,
        metavar="SIGMA_RELS",
        help="reconstruct the EMA of these lengths (e.g. 0.05,0.1,0.15) from --model_path's run's snapshots, as "
        "posthoc_ema_<sigma_rel>.safetensors beside it (Karras et al. 2024, EDM2)",
    )
    mode.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (derived: cuda when available)")
    mode.add_argument("--no_cuda", action="store_true", help="run on the CPU even when a GPU is present")
    mode.add_argument(
        "--no_tf32", action="store_true", help="keep float32 matmuls in full precision on CUDA (TF32 is on by default)"
    )
    add_config_flags(groups)

    sampling = groups["sampling"]
    sampling.add_argument(
        "--model_path", default=None, help="checkpoint to sample from (default: <models_dir>/<run_name>/ckpt.pt)"
    )
    sampling.add_argument(
        "--sample_classes", default=None, help='classes to sample, as indices or names: "0,1,2" or "cat,dog"'
    )
    sampling.add_argument(
        "--sampling_preset",
        default=None,
        choices=("best",),
        help="with --inference: the weights, sampler, steps and guidance that --evaluate --sweep found best for "
        "--model_path (refused with --sampler, --sampling_steps, --guidance_scale or --guide_model)",
    )
    add_evaluation_flags(groups["evaluation"])
    return parser


def add_evaluation_flags(evaluation: argparse._ArgumentGroup) -> None:
    evaluation.add_argument(
        "--evaluate",
        action="store_true",
        help="sample --fid_num_samples images from --model_path and report FID, IS, class consistency",
    )
    evaluation.add_argument(
        "--fid_num_samples", type=int, default=10000, help="samples for --evaluate (published CIFAR-10 FIDs use 50000)"
    )
    evaluation.add_argument(
        "--fid_features",
        default="inception",
        choices=sorted(FEATURE_EXTRACTORS),
        help="inception: the standard FID network; random-conv: fixed random features for tests, not comparable to "
        "published FID",
    )
    evaluation.add_argument(
        "--fid_ref",
        default=None,
        metavar="NPZ",
        help="reference statistics mu, sigma (pytorch-fid --save-stats) instead of the training set's",
    )
    evaluation.add_argument(
        "--save_pngs", action="store_true", help="with --evaluate: also write every sample as samples/NNNNN.png"
    )
    evaluation.add_argument(
        "--guidance_sweep",
        default=None,
        metavar="W1,W2,...",
        help="with --evaluate: one evaluation per guidance scale, a table, a plot and per-class grids",
    )
    evaluation.add_argument(
        "--compare_checkpoints",
        nargs="+",
        default=None,
        metavar="CKPT",
        help="sample the same noise from these checkpoints of one run into one image, one row per training step",
    )
    evaluation.add_argument(
        "--no_judge",
        action="store_true",
        help="with --evaluate and --compare_checkpoints: no judge (a classifier trained once "
        "on the data set, cached in --data_dir; see ddpm_judge.py)",
    )

    add_sweep_flags(evaluation)


def add_sweep_flags(evaluation: argparse._ArgumentGroup) -> None:
    """The flags of --evaluate --sweep (ddpm_sweep)."""
    evaluation.add_argument(
        "--sweep",
        action="store_true",
        help="with --evaluate: every combination of --sweep_ema, guidance kind (classifier-free; autoguidance with "
        "--guide_model), --guidance_sweep scales and --sweep_samplers, ranked by FID "
        "(without the Inception weights: the judge's distance, else KID); resumable; "
        "the best goes to <run folder>/sampling_best.json",
    )
    evaluation.add_argument(
        "--sweep_ema",
        default=None,
        metavar="SIGMA_RELS",
        help="with --sweep: post-hoc EMA lengths to try besides the checkpoint's own EMA, e.g. 0.05,0.1,0.15",
    )
    evaluation.add_argument(
        "--sweep_samplers",
        default=None,
        metavar="SAMPLER:STEPS,...",
        help="with --sweep: solvers and steps to try, e.g. dpm++2m:20,dpm++3m:10 (default: --sampler and "
        "--sampling_steps)",
    )


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values with one line, before any file is touched."""
    positive = ["batch_size", "epochs", "timesteps", "log_interval", "grad_accum", "mlp_width", "mlp_depth"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in (
        "num_samples",
        "max_steps",
        "sampling_steps",
        "image_size",
        "base_dim",
        "num_res_blocks",
        "eval_every",
    ):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.timesteps < 10:
        raise UsageError(f"--timesteps must be at least 10, got {args.timesteps}")
    if args.sampling_steps is not None and args.sampling_steps > args.timesteps and not sampling_mode(args):
        raise UsageError(f"--sampling_steps ({args.sampling_steps}) cannot exceed --timesteps ({args.timesteps})")
    for name in ("guidance_scale", "lr", "eta"):
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            raise UsageError(f"--{name} must be a finite number, got {getattr(args, name)}")
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma >= 0):
        raise UsageError(f"--snr_gamma must be 0 (off) or positive, got {args.snr_gamma}")
    if not 0.0 <= args.p_uncond <= 1.0:
        raise UsageError(f"--p_uncond must be between 0 and 1, got {args.p_uncond}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UsageError(f"--eta must be between 0 and 1, got {args.eta}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UsageError(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.sample_classes is not None and not args.sample_classes.strip(" ,"):
        raise UsageError("--sample_classes is empty")
    if not args.run_name or args.run_name in (".", "..") or any(sep in args.run_name for sep in ("/", "\\")):
        raise UsageError(
            f"--run_name must be a plain name (it names the folder {args.models_dir}/<run_name>/), got "
            f"{args.run_name!r}"
        )
    if args.phema_every is not None and args.phema_every < 0:
        raise UsageError(f"--phema_every must be 0 (no post-hoc EMA) or positive, got {args.phema_every}")
    if args.posthoc_ema is not None:
        parse_numbers(args.posthoc_ema, "--posthoc_ema")
    validate_evaluation_args(args)
    if not (sampling_mode(args) or args.export_diffusers or args.import_diffusers or args.posthoc_ema):
        check_model_fits_data(run_config(args))


def validate_evaluation_args(args: argparse.Namespace) -> None:
    """Reject bad evaluation and guidance flags with one line, before anything is written."""
    modes = [name for name in ("inference", "evaluate") if getattr(args, name)] + [
        name
        for name in ("compare_checkpoints", "export_diffusers", "import_diffusers", "posthoc_ema")
        if getattr(args, name)
    ]
    if len(modes) > 1:
        raise UsageError(f"choose one of --{' and --'.join(modes)}")
    if not (math.isfinite(args.guidance_rescale) and 0 <= args.guidance_rescale <= 1):
        raise UsageError(f"--guidance_rescale must be between 0 and 1, got {args.guidance_rescale}")
    parse_guidance_interval(args.guidance_interval)
    if args.fid_num_samples < 2:
        raise UsageError(f"--fid_num_samples must be at least 2 (FID needs a covariance), got {args.fid_num_samples}")
    if args.guidance_sweep is not None:
        parse_numbers(args.guidance_sweep)
        if not args.evaluate:
            raise UsageError("--guidance_sweep works with --evaluate")
    if (args.evaluate or args.compare_checkpoints) and args.sample_classes:
        raise UsageError(
            "--sample_classes is for --inference; --evaluate and --compare_checkpoints sample every class in turn"
        )
    if (
        args.variance
        and sampling_mode(args)
        and not sampler_class(args.sampler or SamplingConfig.sampler).takes_variance
    ):
        raise UsageError(f"--variance is the ddpm (ancestral) sampler's; --sampler {args.sampler} has its own")
    if (args.sweep or args.sweep_ema or args.sweep_samplers) and not (args.evaluate and args.sweep):
        raise UsageError("--sweep, --sweep_ema and --sweep_samplers work together with --evaluate")
    if args.sweep_samplers:
        parse_samplers(args.sweep_samplers)
    if args.sweep_ema:
        parse_numbers(args.sweep_ema, "--sweep_ema")
    if args.sampling_preset and not args.inference:
        raise UsageError("--sampling_preset is for --inference")
    preset_settings = {
        "--sampler": args.sampler,
        "--sampling_steps": args.sampling_steps,
        "--guidance_scale": args.guidance_scale,
        "--guide_model": args.guide_model,
    }
    overridden = [flag for flag, value in preset_settings.items() if value is not None]
    if args.sampling_preset and overridden:
        raise UsageError(
            f"--sampling_preset {args.sampling_preset} chooses the sampler, steps, guidance scale and guide model "
            f"itself; drop {', '.join(overridden)}"
        )
    if not (args.sampling_preset or args.export_diffusers or args.import_diffusers or args.posthoc_ema):
        refuse_ignored_flags(sampling_config(args, training=not sampling_mode(args)).sampler, args)
    if args.guide_model and not sampling_mode(args):
        raise UsageError("--guide_model is for sampling: --inference, --evaluate or --compare_checkpoints")
    if (args.fid_ref or args.save_pngs) and not args.evaluate:
        raise UsageError(f"{'--fid_ref' if args.fid_ref else '--save_pngs'} works with --evaluate")


def refuse_ignored_flags(sampler: str, args: argparse.Namespace) -> None:
    """--eta or --timestep_spacing given (not None) for a sampler that does not take it (ddpm_samplers.Sampler's
    takes_eta, takes_spacing) is refused, not ignored; so is a single step on a spacing that needs two (logsnr, edm)."""
    chosen = sampler_class(sampler)
    for flag, given, takes in (
        ("--eta", args.eta, "takes_eta"),
        ("--timestep_spacing", args.timestep_spacing, "takes_spacing"),
    ):
        if given is not None and not getattr(chosen, takes):
            takers = " or ".join(name for name, cls in SAMPLERS.items() if getattr(cls, takes))
            raise UsageError(f"{flag} works with --sampler {takers}; {sampler}, the sampler of this run, ignores it")
    if args.sampling_steps == 1 and chosen.takes_spacing and chosen.chosen_spacing(args.timestep_spacing) != "time":
        raise UsageError(
            f"--sampling_steps 1 needs --timestep_spacing time; {sampler} spaces its steps by "
            f"{chosen.chosen_spacing(args.timestep_spacing)}, which needs at least 2"
        )


def parse_guidance_interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    """'LO,HI' in noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), 0 <= LO < HI (HI may be inf)."""
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--guidance_interval expects LO,HI (two noise levels sigma), got {text!r}") from None
    if math.isnan(low) or math.isnan(high) or not 0 <= low < high:
        raise UsageError(f"--guidance_interval needs 0 <= LO < HI, got {text!r}")
    return low, high


def parse_numbers(text: str, flag: str = "--guidance_sweep") -> list[float]:
    """'0,1,3' -> [0.0, 1.0, 3.0]: finite numbers (guidance scales, EMA lengths)."""
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if not numbers or not all(math.isfinite(number) for number in numbers):
        raise UsageError(f"{flag} expects finite comma-separated numbers, got {text!r}")
    return numbers


def sampling_mode(args: argparse.Namespace) -> bool:
    return bool(args.inference or args.evaluate or args.compare_checkpoints)


def select_device(args: argparse.Namespace) -> str:
    if args.no_cuda:
        return "cpu"
    if args.device is not None:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device} asked for, but no CUDA GPU is available (use --device cpu)")
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


# From flags to configuration: each configuration flag goes to its field (or fields), as ddpm_config declares it.


def config_fields(section: str, args: argparse.Namespace) -> dict:
    """The fields of one section of RunConfig that the flags give. A switch (a bool) moves its field away from the
    default; a flag not given (None) leaves its field's default, except the training objective's (OBJECTIVE), left to
    with_objective."""
    values = {}
    for option in config_flags(section):
        value = getattr(args, option.dest)
        if option.kind is bool and not option.nullable:
            value = value != option.default
        elif value is None:
            if option.name not in OBJECTIVE:
                continue
        elif option.kind == tuple[float, float]:
            value = parse_guidance_interval(value)
        values[option.name] = value
    return values


def sampling_config(args: argparse.Namespace, training: bool = False) -> SamplingConfig:
    """The sampling flags; for training grids a fast default sampler (SamplingConfig.for_training_grids)."""
    if training:
        return SamplingConfig.for_training_grids(args.timesteps, **config_fields("sampling", args))
    return SamplingConfig(**config_fields("sampling", args))


def run_config(args: argparse.Namespace) -> RunConfig:
    sections = {
        section: config_class(**config_fields(section, args)) for section, config_class in CONFIG_SECTIONS.items()
    }
    return RunConfig(**sections | {"sampling": sampling_config(args, training=True)})


def run_training(args: argparse.Namespace) -> None:
    """Train, holding the run's folder (ddpm_checkpoint.RunLock) so that no second process trains the same run."""
    config = run_config(args)
    device = select_device(args)
    holds_folder = int(os.environ.get("RANK", "0")) == 0 and (
        config.train.save_model or config.train.resume is not None
    )
    with RunLock(Path(config.train.models_dir) / config.train.run_name, enabled=holds_folder):
        resume = load_resume_checkpoint(config, rename_damaged=holds_folder)
        config = with_objective(config, resume[1]["config"] if resume is not None else None)
        data = load_datasets(
            config.data.dataset,
            config.data.data_dir,
            config.data.image_size,
            hflip=config.data.hflip,
            seed=0,
            channels=config.data.channels,
            val_fraction=config.data.val_fraction,
            conditional=config.model.conditional,
            data_cache=config.data.data_cache,
            use_data_cache=config.data.use_data_cache,
        )
        if resume is not None and resume[1]["data"]["channels"] != data.channels:
            saved = resume[1]["data"]["channels"]
            raise UsageError(
                f"cannot resume {resume[0]}: its model takes {saved}-channel images and these are "
                f"{data.channels}-channel (add --channels {saved})"
            )
        try:
            network_from_config(config.model.network_config(data.sample_shape, None))
        except ValueError as error:
            raise UsageError(f"this model does not fit {data.image_size}x{data.image_size} images: {error}") from None
        from ddpm_train import train  # the training loop's imports are not needed to sample

        runtime = setup_runtime(device)
        try:
            train(config, data, runtime, resume)
        finally:
            if runtime.world_size > 1:
                dist.destroy_process_group()


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--model_path, by default <models_dir>/<run_name>/ckpt.pt."""
    return Path(args.model_path or Path(args.models_dir) / args.run_name / "ckpt.pt")


def run_sampling(args: argparse.Namespace) -> None:
    """--inference, --evaluate or --compare_checkpoints, in one process or in each of torchrun's: the model's kind of
    samples (ddpm_kinds) resolves the sampling defaults once, then draws and writes or measures."""
    runtime = setup_runtime(select_device(args), timeout=SAMPLING_COLLECTIVE_TIMEOUT)
    try:
        (compare_checkpoints if args.compare_checkpoints else sample_or_evaluate)(args, runtime)
    finally:
        if runtime.world_size > 1:
            dist.destroy_process_group()


def sampling_options(args: argparse.Namespace) -> dict:
    """What every sampling mode takes: the seed, the batch, where to write, which weights, compilation."""
    return dict(
        seed=args.seed,
        batch_size=args.batch_size,
        save_dir=Path(args.save_dir),
        use_ema=not args.no_ema,
        compile=args.compile,
    )


def compare_checkpoints(args: argparse.Namespace, runtime: Runtime) -> None:
    """--compare_checkpoints: the kind and the sampling defaults of the first checkpoint (the others must match it)."""
    first = load_model(args.compare_checkpoints[0])
    kind = kind_of_model(first.description)
    settings = kind.sampling_settings(sampling_config(args), first.diffusion.num_timesteps)
    kind.compare(
        args.compare_checkpoints,
        settings,
        runtime,
        num_samples=args.num_samples or kind.inference_count,
        data_dir=args.data_dir,
        judge=not args.no_judge,
        **sampling_options(args),
    )


def with_preset(args: argparse.Namespace, model_path: Path, settings: SamplingConfig) -> tuple[Path, SamplingConfig]:
    """--sampling_preset best: the weights and sampling settings the sweep found best for `model_path`."""
    if args.sampling_preset != "best":
        return model_path, settings
    preset = best_preset(model_path)
    settings = replace(
        settings,
        sampler=preset["sampler"],
        steps=preset["steps"],
        guidance_scale=preset["guidance_scale"],
        guide_model=preset["guide_model"],
    )
    refuse_ignored_flags(settings.sampler, args)
    return Path(preset["weights"]), settings


def sample_or_evaluate(args: argparse.Namespace, runtime: Runtime) -> None:
    """--inference, --evaluate (a guidance sweep too) or --evaluate --sweep of one checkpoint."""
    model_path, settings = with_preset(args, checkpoint_path(args), sampling_config(args))
    loaded = load_model(model_path, str(runtime.device), not args.no_ema, args.compile)
    kind = kind_of_model(loaded.description)
    settings = kind.sampling_settings(settings, loaded.diffusion.num_timesteps)
    scales = parse_numbers(args.guidance_sweep) if args.guidance_sweep else None
    if args.evaluate and args.sweep:
        kind.sweep(
            model_path,
            settings,
            runtime,
            scales=scales or [settings.guidance_scale],
            sweep_ema=parse_numbers(args.sweep_ema, "--sweep_ema") if args.sweep_ema else None,
            samplers=parse_samplers(args.sweep_samplers) if args.sweep_samplers else None,
            num_samples=args.fid_num_samples,
            features=args.fid_features,
            data_dir=args.data_dir,
            judge=not args.no_judge,
            **sampling_options(args),
        )
    elif args.evaluate:
        run_evaluation(
            loaded,
            kind,
            settings,
            runtime,
            num_samples=args.fid_num_samples,
            features=args.fid_features,
            guidance_sweep=scales,
            data_dir=args.data_dir,
            fid_ref=Path(args.fid_ref) if args.fid_ref else None,
            save_pngs=args.save_pngs,
            judge=not args.no_judge,
            **sampling_options(args),
        )
    else:
        run_inference(
            loaded,
            kind,
            settings,
            runtime,
            num_samples=args.num_samples,
            sample_classes=args.sample_classes,
            require_conditional=args.conditional,
            **sampling_options(args),
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
        if not args.no_tf32 and select_device(args).startswith("cuda"):
            enable_tf32()
        if args.export_diffusers:
            export_diffusers(checkpoint_path(args), Path(args.export_diffusers), use_ema=not args.no_ema)
        elif args.posthoc_ema:
            write_posthoc_ema(checkpoint_path(args), parse_numbers(args.posthoc_ema, "--posthoc_ema"))
        elif args.import_diffusers:
            import_diffusers(
                Path(args.import_diffusers), checkpoint_path(args), dataset=args.dataset, variance=args.variance
            )
        elif sampling_mode(args):
            run_sampling(args)
        else:
            run_training(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
