"""Command line of the DDPM tool: train (default) or sample (--inference). No model math here.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64

Bad input ends with one line on stderr and exit code 2, before anything is written.
"""
import argparse
import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ddpm_diffusion import LOSS_TYPES, SAMPLERS, SCHEDULES
from ddpm_evaluate import FEATURE_EXTRACTORS, SamplerSettings, check_sampling_steps, generate, load_model, run_checkpoint_comparison, run_evaluation, validate_evaluation_args
from ddpm_helpers import (DATASETS, Runtime, UsageError, autocast_dtype, enable_tf32, load_datasets, save_image_grid, save_json, save_samples,
                          setup_runtime)
from ddpm_model import PRESETS, UNet, preset_config

# Under torchrun the other ranks wait in a collective while rank 0 alone computes FID statistics
# (the training set's, once, then each sample set's): far longer than a sampling step.
SAMPLING_COLLECTIVE_TIMEOUT = timedelta(hours=2)


def comma_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020) or sample from one, with classifier-free guidance.")
    mode = parser.add_argument_group("mode and run")
    mode.add_argument("--inference", action="store_true", help="sample from --model_path instead of training")
    mode.add_argument("--run_name", default="DDPM", help="name of the run: models/<run_name>/, file names in --save_dir")
    mode.add_argument("--save_dir", default="outputs", help="where images, loss history and metrics go")
    mode.add_argument("--models_dir", default="models", help="checkpoints go to <models_dir>/<run_name>/")
    mode.add_argument("--seed", type=int, default=0)
    mode.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    mode.add_argument("--no_cuda", action="store_true", help="run on the CPU even when a GPU is present")
    mode.add_argument("--no_tf32", action="store_true", help="keep float32 matmuls in full precision on CUDA (TF32 is on by default)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=DATASETS)
    data.add_argument("--data_dir", default="./data", help="dataset location (downloads go here); for 'folder', the image folder")
    data.add_argument("--image_size", type=int, default=None, help="resize images to this size (default: the dataset's own)")
    data.add_argument("--no_hflip", action="store_true", help="no random horizontal flips in training")

    model = parser.add_argument_group("model (a preset, then overrides)")
    model.add_argument("--model_size", default="ddpm", choices=sorted(PRESETS), help="architecture preset")
    model.add_argument("--base_dim", type=int, help="channels of the first level")
    model.add_argument("--dim_mults", type=comma_ints, help="channel multiplier per level, e.g. 1,2,2,2")
    model.add_argument("--num_res_blocks", type=int, help="residual blocks per level")
    model.add_argument("--attn_resolutions", type=comma_ints, help="feature-map sizes with self-attention, e.g. 16")
    model.add_argument("--dropout", type=float)
    model.add_argument("--conditional", action="store_true", help="class-conditional model, trained for classifier-free guidance")

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--timesteps", type=int, default=1000)
    diffusion.add_argument("--schedule", default="linear", choices=SCHEDULES)
    diffusion.add_argument("--loss_type", default="l2", choices=LOSS_TYPES)

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=100)
    train.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    train.add_argument("--batch_size", type=int, default=128, help="per process and micro-batch")
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--p_uncond", type=float, default=0.1, help="probability of training on the null label (--conditional)")
    train.add_argument("--log_interval", type=int, default=100, help="steps between logged losses")
    train.add_argument("--sample_every", type=int, default=10, help="epochs between sample grids (0: never)")
    train.add_argument("--save_model", action="store_true", help="write checkpoints to <models_dir>/<run_name>/")
    train.add_argument("--save_every", type=int, default=10, help="epochs between kept snapshots ckpt_epochNNNN.pt")
    train.add_argument("--save_every_steps", type=int, default=0, help="also refresh ckpt.pt every N steps (0: at epoch ends only)")
    train.add_argument("--keep_checkpoints", type=int, default=3, help="how many ckpt_epochNNNN.pt snapshots to keep")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue a run from <models_dir>/<run_name>/ckpt.pt, or from the given checkpoint")
    train.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "lion"))
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--beta1", type=float, default=0.9)
    train.add_argument("--beta2", type=float, default=0.999)
    train.add_argument("--warmup_steps", type=int, default=5000, help="linear learning-rate warm-up (Ho et al.: 5000)")
    train.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine", "step"))
    train.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    train.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay of the weights (0: no EMA)")
    train.add_argument("--no_ema", action="store_true", help="evaluate and sample with the raw weights instead of the EMA")
    train.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                       help="mixed precision of the network, in training and sampling (auto: bf16 on GPUs that support it, else none)")
    train.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster on recent GPUs)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the network, for training or sampling (faster after a one-off compilation of a minute or more)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--model_path", default=None, help="checkpoint to sample from (default: <models_dir>/<run_name>/ckpt.pt)")
    sampling.add_argument("--num_samples", type=int, default=64)
    sampling.add_argument("--sample_classes", default=None, help='classes to sample, as indices or names: "0,1,2" or "cat,dog"')
    sampling.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance: 0 unconditional, 1 conditional, >1 stronger")
    sampling.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    sampling.add_argument("--sampling_steps", type=int, default=None, help="network evaluations (default: all timesteps for ddpm, 50 otherwise)")
    sampling.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral")
    sampling.add_argument("--guidance_rescale", type=float, default=0.0,
                          help="rescale guided predictions to the conditional one's std, 0 (off) to 1 (Lin et al. 2023)")
    sampling.add_argument("--guidance_interval", default=None, metavar="LO,HI",
                          help="guide only at noise levels LO < sigma_t <= HI, plain conditional elsewhere (Kynkaanniemi et al. 2024)")

    evaluation = parser.add_argument_group("evaluation (see ddpm_evaluate.py)")
    evaluation.add_argument("--evaluate", action="store_true", help="sample --fid_num_samples images from --model_path and report FID, IS, class consistency")
    evaluation.add_argument("--fid_num_samples", type=int, default=10000, help="samples for --evaluate (published CIFAR-10 FIDs use 50000)")
    evaluation.add_argument("--fid_features", default="inception", choices=sorted(FEATURE_EXTRACTORS),
                            help="inception: the standard FID network; random-conv: fixed random features for tests, not comparable to published FID")
    evaluation.add_argument("--guidance_sweep", default=None, metavar="W1,W2,...", help="with --evaluate: one evaluation per guidance scale, a table, a plot and per-class grids")
    evaluation.add_argument("--compare_checkpoints", nargs="+", default=None, metavar="CKPT",
                            help="sample the same noise from these checkpoints of one run into one image, one row per training step")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values with one line, before any file is touched."""
    positive = ["num_samples", "batch_size", "epochs", "timesteps", "log_interval", "grad_accum"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("max_steps", "sampling_steps", "image_size", "base_dim", "num_res_blocks"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.timesteps < 10:
        raise UsageError(f"--timesteps must be at least 10, got {args.timesteps}")
    if args.sampling_steps is not None and args.sampling_steps > args.timesteps and not (args.inference or args.evaluate or args.compare_checkpoints):
        raise UsageError(f"--sampling_steps ({args.sampling_steps}) cannot exceed --timesteps ({args.timesteps})")
    for name in ("guidance_scale", "lr", "eta"):
        if not math.isfinite(getattr(args, name)):
            raise UsageError(f"--{name} must be a finite number, got {getattr(args, name)}")
    if not 0.0 <= args.p_uncond <= 1.0:
        raise UsageError(f"--p_uncond must be between 0 and 1, got {args.p_uncond}")
    if not 0.0 <= args.eta <= 1.0:
        raise UsageError(f"--eta must be between 0 and 1, got {args.eta}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.sample_classes is not None and not args.sample_classes.strip(" ,"):
        raise UsageError("--sample_classes is empty")
    validate_evaluation_args(args)


def select_device(args: argparse.Namespace) -> str:
    if args.no_cuda:
        return "cpu"
    if args.device is not None:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device} asked for, but no CUDA GPU is available (use --device cpu)")
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config_from_args(args: argparse.Namespace, image_size: int) -> dict:
    """The preset's architecture with the explicit flags laid over it."""
    config = preset_config(args.model_size, image_size)
    for name in ("base_dim", "dim_mults", "num_res_blocks", "attn_resolutions", "dropout"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    return config


def parse_sample_classes(text: Optional[str], class_names: list[str], num_samples: int) -> list[int]:
    """Class indices or names, repeated in order (or cut) to `num_samples` labels."""
    by_name = {name.lower(): index for index, name in enumerate(class_names)}
    classes = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        if part.lstrip("-").isdigit():
            index = int(part)
            if not 0 <= index < len(class_names):
                raise UsageError(f"class {index} is out of range: this model has classes 0-{len(class_names) - 1}")
        elif part.lower() in by_name:
            index = by_name[part.lower()]
        else:
            raise UsageError(f"unknown class {part!r}; this model's classes are: {', '.join(class_names)}")
        classes.append(index)
    return [classes[i % len(classes)] for i in range(num_samples)]


def run_training(args: argparse.Namespace) -> None:
    from ddpm_train import load_resume_checkpoint, train

    args.device = select_device(args)
    resume = load_resume_checkpoint(args)
    data = load_datasets(args.dataset, args.data_dir, args.image_size, hflip=False if args.no_hflip else None, seed=0)
    try:
        args.model_config = model_config_from_args(args, data.image_size)
        UNet(in_channels=data.channels, image_size=data.image_size, **args.model_config)
    except ValueError as error:
        raise UsageError(f"this model does not fit {data.image_size}x{data.image_size} images: {error}") from None
    args.data_on_device = args.device.startswith("cuda")
    train(args, data, resume)


def run_inference(args: argparse.Namespace, rt: Runtime) -> None:
    """Sample from a checkpoint; everything about the model comes from the checkpoint. Under torchrun
    every rank samples its share of the batches and rank 0 writes them all."""
    model_path = Path(args.model_path or Path(args.models_dir) / args.run_name / "ckpt.pt")
    loaded = load_model(model_path, str(rt.device), args.no_ema, args.compile)
    checkpoint = loaded.checkpoint
    class_names = checkpoint["data"]["class_names"]
    if not checkpoint["conditional"] and (args.conditional or args.sample_classes):
        flag = "--sample_classes" if args.sample_classes else "--conditional"
        raise UsageError(f"{flag} needs a class-conditional model, but {model_path} is unconditional")
    if checkpoint["conditional"]:
        text = args.sample_classes or ",".join(str(i) for i in range(len(class_names)))
        labels = torch.tensor(parse_sample_classes(text, class_names, args.num_samples))
    else:
        labels = None
    check_sampling_steps(args, loaded)

    use_ema = loaded.use_ema
    channels, size, _ = loaded.image_shape
    if rt.is_main:
        print(f"sampling {args.num_samples} images of {channels}x{size}x{size} from {model_path} "
              f"({'EMA' if use_ema else 'raw'} weights, {args.sampler}"
              f"{', guidance ' + str(args.guidance_scale) if labels is not None else ''}"
              f"{f', {rt.world_size} processes' if rt.world_size > 1 else ''})")
    pixels = generate(loaded, args.num_samples, labels, SamplerSettings.from_args(args), args.seed, args.batch_size, rt, desc="sampling")
    if not rt.is_main:
        return
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 back to [-1, 1]: exactly the same pixels again

    save_dir = Path(args.save_dir)
    save_image_grid(images, save_dir / "grid.png")
    save_samples(images, labels, save_dir)
    save_json({
        "model_path": str(model_path), "num_samples": args.num_samples, "seed": args.seed, "weights": "ema" if use_ema else "raw",
        "sampler": args.sampler, "sampling_steps": args.sampling_steps, "eta": args.eta,
        "network_autocast": str(autocast_dtype(args.amp, rt.device) or "float32"),
        "guidance_scale": args.guidance_scale if labels is not None else None,
        "guidance_rescale": args.guidance_rescale if labels is not None else None,
        "guidance_interval": args.guidance_interval if labels is not None else None,
        "classes": None if labels is None else [class_names[i] for i in labels.tolist()],
    }, save_dir / "samples.json")
    print(f"wrote {save_dir / 'grid.png'}, {args.num_samples} images in {save_dir / 'samples'}/ and {save_dir / 'samples.npz'}")


def run_sampling(args: argparse.Namespace) -> None:
    """--inference, --evaluate or --compare_checkpoints, in one process or in each of torchrun's."""
    rt = setup_runtime(select_device(args), timeout=SAMPLING_COLLECTIVE_TIMEOUT)
    try:
        if args.compare_checkpoints:
            run_checkpoint_comparison(args, rt)
        elif args.evaluate:
            run_evaluation(args, rt)
        else:
            run_inference(args, rt)
    finally:
        if rt.world_size > 1:
            dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
        if not args.no_tf32 and select_device(args).startswith("cuda"):
            enable_tf32()
        if args.compare_checkpoints or args.evaluate or args.inference:
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
