"""Command line of the DDPM tool: train (default) or sample (--inference). No model math here.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64

Bad input ends with one line on stderr and exit code 2, before anything is written.
"""
import argparse
import math
from dataclasses import replace
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ddpm_checkpoint import RunLock, load_model, load_resume_checkpoint
from ddpm_config import (
    GUIDANCE_SCALE,
    INFERENCE_SAMPLES,
    POINT_DATASETS,
    POINT_GUIDANCE_SCALE,
    TRAINING_GRID_SAMPLER,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    TrainConfig,
    UsageError,
    check_model_fits_data,
    with_objective,
)
from ddpm_data import DATASETS, load_datasets
from ddpm_diffusers import export_diffusers, import_diffusers
from ddpm_diffusion import LOSS_TYPES, PREDICTION_TYPES, SCHEDULES
from ddpm_evaluate import run_checkpoint_comparison, run_evaluation
from ddpm_metrics import FEATURE_EXTRACTORS
from ddpm_model import MLP_PRESET, PRESETS, network_from_config
from ddpm_phema import write_posthoc_ema
from ddpm_points import POINT_SAMPLES, run_point_inference
from ddpm_runtime import enable_tf32, setup_runtime
from ddpm_samplers import SAMPLERS, VARIANCES
from ddpm_sampling import run_inference
from ddpm_sweep import best_preset, parse_samplers, run_sweep

# Under torchrun the other ranks wait in a collective while rank 0 alone computes FID statistics
# (the training set's, once, then each sample set's): far longer than a sampling step.
SAMPLING_COLLECTIVE_TIMEOUT = timedelta(hours=2)
D, M, F, T, S = DataConfig, ModelConfig, DiffusionConfig, TrainConfig, SamplingConfig  # the defaults' one home


