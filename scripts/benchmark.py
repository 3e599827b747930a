"""Throughput benchmark of the DDPM tool: training, sampling and peak memory for one model preset.

    python scripts/benchmark.py --device cpu --batch_size 16 --compare --out bench_cpu.json
    python scripts/benchmark.py --device cuda --batch_size 128 --amp bf16 --compile --channels_last --compare

Training images/s times the tool's own training step (ddpm_train.train_step: Diffusion.p_losses under autocast,
backward, gradient clipping, the non-finite check, the optimizer ddpm_optim builds) on random images already on the
device, so the figure is the model's and the optimizer's, not the data pipeline's; the comparison models run through the
same step. Sampling is timed per network evaluation and for a whole sampler run. Every figure is the median of --repeats
timed rounds after --warmup untimed steps; the first warm-up step's time is reported as `first_step_s` (with --compile
it holds the compilation).

--compare adds diffusers' UNet2DModel built to the same architecture as the preset by the mapping of --export_diffusers
(ddpm_diffusers.unet2d_config: parameter counts agree exactly) and denoising-diffusion-pytorch's Unet of the same width
and multipliers (its own block design). Both are optional, never dependencies of the tool. They run the way their own
training examples do: the same autocast as ours, no compile, default memory format. The models take turns within each
round (ours, theirs, ...), and each ratio is the median of the per-round ratios, so that background load drifting on a
shared machine hits every model alike.
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tool's modules live one level up

from ddpm_config import DiffusionConfig, ModelConfig, RunConfig, SamplingConfig, TrainConfig  # noqa: E402
from ddpm_data import DataSplits, Split  # noqa: E402
from ddpm_diffusers import unet2d_config  # noqa: E402
from ddpm_diffusion import Diffusion  # noqa: E402
from ddpm_kinds import ImageKind  # noqa: E402
from ddpm_model import PRESETS, UNet, count_parameters, preset_config  # noqa: E402
from ddpm_optim import build_lr_scheduler, build_optimizer  # noqa: E402
from ddpm_runstate import TrainState  # noqa: E402
from ddpm_runtime import Runtime, autocast_dtype, enable_tf32  # noqa: E402
from ddpm_samplers import SAMPLERS  # noqa: E402
from ddpm_sampling import generate  # noqa: E402
from ddpm_train import EpochData, build_run, train_step  # noqa: E402

# Dense bf16 tensor-core peaks from the vendor data sheets (TFLOP/s), matched in order against the
# GPU's name; an unknown GPU gets no MFU figure rather than a guessed one.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
TRAIN_FLOPS_PER_FORWARD = 3  # backward costs about twice the forward (Kaplan et al. 2020, section 2.1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Training and sampling throughput of a DDPM preset.")
    parser.add_argument("--model_size", default="ddpm", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"), help="as ddpm_main.py --amp")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (as ddpm_main.py --compile)")
    parser.add_argument("--channels_last", action="store_true", help="channels-last memory format for our model")
    parser.add_argument("--no_tf32", action="store_true", help="keep float32 matmuls in full precision on CUDA")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (compilation happens here)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed rounds (each model in turn); medians are reported"
    )
    parser.add_argument("--iters", type=int, default=2, help="steps per model per round")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    parser.add_argument("--sampling_steps", type=int, default=20, help="network evaluations of the timed sampler run")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument(
        "--compare", action="store_true", help="also time diffusers' UNet2DModel and denoising-diffusion-pytorch's Unet"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


# The models


class NoisePredictor(nn.Module):
    """Gives another library's U-Net our call signature model(x, t, labels) -> predicted noise (unconditional)."""

    null_label = None  # what the tool's training step and sampling path read of an unconditional network

    def __init__(self, net: nn.Module, returns_output_object: bool):
        super().__init__()
        self.net = net
        self.returns_output_object = returns_output_object  # diffusers returns UNet2DOutput(sample=...)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.net(x, t)
        return out.sample if self.returns_output_object else out