def comma_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
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


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with its default taken from the dataclasses of ddpm_config (their one home)."""
    parser = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020) or sample from one, with classifier-free guidance.",
                                     formatter_class=DefaultsHelp)
    mode = parser.add_argument_group("mode and run")
    mode.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    mode.add_argument("--export_diffusers", default=None, metavar="OUT_DIR",
                      help="write --model_path as a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler, safetensors)")
    mode.add_argument("--import_diffusers", default=None, metavar="FOLDER",
                      help="convert a diffusers UNet2DModel folder (e.g. google/ddpm-cifar10-32) into the checkpoint --model_path")
    mode.add_argument("--posthoc_ema", default=None, metavar="SIGMA_RELS",
                      help="reconstruct the EMA of these lengths (e.g. 0.05,0.1,0.15) from --model_path's run's snapshots, as "
                           "posthoc_ema_<sigma_rel>.safetensors beside it (Karras et al. 2024, EDM2)")
    mode.add_argument("--run_name", default=T.run_name, help="name of the run: models/<run_name>/, file names in --save_dir")
    mode.add_argument("--save_dir", default=T.save_dir, help="where images, loss history and metrics go")
    mode.add_argument("--models_dir", default=T.models_dir, help="checkpoints go to <models_dir>/<run_name>/")
    mode.add_argument("--seed", type=int, default=T.seed, help="seeds the run and its samples")
    mode.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (derived: cuda when available)")
    mode.add_argument("--no_cuda", action="store_true", help="run on the CPU even when a GPU is present")
    mode.add_argument("--no_tf32", action="store_true", help="keep float32 matmuls in full precision on CUDA (TF32 is on by default)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=D.dataset, choices=DATASETS, help="the data set")
    data.add_argument("--data_dir", default=D.data_dir, help="dataset location (downloads go here); for 'folder', the image folder or dataset zip")
    data.add_argument("--image_size", type=int, default=None, help="resize images to this size (derived: the dataset's own)")
    flips = data.add_mutually_exclusive_group()
    flips.add_argument("--hflip", action="store_true", help="random horizontal flips in training (derived: on for cifar10 and synthetic only)")
    flips.add_argument("--no_hflip", action="store_true", help="no random horizontal flips in training")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="train on grey (1) or RGB (3) images (derived: the data set's own; a folder of grey images is grey)")
    data.add_argument("--val_fraction", type=float, default=D.val_fraction, help="share of the training images held out for the validation loss (0: none)")
    data.add_argument("--data_cache", default=D.data_cache, metavar="DIR", help="folder of the decoded cache of a folder or zip (derived: "
                      ".ddpm_cache beside the folder or zip, else $XDG_CACHE_HOME/ddpm)")
    data.add_argument("--no_data_cache", action="store_true", help="decode a folder or zip into memory at every start, no cache")

    model = parser.add_argument_group("model (a preset, then overrides)")
    model.add_argument("--model_size", default=M.preset, choices=sorted(PRESETS) + [MLP_PRESET],
                       help=f"architecture preset: a U-Net, or {MLP_PRESET} (an MLP, for the 2D data sets {', '.join(POINT_DATASETS)})")
    model.add_argument("--mlp_width", type=int, default=M.mlp_width, help=f"--model_size {MLP_PRESET}: hidden units per layer")
    model.add_argument("--mlp_depth", type=int, default=M.mlp_depth, help=f"--model_size {MLP_PRESET}: residual blocks")
    model.add_argument("--base_dim", type=int, help="channels of the first level (default: the preset's)")
    model.add_argument("--dim_mults", type=comma_ints, help="channel multiplier per level, e.g. 1,2,2,2 (default: the preset's)")
    model.add_argument("--num_res_blocks", type=int, help="residual blocks per level (default: the preset's)")
    model.add_argument("--attn_resolutions", type=comma_ints, help="feature-map sizes with self-attention, e.g. 16 (default: the preset's)")
    model.add_argument("--dropout", type=float, help="(default: the preset's)")
    model.add_argument("--conditional", action="store_true", help="class-conditional model, trained for classifier-free guidance")

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--timesteps", type=int, default=F.timesteps, help="diffusion steps T")
    diffusion.add_argument("--schedule", default=F.schedule, choices=SCHEDULES, help="noise schedule of the betas")
    diffusion.add_argument("--loss_type", default=F.loss_type, choices=LOSS_TYPES, help="distance of the training loss")
    diffusion.add_argument("--prediction_type", default=None, choices=PREDICTION_TYPES,
                           help=f"what the network predicts: v (Salimans & Ho 2022), eps (Ho et al.) or x0 (new runs: {F.prediction_type}, "
                                "chosen by scripts/quality_benchmark.py; --resume keeps the run's)")
    diffusion.add_argument("--snr_gamma", type=float, default=None,
                           help=f"min-SNR-gamma loss weighting (Hang et al. 2023); 0: none, Ho et al.'s L_simple (new runs: {F.snr_gamma:g}; "
                                "--resume keeps the run's)")
    diffusion.add_argument("--variance", default=None, choices=VARIANCES,
                           help=f"the ddpm sampler's sigma_t^2: fixed_small (posterior) or fixed_large (beta_t, Ho et al.'s CIFAR-10 numbers); "
                                f"training records it in the checkpoint (default: {F.variance}), sampling overrides the checkpoint's")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=T.epochs, help="epochs to train")
    train.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    train.add_argument("--batch_size", type=int, default=T.batch_size, help="per process and micro-batch")
    train.add_argument("--lr", type=float, default=T.lr, help="learning rate")
    train.add_argument("--p_uncond", type=float, default=T.p_uncond, help="probability of training on the null label (--conditional)")
    train.add_argument("--log_interval", type=int, default=T.log_interval, help="steps between logged losses")
    train.add_argument("--eval_every", type=int, default=None,
                       help="epochs between losses on the whole validation and test splits (they are taken every epoch on fixed subsets "
                            "that cost under 5%% of the time, and on the whole splits at the end)")
    train.add_argument("--sample_every", type=int, default=T.sample_every, help="epochs between sample grids (0: never)")
    train.add_argument("--save_model", action="store_true", help="write checkpoints to <models_dir>/<run_name>/")
    train.add_argument("--save_every", type=int, default=T.save_every, help="epochs between kept snapshots ckpt_epochNNNN.pt")
    train.add_argument("--save_every_steps", type=int, default=T.save_every_steps, help="also refresh ckpt.pt every N steps (0: at epoch ends only)")
    train.add_argument("--keep_checkpoints", type=int, default=T.keep_checkpoints, help="how many ckpt_epochNNNN.pt snapshots to keep")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue a run from <models_dir>/<run_name>/ckpt.pt, or from the given checkpoint")
    train.add_argument("--optimizer", default=T.optimizer, choices=("adamw", "adam", "lion"), help="the optimizer")
    train.add_argument("--weight_decay", type=float, default=T.weight_decay, help="decoupled weight decay")
    train.add_argument("--beta1", type=float, default=T.beta1, help="the optimizer's first beta")
    train.add_argument("--beta2", type=float, default=T.beta2, help="the optimizer's second beta")
    train.add_argument("--warmup_steps", type=int, default=None,
                       help="linear learning-rate warm-up (derived: 5%% of the planned steps, at most Ho et al.'s 5000)")
    train.add_argument("--lr_schedule", default=T.lr_schedule, choices=("constant", "cosine", "step"), help="after the warm-up")
    train.add_argument("--grad_clip", type=float, default=T.grad_clip, help="clip the gradient norm (0: off)")
    train.add_argument("--grad_accum", type=int, default=T.grad_accum, help="micro-batches per optimizer step")
    train.add_argument("--ema_decay", type=float, default=None,
                       help="fixed EMA decay with TensorFlow's warm-up, as Ho et al.'s 0.9999 (0: no EMA; derived: an EMA whose "
                            "half-life is 5%% of the steps so far, at most 0.9999's, as EDM's ramp-up)")
    train.add_argument("--phema_every", type=int, default=None,
                       help="steps between post-hoc EMA snapshots (EDM2's sigma_rel 0.05 and 0.10 profiles, float16) in <run folder>/phema/, "
                            "with --save_model (0: none; derived: 20 to 40 per run)")
    train.add_argument("--no_ema", action="store_true", help="evaluate and sample with the raw weights instead of the EMA")
    train.add_argument("--amp", default=T.amp, choices=("auto", "bf16", "fp16", "none"),
                       help="mixed precision of the network, in training and sampling (auto: bf16 on GPUs that support it, else none)")
    train.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster on recent GPUs)")
    train.add_argument("--logger", default=T.logger, choices=("jsonl", "tensorboard"),
                       help="jsonl: the metrics JSON lines only; tensorboard: also TensorBoard events in <save_dir>/tensorboard/<run_name>")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the network, for training or sampling (faster after a one-off compilation of a minute or more)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--model_path", default=None, help="checkpoint to sample from (default: <models_dir>/<run_name>/ckpt.pt)")
    sampling.add_argument("--num_samples", type=int, default=None,
                          help=f"images to sample (default: {INFERENCE_SAMPLES}; training grids: 16, or two per class; 2D models: {POINT_SAMPLES})")
    sampling.add_argument("--sample_classes", default=None, help='classes to sample, as indices or names: "0,1,2" or "cat,dog"')
    sampling.add_argument("--guidance_scale", type=float, default=S.guidance_scale,
                          help=f"classifier-free guidance: 0 unconditional, 1 conditional, >1 stronger (default: {GUIDANCE_SCALE:g}; "
                               f"2D points: {POINT_GUIDANCE_SCALE:g})")
    sampling.add_argument("--sampler", default=None, choices=SAMPLERS, help=f"(default: {S.sampler}; training grids: {TRAINING_GRID_SAMPLER})")
    sampling.add_argument("--sampling_steps", type=int, default=None,
                          help="network evaluations (default: all timesteps for ddpm, 50 otherwise; training grids: 20)")
    sampling.add_argument("--eta", type=float, default=S.eta, help="DDIM noise: 0 deterministic, 1 ancestral")
    sampling.add_argument("--guidance_rescale", type=float, default=S.guidance_rescale,
                          help="rescale guided predictions to the conditional one's std, 0 (off) to 1 (Lin et al. 2023)")
    sampling.add_argument("--guide_model", default=None, metavar="CKPT",
                          help="autoguidance (Karras et al. 2024): guide with this weaker model of the same data and diffusion (an "
                               "earlier snapshot, a shorter post-hoc EMA, a smaller model) instead of the unconditional branch; "
                               "also for unconditional models")
    sampling.add_argument("--guidance_interval", default=None, metavar="LO,HI",
                          help="guide only at noise levels LO < sigma_t <= HI, plain conditional elsewhere (Kynkaanniemi et al. 2024)")

    evaluation = parser.add_argument_group("evaluation (see ddpm_evaluate.py)")
    evaluation.add_argument("--evaluate", action="store_true", help="sample --fid_num_samples images from --model_path and report FID, IS, class consistency")
    evaluation.add_argument("--fid_num_samples", type=int, default=10000, help="samples for --evaluate (published CIFAR-10 FIDs use 50000)")
    evaluation.add_argument("--fid_features", default="inception", choices=sorted(FEATURE_EXTRACTORS),
                            help="inception: the standard FID network; random-conv: fixed random features for tests, not comparable to published FID")
    evaluation.add_argument("--fid_ref", default=None, metavar="NPZ",
                            help="reference statistics mu, sigma (pytorch-fid --save-stats) instead of the training set's")
    evaluation.add_argument("--save_pngs", action="store_true", help="with --evaluate: also write every sample as samples/NNNNN.png")
    evaluation.add_argument("--guidance_sweep", default=None, metavar="W1,W2,...", help="with --evaluate: one evaluation per guidance scale, a table, a plot and per-class grids")
    evaluation.add_argument("--sweep", action="store_true",
                            help="with --evaluate: every combination of --sweep_ema, guidance kind (classifier-free; autoguidance with "
                                 "--guide_model), --guidance_sweep scales and --sweep_samplers, ranked by FID (KID without the Inception "
                                 "weights); resumable; the best goes to <run folder>/sampling_best.json")
    evaluation.add_argument("--sweep_ema", default=None, metavar="SIGMA_RELS",
                            help="with --sweep: post-hoc EMA lengths to try besides the checkpoint's own EMA, e.g. 0.05,0.1,0.15")
    evaluation.add_argument("--sweep_samplers", default=None, metavar="SAMPLER:STEPS,...",
                            help="with --sweep: solvers and steps to try, e.g. dpm++2m:20,dpm++3m:10 (default: --sampler and --sampling_steps)")
    sampling.add_argument("--sampling_preset", default=None, choices=("best",),
                          help="with --inference: the weights, sampler, steps and guidance that --evaluate --sweep found best for --model_path")
    evaluation.add_argument("--compare_checkpoints", nargs="+", default=None, metavar="CKPT",
                            help="sample the same noise from these checkpoints of one run into one image, one row per training step")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values with one line, before any file is touched."""
    positive = ["batch_size", "epochs", "timesteps", "log_interval", "grad_accum", "mlp_width", "mlp_depth"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("num_samples", "max_steps", "sampling_steps", "image_size", "base_dim", "num_res_blocks", "eval_every"):
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
    if not 0.0 <= args.eta <= 1.0:
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
        raise UsageError(f"--run_name must be a plain name (it names the folder {args.models_dir}/<run_name>/), got {args.run_name!r}")
    if args.phema_every is not None and args.phema_every < 0:
        raise UsageError(f"--phema_every must be 0 (no post-hoc EMA) or positive, got {args.phema_every}")
    if args.posthoc_ema is not None:
        parse_numbers(args.posthoc_ema, "--posthoc_ema")
    validate_evaluation_args(args)
    if not (sampling_mode(args) or args.export_diffusers or args.import_diffusers or args.posthoc_ema):
        check_model_fits_data(run_config(args))


def validate_evaluation_args(args: argparse.Namespace) -> None:
    """Reject bad evaluation and guidance flags with one line, before anything is written."""
    modes = [name for name in ("inference", "evaluate") if getattr(args, name)] + \
            [name for name in ("compare_checkpoints", "export_diffusers", "import_diffusers", "posthoc_ema") if getattr(args, name)]
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
        raise UsageError("--sample_classes is for --inference; --evaluate and --compare_checkpoints sample every class in turn")
    if args.variance and sampling_mode(args) and (args.sampler or SamplingConfig.sampler) != "ddpm":
        raise UsageError(f"--variance is the ddpm (ancestral) sampler's; --sampler {args.sampler} has its own")
    if (args.sweep or args.sweep_ema or args.sweep_samplers) and not (args.evaluate and args.sweep):
        raise UsageError("--sweep, --sweep_ema and --sweep_samplers work together with --evaluate")
    if args.sweep_samplers:
        parse_samplers(args.sweep_samplers)
    if args.sweep_ema:
        parse_numbers(args.sweep_ema, "--sweep_ema")
    if args.sampling_preset and not args.inference:
        raise UsageError("--sampling_preset is for --inference")
    if args.guide_model and not sampling_mode(args):
        raise UsageError("--guide_model is for sampling: --inference, --evaluate or --compare_checkpoints")
    if (args.fid_ref or args.save_pngs) and not args.evaluate:
        raise UsageError(f"{'--fid_ref' if args.fid_ref else '--save_pngs'} works with --evaluate")


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


# From flags to configuration: each flag is read here once and goes to one field.


def sampling_config(args: argparse.Namespace, training: bool = False) -> SamplingConfig:
    """The sampling flags; for training grids a fast default sampler (SamplingConfig.for_training_grids)."""
    flags = dict(steps=args.sampling_steps, eta=args.eta, guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                 guidance_interval=parse_guidance_interval(args.guidance_interval), variance=args.variance, amp=args.amp,
                 guide_model=args.guide_model)
    if training:
        return SamplingConfig.for_training_grids(args.timesteps, sampler=args.sampler, **flags)
    return SamplingConfig(**flags, **({"sampler": args.sampler} if args.sampler else {}))


def run_config(args: argparse.Namespace) -> RunConfig:
    as_tuple = lambda values: None if values is None else tuple(values)  # noqa: E731
    return RunConfig(
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                        hflip=True if args.hflip else False if args.no_hflip else None, channels=args.channels, val_fraction=args.val_fraction,
                        data_cache=args.data_cache, use_data_cache=not args.no_data_cache),
        model=ModelConfig(preset=args.model_size, base_dim=args.base_dim, dim_mults=as_tuple(args.dim_mults),
                          num_res_blocks=args.num_res_blocks, attn_resolutions=as_tuple(args.attn_resolutions),
                          dropout=args.dropout, conditional=args.conditional, mlp_width=args.mlp_width, mlp_depth=args.mlp_depth),
        diffusion=DiffusionConfig(timesteps=args.timesteps, schedule=args.schedule, loss_type=args.loss_type,
                                  prediction_type=args.prediction_type, snr_gamma=args.snr_gamma,
                                  **({"variance": args.variance} if args.variance else {})),
        train=TrainConfig(
            run_name=args.run_name, save_dir=args.save_dir, models_dir=args.models_dir, seed=args.seed, epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond, optimizer=args.optimizer,
            weight_decay=args.weight_decay, beta1=args.beta1, beta2=args.beta2, warmup_steps=args.warmup_steps,
            lr_schedule=args.lr_schedule, grad_clip=args.grad_clip, grad_accum=args.grad_accum, ema_decay=args.ema_decay,
            phema_every=args.phema_every, use_ema=not args.no_ema, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
            log_interval=args.log_interval, eval_every=args.eval_every, sample_every=args.sample_every, num_samples=args.num_samples,
            save_model=args.save_model, save_every=args.save_every, save_every_steps=args.save_every_steps,
            keep_checkpoints=args.keep_checkpoints, resume=args.resume, logger=args.logger),
        sampling=sampling_config(args, training=True),
    )