def diffusers_unet(model_config: dict) -> Optional[nn.Module]:
    """diffusers' UNet2DModel built to our network's architecture by ddpm_diffusers.unet2d_config (the mapping
    --export_diffusers uses: same widths, blocks, attention, time conditioning and class embedding). None if
    diffusers is not installed."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    return NoisePredictor(UNet2DModel(**unet2d_config(model_config)), returns_output_object=True)


def lucidrains_unet(config: dict) -> Optional[nn.Module]:
    """denoising-diffusion-pytorch's Unet of the same base width and multipliers (its own blocks:
    RMSNorm, linear attention at every level). None if not installed."""
    try:
        from denoising_diffusion_pytorch import Unet
    except ImportError:
        return None
    return NoisePredictor(
        Unet(dim=config["base_dim"], dim_mults=tuple(config["dim_mults"]), dropout=config["dropout"]), False
    )


def build_models(args: argparse.Namespace) -> tuple[dict[str, nn.Module], list[str]]:
    """Ours, plus the comparison models that are installed; also the notes on those that are not."""
    config = preset_config(args.model_size, args.image_size)
    ours = UNet(in_channels=3, image_size=args.image_size, **config)
    models: dict[str, nn.Module] = {f"ours ({args.model_size})": ours}
    notes = []
    if args.compare:
        for name, package, net in (
            ("diffusers UNet2DModel", "diffusers", diffusers_unet(ours.config)),
            ("denoising-diffusion-pytorch Unet", "denoising-diffusion-pytorch", lucidrains_unet(config)),
        ):
            if net is None:
                notes.append(f"{name} skipped: `pip install {package}` to compare")
            else:
                models[name] = net
    return models, notes


def forward_flops(model: nn.Module, image_size: int, device: torch.device) -> int:
    """FLOPs of one forward pass of one image, counted by PyTorch's own FLOP counter (matmuls and convolutions)."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, dtype=torch.long, device=device))
    return counter.get_total_flops()


# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per call of fn, over `iters` calls, with the device's queue drained at both ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def train_step_fn(
    model: nn.Module, args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format
) -> Callable[[], None]:
    """The tool's own training step (ddpm_train.train_step, with its optimizer, autocast and non-finite skip) on a
    run of random images already on the device, with `model` as the run's network."""
    config = RunConfig(
        model=ModelConfig(preset=args.model_size),
        diffusion=DiffusionConfig(timesteps=args.timesteps),
        train=TrainConfig(batch_size=args.batch_size, amp=args.amp, channels_last=memory_format == torch.channels_last),
    )
    runtime = Runtime(device)
    images = torch.randint(
        0, 256, (args.batch_size * 4, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device
    )
    labels = torch.zeros(len(images), dtype=torch.int64, device=device)
    data = DataSplits(
        Split(images, labels),
        Split(images[:1], labels[:1]),
        Split(images[:1], labels[:1]),
        ["image"],
        3,
        args.image_size,
    )
    run = build_run(config, data, ImageKind(3, args.image_size), runtime, TrainState())
    run.model, run.optimizer = model, build_optimizer(config.train, model)
    run.scheduler = build_lr_scheduler(run.optimizer, run.warmup_steps, run.total_steps, config.train.lr_schedule)
    order = torch.arange(args.batch_size, device=device)

    def step() -> None:
        train_step(run, EpochData(iter([(0, order)]), images, labels, hflip=False))

    return step


def eval_fn(
    model: nn.Module, args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format
) -> Callable[[], None]:
    """One network evaluation at sampling time (no gradients, eval mode, the training autocast)."""
    amp_dtype = autocast_dtype(args.amp, device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=memory_format
    )
    t = torch.full((args.batch_size,), args.timesteps // 2, device=device, dtype=torch.long)

    @torch.no_grad()
    def evaluate() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x, t)

    return evaluate


def sampler_fn(model: nn.Module, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """A whole sampler run of --sampling_steps evaluations for a batch, through the one sampling path of --inference
    (ddpm_sampling.generate, with --amp as the network's autocast)."""
    diffusion = Diffusion(args.timesteps).to(device)
    kind = ImageKind(3, args.image_size)
    settings = kind.sampling_settings(
        SamplingConfig(sampler=args.sampler, steps=args.sampling_steps, amp=args.amp), args.timesteps
    )
    runtime = Runtime(device)

    def sample() -> None:
        generate(
            model,
            diffusion,
            kind,
            args.batch_size,
            None,
            settings,
            seed=0,
            batch_size=args.batch_size,
            runtime=runtime,
            desc="benchmark",
        )

    return sample


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_in_use(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_memory_mb(device: torch.device, held_by_others: int) -> float:
    """CUDA: peak allocated since the last reset, less what the other models hold. CPU: the process's peak
    resident set so far (it never goes down, so on CPU only the first model's figure is its own; ours runs first)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - held_by_others) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def interleaved_timings(
    fns: dict[str, Callable[[], None]], args: argparse.Namespace, device: torch.device
) -> dict[str, list[float]]:
    """Warm every fn up, then time them in turn, round after round: seconds per call, one entry per round."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    rounds = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            rounds[name].append(timed(fn, args.iters, device))
    return rounds


def first_steps(
    train_fns: dict[str, Callable[[], None]], models: dict[str, nn.Module], device: torch.device
) -> dict[str, dict]:
    """Each model's first training step (compilation, autotuning), one model at a time: {"first_step_s",
    "peak_memory_mb"}."""
    results = {}
    for name, fn in train_fns.items():
        weights = sum(p.numel() * p.element_size() for p in models[name].parameters())
        held_by_others = memory_in_use(device) - weights  # the other models' weights and optimizer states
        reset_peak_memory(device)
        results[name] = {"first_step_s": timed(fn, 1, device), "peak_memory_mb": peak_memory_mb(device, held_by_others)}
    return results


def paired_ratio(theirs: list[float], ours: list[float]) -> float:
    """Median over rounds of their time / our time in the same round: on a shared machine the load drifts
    between rounds, and a ratio taken within one round cancels most of that drift."""
    return statistics.median(t / o for t, o in zip(theirs, ours))


# Reporting


def peak_tflops(gpu_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name() says, None if not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in gpu_name), None)


def mfu(train_images_per_s: float, forward_flops_per_image: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOP utilisation of training: achieved FLOP/s (forward and backward) over the dense bf16 peak (TFLOP/s);
    None without a peak."""
    return train_images_per_s * TRAIN_FLOPS_PER_FORWARD * forward_flops_per_image / (peak * 1e12) if peak else None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_table(results: list[dict], env: dict, args: argparse.Namespace) -> None:
    header = (
        f"{'model':34} {'params':>8} {'GFLOP/img':>9} {'train img/s':>11} {'ours/it':>7} {'eval img/s':>10} "
        f"{'ours/it':>7} {'sampler img/s':>13} {'peak MB':>8} {'MFU':>6}"
    )
    print(
        f"{args.model_size} preset, batch {args.batch_size}, {args.image_size}x{args.image_size}, {env['device']} "
        f"({env['cpu_threads']} threads), torch {env['torch']}, amp {args.amp}, compile {args.compile}, "
        f"channels_last {args.channels_last}; median of {args.repeats} rounds of {args.iters} steps"
    )
    print(header)
    for r in results:
        sampler = f"{r['sampler_images_per_s']:.2f}" if r["sampler_images_per_s"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['model']:34} {r['params'] / 1e6:7.2f}M {r['gflop_per_image_forward']:9.2f} "
            f"{r['train_images_per_s']:11.2f} {r['train_ratio_ours_over_this']:7.2f} {r['eval_images_per_s']:10.2f} "
            f"{r['eval_ratio_ours_over_this']:7.2f} {sampler:>13} {r['peak_memory_mb']:8.0f} {mfu:>6}"
        )
    print(
        f"ours/it: its time over ours, median over the rounds (>1: ours is faster); sampler: {args.sampler}, "
        f"{args.sampling_steps} steps"
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not args.no_tf32:
        enable_tf32()
    torch.manual_seed(0)
    models, notes = build_models(args)
    ours = next(iter(models))
    memory_formats = {
        name: torch.channels_last if args.channels_last and name == ours else torch.contiguous_format for name in models
    }
    runnable = {}
    for name, model in models.items():
        model = model.to(device, memory_format=memory_formats[name]).train()
        runnable[name] = torch.compile(model) if args.compile and name == ours else model
    flops = {name: forward_flops(model, args.image_size, device) for name, model in models.items()}

    results = {
        name: {"model": name, "params": count_parameters(model), "gflop_per_image_forward": flops[name] / 1e9}
        for name, model in models.items()
    }
    train_fns = {name: train_step_fn(model, args, device, memory_formats[name]) for name, model in runnable.items()}
    for name, first in first_steps(train_fns, models, device).items():
        results[name].update(first)
    train_s = interleaved_timings(train_fns, args, device)
    del train_fns  # free the optimizer states before sampling

    for model in runnable.values():
        model.eval()
    eval_s = interleaved_timings(
        {name: eval_fn(model, args, device, memory_formats[name]) for name, model in runnable.items()}, args, device
    )
    sampler_s = interleaved_timings({ours: sampler_fn(runnable[ours], args, device)}, args, device)

    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for name, r in results.items():
        r["train_step_s_rounds"] = train_s[name]
        r["train_images_per_s"] = args.batch_size / statistics.median(train_s[name])
        r["train_ratio_ours_over_this"] = paired_ratio(train_s[name], train_s[ours])
        r["eval_images_per_s"] = args.batch_size / statistics.median(eval_s[name])
        r["eval_ratio_ours_over_this"] = paired_ratio(eval_s[name], eval_s[ours])
        r["sampler_images_per_s"] = args.batch_size / statistics.median(sampler_s[name]) if name in sampler_s else None
        r["mfu"] = mfu(r["train_images_per_s"], flops[name], peak)
    env = environment(device)
    print_table(list(results.values()), env, args)
    for note in notes:
        print(note)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "config": vars(args),
                    "environment": env,
                    "peak_bf16_tflops": peak,
                    "results": list(results.values()),
                    "notes": notes,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