def run_training(args: argparse.Namespace) -> None:
    """Train, holding the run's folder (ddpm_checkpoint.RunLock) so that no second process trains the same run."""
    config = run_config(args)
    device = select_device(args)
    holds_folder = int(os.environ.get("RANK", "0")) == 0 and (config.train.save_model or config.train.resume is not None)
    with RunLock(Path(config.train.models_dir) / config.train.run_name, enabled=holds_folder):
        resume = load_resume_checkpoint(config)
        config = with_objective(config, resume[1]["config"] if resume is not None else None)
        data = load_datasets(config.data.dataset, config.data.data_dir, config.data.image_size, hflip=config.data.hflip, seed=0,
                             channels=config.data.channels, val_fraction=config.data.val_fraction, conditional=config.model.conditional,
                             data_cache=config.data.data_cache, use_data_cache=config.data.use_data_cache)
        if resume is not None and resume[1]["data"]["channels"] != data.channels:
            saved = resume[1]["data"]["channels"]
            raise UsageError(f"cannot resume {resume[0]}: its model takes {saved}-channel images and these are {data.channels}-channel "
                             f"(add --channels {saved})")
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
    """--inference, --evaluate or --compare_checkpoints, in one process or in each of torchrun's."""
    runtime = setup_runtime(select_device(args), timeout=SAMPLING_COLLECTIVE_TIMEOUT)
    model_path = checkpoint_path(args)
    common = dict(seed=args.seed, batch_size=args.batch_size, save_dir=Path(args.save_dir), use_ema=not args.no_ema, compile=args.compile)
    try:
        if args.compare_checkpoints:
            run_checkpoint_comparison(args.compare_checkpoints, sampling_config(args).derived(points=False), runtime, num_samples=args.num_samples or INFERENCE_SAMPLES,
                                      **common)
        elif args.evaluate and args.sweep:
            settings = sampling_config(args).derived(points=False)
            run_sweep(model_path, settings, runtime, sweep_ema=parse_numbers(args.sweep_ema, "--sweep_ema") if args.sweep_ema else None,
                      scales=parse_numbers(args.guidance_sweep) if args.guidance_sweep else [settings.guidance_scale],
                      samplers=parse_samplers(args.sweep_samplers) if args.sweep_samplers else None, num_samples=args.fid_num_samples,
                      features=args.fid_features, data_dir=args.data_dir, **common)
        elif args.evaluate:
            run_evaluation(model_path, sampling_config(args), runtime, num_samples=args.fid_num_samples, features=args.fid_features,
                           guidance_sweep=parse_numbers(args.guidance_sweep) if args.guidance_sweep else None,
                           data_dir=args.data_dir, fid_ref=Path(args.fid_ref) if args.fid_ref else None, save_pngs=args.save_pngs, **common)
        else:
            settings = sampling_config(args)
            if args.sampling_preset == "best":
                preset = best_preset(model_path)
                model_path = Path(preset["weights"])
                settings = replace(settings, sampler=preset["sampler"], steps=preset["steps"], guidance_scale=preset["guidance_scale"],
                                   guide_model=preset["guide_model"])
            loaded = load_model(model_path, str(runtime.device), not args.no_ema, args.compile)
            inference = run_point_inference if loaded.description.points else run_inference
            inference(loaded, settings.derived(loaded.description.points), runtime, num_samples=args.num_samples, sample_classes=args.sample_classes,
                      require_conditional=args.conditional, **common)
    finally:
        if runtime.world_size > 1:
            dist.destroy_process_group()


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
            import_diffusers(Path(args.import_diffusers), checkpoint_path(args), dataset=args.dataset, variance=args.variance)
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
