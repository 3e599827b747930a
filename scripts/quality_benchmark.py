"""How good are the samples for the steps spent? The tool against diffusers on real data, side by side.

    python scripts/quality_benchmark.py --budgets 300,600,1200 --out quality_bench

Data: scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes; shipped inside scikit-learn,
no download), upscaled to --image_size and written as a folder of grey PNGs with train/ and test/ sub-folders
(a stratified 75/25 split). For each budget of optimizer steps it trains, with the same images, batch size,
learning rate and steps:

* `ours`: the tool, through its real command line (`ddpm_main.main`), with its defaults for everything else,
  except that no training images are held out for validation (`--val_fraction 0`), so that both trainers see
  identical data;
* `ours, defaults`: the same command without `--val_fraction 0` (10% of the training images become the
  validation split);
* `diffusers`: diffusers' `UNet2DModel` of the same layout and size with its `DDPMScheduler`, trained as its
  unconditional example trains (AdamW with its example's betas, eps and weight decay; gradient clipping at 1)
  without warm-up, EMA or LR decay, and class-conditional through `num_class_embeds` with a null class.

Then it draws --num_samples guided images (every class in turn) from each with one sampler, the tool's sampling path
`ddpm_sampling.generate` (--sampler, --sampling_steps, --guidance_scale), and reports the figures of the tool's judge
(ddpm_judge, the same one `--evaluate` uses; trained once on the real training digits and cached in the digits folder;
its accuracy on the real test digits is printed): class accuracy, the Frechet distance between its 64-d features of the
samples and of the real test digits with its floor, and the training wall time. Writes quality_benchmark.json and
quality_benchmark.md to --out.

`--sampling_study` instead trains the tool once per budget and runs the --study_parts on the same judge:
* `solvers` (issue 25): every deterministic solver (--study_solvers) on every timestep spacing (--study_spacings) at
  5, 10 and 20 network evaluations (--study_evaluations), the stochastic dpm++2m-sde at 20, 50 and 100, the ancestral
  sampler at all steps, all at the default guidance scale, each with its Frechet distance to the real test digits and to
  the probability-flow ODE's limit (dpm++3m at 200 steps) and its seconds: solver_table.md;
* `ema_guidance` (issue 16): the default sampling before that study against each part alone (post-hoc EMA lengths,
  autoguidance by an earlier snapshot, dpm++2m/dpm++3m at 10 and 20 steps, also measured against the 1,000-step
  ancestral samples and against the probability-flow ODE solved closely by dpm++2m at 100 steps) and the best cell of a
  sweep over all of them.
Both write sampling_study.json; `ema_guidance` also sampling_study.md. A quick look at a few solvers:

    python scripts/quality_benchmark.py --sampling_study --study_parts solvers --budgets 300 --num_samples 50 \\
        --study_solvers unipc,ipndm --study_spacings logsnr,edm --study_evaluations 10 --study_ancestral none

Needs `pip install scikit-learn diffusers` (benchmark only). `--tool_repo` runs the tool's rows with the code
of another checkout (e.g. an older commit) for before/after tables; `--flat_folder` writes the training digits
as a plain class folder for code that does not know train/ and test/ sub-folders.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 10


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budgets", default="300,600,1200", help="optimizer steps per run, comma-separated")
    parser.add_argument(
        "--rows", default="ours,ours_defaults,diffusers", help="which trainers: ours, ours_defaults, diffusers"
    )
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--model_flags",
        default="--model_size small --base_dim 32",
        help="the tool's architecture flags (diffusers copies them)",
    )
    parser.add_argument(
        "--equal_flags",
        default="--val_fraction 0",
        help="what the `ours` row adds to the defaults so the data is identical",
    )
    parser.add_argument(
        "--defaults_flags", default="", help="what the `ours, defaults` row adds (nothing: the defaults)"
    )
    parser.add_argument("--num_samples", type=int, default=200)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sampling_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--judge_steps", type=int, default=None, help="training steps of the judge (default: derived, ddpm_judge)"
    )
    parser.add_argument("--out", default="quality_bench")
    parser.add_argument(
        "--jobs", type=int, default=1, help="rows trained in parallel processes (the cores are shared out)"
    )
    parser.add_argument("--tool_repo", default=str(REPO), help="checkout whose ddpm_main the tool rows run")
    parser.add_argument(
        "--flat_folder", action="store_true", help="training digits as one class folder (no train/ and test/)"
    )
    parser.add_argument(
        "--sampling_study",
        action="store_true",
        help="instead of the trainer rows: for each budget, train the tool once and compare its default sampling "
        "with post-hoc EMA, autoguidance, the solvers and the sweep's best (issue 16)",
    )
    parser.add_argument(
        "--study_parts",
        default=",".join(STUDY_PARTS),
        help="which parts of --sampling_study: solvers (every solver x spacing x evaluations, solver_table.md), "
        "ema_guidance (post-hoc EMA, autoguidance and their sweep at w=3)",
    )
    parser.add_argument(
        "--study_solvers", default="ddim,dpm++2m,dpm++3m,unipc,ipndm", help="deterministic solvers of the solvers part"
    )
    parser.add_argument("--study_spacings", default="time,logsnr,edm", help="their timestep spacings")
    parser.add_argument("--study_evaluations", default="5,10,20", help="their network evaluations (at most T)")
    parser.add_argument(
        "--study_stochastic", default="dpm++2m-sde", help="stochastic solvers of the solvers part, on their own spacing"
    )
    parser.add_argument(
        "--study_stochastic_evaluations", default="20,50,100", help="their network evaluations (at most T)"
    )
    parser.add_argument(
        "--study_ancestral", default="all", help="the ancestral sampler's evaluations: all (T), none, or a list"
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data


def digits(image_size: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scikit-learn digits as uint8 (N, 1, S, S) upscaled bilinearly, split 75/25 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    pixels = np.clip(data.images * (255 / 16), 0, 255).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(p).resize((image_size, image_size), Image.BILINEAR)) for p in pixels]
    )[:, None]
    train, test = train_test_split(np.arange(len(images)), test_size=0.25, random_state=seed, stratify=data.target)
    return {"train": (images[train], data.target[train]), "test": (images[test], data.target[test])}


def write_folder(splits: dict, root: Path, flat: bool) -> Path:
    """root/train/<digit>/*.png and root/test/<digit>/*.png (grey PNGs), or root/<digit>/*.png of the training
    digits."""
    for split, (images, labels) in splits.items():
        if flat and split == "test":
            continue
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / ("" if flat else split) / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(folder / f"{index:05d}.png")
    return root


# ----------------------------------------------------------------------------- the judge


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images), dtype=torch.float32) / 127.5 - 1


def load_judge(judge_dir: Path, args: argparse.Namespace, report=print):
    """The tool's judge of the digits (ddpm_judge: trained once on the training digits, cached in judge_dir)."""
    from ddpm_judge import load_or_train_judge

    return load_or_train_judge(
        "folder", judge_dir, args.image_size, 1, "cpu", seed=args.seed, steps=args.judge_steps, report=report
    )


def judge_figures(judge, images: np.ndarray, labels: np.ndarray) -> dict:
    """The judge's class accuracy of uint8 images (N, 1, S, S) drawn for `labels`, their Frechet distance to the real
    test digits on its features, and the floor at that count (as many real training digits against the test digits)."""
    figures = judge.figures(images.transpose(0, 2, 3, 1), labels)
    return {
        "class_accuracy": figures["class_accuracy"],
        "frechet_distance": figures["distance"],
        "floor": figures["floor"],
    }


# ----------------------------------------------------------------------------- trainers


def sample_labels(count: int) -> torch.Tensor:
    return torch.arange(count) % NUM_CLASSES


def draw(network: nn.Module, diffusion, channels: int, args: argparse.Namespace) -> np.ndarray:
    """The one sampler every row uses: the tool's sampling path (ddpm_sampling.generate, as --inference draws), guided,
    from the same seed, with the network's own prediction type. A model that turned the grey digits into RGB (the
    tool before 1-channel folders) is judged on the mean of its channels."""
    from ddpm_config import SamplingConfig
    from ddpm_kinds import ImageKind
    from ddpm_runtime import Runtime
    from ddpm_sampling import generate

    kind = ImageKind(channels, args.image_size)
    settings = kind.sampling_settings(
        SamplingConfig(sampler=args.sampler, steps=args.sampling_steps, guidance_scale=args.guidance_scale),
        diffusion.num_timesteps,
    )
    pixels = generate(
        network,
        diffusion,
        kind,
        args.num_samples,
        sample_labels(args.num_samples),
        settings,
        args.seed,
        args.num_samples,
        Runtime(torch.device("cpu")),
        desc="benchmark samples",
    )
    return pixels.float().mean(dim=-1, keepdim=True).round().to(torch.uint8).permute(0, 3, 1, 2).numpy()


def train_ours(steps: int, flags: str, data_dir: Path, work: Path, args: argparse.Namespace) -> tuple:
    """The tool's real training path; returns (its EMA network, its Diffusion, channels, wall seconds, start-up report,
    share of the run outside optimizer steps from its metrics log)."""
    import ddpm_main
    from ddpm_checkpoint import load_model

    command = (
        f"--dataset folder --data_dir {data_dir} --image_size {args.image_size} {args.model_flags} --conditional "
        f"--batch_size {args.batch_size} --lr {args.lr} --max_steps {steps} --seed {args.seed} --device cpu "
        f"--save_model --models_dir {work / 'models'} --save_dir {work / 'outputs'} --run_name run {flags}"
    )
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = ddpm_main.main(shlex.split(command))
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the tool's training failed (exit {code}): {command}")
    metrics = [json.loads(line) for line in (work / "outputs/metrics_run.jsonl").read_text().splitlines()]
    timing = [line for line in metrics if line["kind"] == "end"]  # the whole run's split, written as it ends
    outside = (
        timing[-1]["seconds_outside_steps"] / (timing[-1]["seconds_in_steps"] + timing[-1]["seconds_outside_steps"])
        if timing
        else None
    )
    loaded = load_model(work / "models/run/ckpt.pt")
    report = printed.getvalue() + (
        f"\nshare of the run outside optimizer steps: {outside:.1%}" if outside is not None else ""
    )
    return loaded.model, loaded.diffusion, loaded.description.image_shape[0], seconds, report, outside


class DiffusersNetwork(nn.Module):
    """diffusers' UNet2DModel with the tool's call signature model(x, t, labels) and its null label (the last class)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.null_label = net, NUM_CLASSES

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(x, t, class_labels=labels).sample


def diffusers_network(model_flags: str, image_size: int) -> DiffusersNetwork:
    """diffusers' UNet2DModel with the layout the tool's flags give (ddpm_diffusers.unet2d_config, the export's
    mapping), 1 channel, conditional on 10 classes plus a null class."""
    from diffusers import UNet2DModel

    import ddpm_main
    from ddpm_diffusers import unet2d_config
    from ddpm_model import UNet

    config = ddpm_main.run_config(ddpm_main.build_parser().parse_args(shlex.split(model_flags))).model
    ours = UNet(in_channels=1, image_size=image_size, num_classes=NUM_CLASSES, **config.unet_kwargs(image_size))
    return DiffusersNetwork(UNet2DModel(**unet2d_config(ours.config)))


def train_diffusers(steps: int, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> tuple:
    from diffusers import DDPMScheduler

    from ddpm_diffusion import Diffusion

    torch.manual_seed(args.seed)
    net = diffusers_network(args.model_flags, args.image_size)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    # diffusers' examples/unconditional_image_generation defaults, less its warm-up, LR decay and EMA
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    x_all, y_all = to_float(images), torch.as_tensor(labels)
    started = time.perf_counter()
    net.train()
    order, position = torch.randperm(len(x_all)), 0
    for _ in range(steps):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(x_all)), 0
        batch = order[position : position + args.batch_size]
        position += args.batch_size
        x0, y = x_all[batch], y_all[batch]
        y = torch.where(torch.rand(len(y)) < 0.1, NUM_CLASSES, y)  # classifier-free guidance's null class
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x0),))
        loss = F.mse_loss(net(scheduler.add_noise(x0, noise, t), t, y), noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started
    net.eval()
    return net, Diffusion(1000, "linear"), 1, seconds, "", None


# ----------------------------------------------------------------------------- the table

ROW_NAMES = {"ours": "ours", "ours_defaults": "ours, defaults", "diffusers": "diffusers UNet2DModel + DDPMScheduler"}


def markdown(results: list[dict], classifier_accuracy: float, floor: float, args: argparse.Namespace) -> str:
    lines = [
        f"Class accuracy of guided samples (w={args.guidance_scale:g}, {args.sampler} {args.sampling_steps} steps, "
        f"{args.num_samples} samples) and Frechet distance to the real test digits (the 64-d features of the tool's "
        f"judge; {args.num_samples} real training digits against the test digits: {floor:.2f}); judge's accuracy on "
        f"the real test digits {classifier_accuracy:.3f}.",
        "",
        "| steps | trainer | class accuracy | Frechet distance | training wall s | outside optimizer steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        outside = "-" if row["outside_steps_share"] is None else f"{row['outside_steps_share']:.1%}"
        lines.append(
            f"| {row['steps']} | {ROW_NAMES[row['trainer']]} | {row['class_accuracy']:.3f} | "
            f"{row['frechet_distance']:.2f} | {row['train_seconds']:.0f} | {outside} |"
        )
    return "\n".join(lines) + "\n"


def run_row(
    steps: int, trainer: str, args: argparse.Namespace, splits: dict, data_dir: Path, out: Path, judge_dir: Path
) -> tuple[dict, str]:
    """Train one row's model for `steps`, sample it, judge the samples; (the row, the tool's start-up report)."""
    if args.jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        sys.path.insert(0, args.tool_repo)
    judge = load_judge(judge_dir, args, report=lambda line: None)  # the cached judge
    if trainer == "diffusers":
        network, diffusion, channels, seconds, report, outside = train_diffusers(steps, *splits["train"], args)
    else:
        flags = args.equal_flags if trainer == "ours" else args.defaults_flags
        network, diffusion, channels, seconds, report, outside = train_ours(
            steps, flags, data_dir, out / f"{trainer}_{steps}", args
        )
    with torch.no_grad():
        samples = draw(network, diffusion, channels, args)
    row = {
        "steps": steps,
        "trainer": trainer,
        "train_seconds": seconds,
        "outside_steps_share": outside,
        **judge_figures(judge, samples, sample_labels(args.num_samples).numpy()),
    }
    size, rows = args.image_size, max(1, min(4, args.num_samples // NUM_CLASSES))  # one column per class
    grid = samples[: rows * NUM_CLASSES, 0].reshape(rows, NUM_CLASSES, size, size).transpose(0, 2, 1, 3)
    Image.fromarray(grid.reshape(rows * size, NUM_CLASSES * size)).save(out / f"samples_{trainer}_{steps}.png")
    return row, report if steps == int(args.budgets.split(",")[0]) else ""


# ----------------------------------------------------------------------------- the sampling study

STUDY_EMAS = (0.05, 0.10, 0.15, 0.20)  # post-hoc EMA lengths tried (EDM2's range)
STUDY_CFG_SCALES, STUDY_AUTO_SCALES = (1.0, 2.0, 3.0), (1.5, 2.0, 3.0)
STUDY_SOLVER = ("dpm++3m", 20)  # the sweep's solver
ODE_REFERENCE = (
    "dpm++2m",
    100,
)  # the probability-flow ODE solved closely: what the ODE solvers converge to as steps grow
ODE_LIMIT = (
    "dpm++3m",
    200,
)  # the solvers part's ODE limit, closer still (dpm++3m is 4.6 times closer than 2m at 20 steps)
STUDY_PARTS = ("solvers", "ema_guidance")
GUIDE_FRACTION = 4  # autoguidance's guide: the run's sigma_rel 0.10 EMA at a quarter of its steps (an earlier snapshot)


def study_draw(
    model: nn.Module,
    diffusion,
    channels: int,
    args: argparse.Namespace,
    sampler: str,
    steps: int,
    scale: Optional[float],
    guide: Optional[nn.Module] = None,
    spacing: Optional[str] = None,
) -> tuple[np.ndarray, float]:
    """Guided samples of one setting through the tool's sampling path, and the seconds they took; `scale` None: the
    default guidance scale of images, `spacing` None: the sampler's own."""
    from ddpm_config import SamplingConfig
    from ddpm_kinds import ImageKind
    from ddpm_runtime import Runtime
    from ddpm_sampling import generate

    kind = ImageKind(channels, args.image_size)
    settings = kind.sampling_settings(
        SamplingConfig(sampler=sampler, steps=steps, guidance_scale=scale, timestep_spacing=spacing),
        diffusion.num_timesteps,
    )
    started = time.perf_counter()
    pixels = generate(
        model,
        diffusion,
        kind,
        args.num_samples,
        sample_labels(args.num_samples),
        settings,
        args.seed,
        args.num_samples,
        Runtime(torch.device("cpu")),
        desc="study",
        guide=guide,
    )
    return pixels.permute(0, 3, 1, 2).numpy(), time.perf_counter() - started


def features_of(judge, images: np.ndarray) -> tuple:
    """The judge's feature statistics (mean, covariance) of uint8 images (N, 1, S, S)."""
    from ddpm_metrics import feature_statistics

    return feature_statistics(judge.features(images.transpose(0, 2, 3, 1)))


class StudyRows:
    """The rows of one budget's study: each setting's judged figures, its distances to the reference samples taken so
    far (`references`: name -> feature statistics) and its seconds."""

    def __init__(self, steps: int, judge, labels: np.ndarray):
        self.steps, self.judge, self.labels = steps, judge, labels
        self.rows: list[dict] = []
        self.references: dict[str, tuple] = {}

    def add(self, name: str, part: str, images: np.ndarray, seconds: float, **setting) -> dict:
        from ddpm_metrics import frechet_distance

        row = {
            "steps": self.steps,
            "part": part,
            "setting": name,
            **setting,
            "sampling_seconds": round(seconds, 1),
            **judge_figures(self.judge, images, self.labels),
        }
        statistics = features_of(self.judge, images)
        row |= {
            f"distance_to_{key}": frechet_distance(*statistics, *reference)
            for key, reference in self.references.items()
        }
        self.rows.append(row)
        print(json.dumps(row))
        return row


def sampling_study(steps: int, args: argparse.Namespace, data_dir: Path, out: Path, judge) -> list[dict]:
    """One run of the tool (its defaults, --save_model: post-hoc EMA snapshots), then the --study_parts: `solver_part`
    and `ema_guidance_part`."""
    from ddpm_checkpoint import load_model

    work = out / f"study_{steps}"
    model, diffusion, channels, train_seconds, _, _ = train_ours(steps, args.equal_flags, data_dir, work, args)
    loaded = load_model(work / "models/run/ckpt.pt")
    parts = args.study_parts.split(",")
    rows = []
    if "solvers" in parts:
        rows += solver_part(
            StudyRows(steps, judge, sample_labels(args.num_samples).numpy()), model, diffusion, channels, args
        )
    if "ema_guidance" in parts:
        rows += ema_guidance_part(
            StudyRows(steps, judge, sample_labels(args.num_samples).numpy()),
            model,
            diffusion,
            channels,
            args,
            loaded,
            work / "models/run",
        )
    for row in rows:
        row["train_seconds"] = round(train_seconds, 1)
    return rows


def counts(text: str, num_timesteps: int) -> list[int]:
    """Comma-separated evaluation counts, at most T each, without repeats."""
    return list(dict.fromkeys(min(int(count), num_timesteps) for count in text.split(",") if count))


def solver_part(study: StudyRows, model: nn.Module, diffusion, channels: int, args: argparse.Namespace) -> list[dict]:
    """Every deterministic solver (--study_solvers) on every spacing (--study_spacings) at each --study_evaluations, the
    stochastic ones (--study_stochastic) at --study_stochastic_evaluations and the ancestral sampler (--study_ancestral:
    all T steps), all at the default guidance scale of images; each judged by its Frechet distance to the real test
    digits and to the probability-flow ODE's limit (ODE_LIMIT, solved first), with its seconds."""
    T = diffusion.num_timesteps

    def draw(sampler, count, spacing=None):
        return study_draw(model, diffusion, channels, args, sampler, count, None, spacing=spacing)

    limit_sampler, limit_steps = ODE_LIMIT[0], min(ODE_LIMIT[1], T)
    images, seconds = draw(limit_sampler, limit_steps)
    study.add(
        f"{limit_sampler} {limit_steps} steps (the ODE limit)",
        "ode limit",
        images,
        seconds,
        solver=limit_sampler,
        spacing="logsnr",
        evaluations=limit_steps,
    )
    study.references["ode_limit"] = features_of(study.judge, images)
    settings = [
        (solver, spacing, count)
        for solver in args.study_solvers.split(",")
        if solver
        for spacing in args.study_spacings.split(",")
        for count in counts(args.study_evaluations, T)
    ]
    settings += [
        (solver, None, count)
        for solver in args.study_stochastic.split(",")
        if solver
        for count in counts(args.study_stochastic_evaluations, T)
    ]
    if args.study_ancestral != "none":
        settings += [
            ("ddpm", None, count)
            for count in counts(str(T) if args.study_ancestral == "all" else args.study_ancestral, T)
        ]
    for solver, spacing, count in settings:
        images, seconds = draw(solver, count, spacing)
        shown = spacing or ("time" if solver == "ddpm" else sampler_spacing(solver))
        study.add(
            f"{solver}, {shown}, {count}",
            "solver grid",
            images,
            seconds,
            solver=solver,
            spacing=shown,
            evaluations=count,
        )
    return study.rows


def sampler_spacing(name: str) -> str:
    """A sampler's own timestep spacing (ddpm_samplers.Sampler.default_spacing)."""
    from ddpm_samplers import sampler_class

    return sampler_class(name).default_spacing


def ema_guidance_part(
    study: StudyRows, model: nn.Module, diffusion, channels: int, args: argparse.Namespace, loaded, run: Path
) -> list[dict]:
    """Issue 16's comparison: the default sampling before that study (--inference's ddpm sampler over all 1,000 steps, w
    = 3, the checkpoint's EMA); each part alone (the best post-hoc EMA length, the best autoguidance scale with an
    earlier snapshot as the guide, dpm++2m and dpm++3m at 10 and 20 steps, also judged by their distance to the
    1,000-step samples and to the ODE_REFERENCE samples); and the best cell of the sweep over EMA x guidance x scale
    (dpm++3m 20)."""
    from ddpm_checkpoint import build_network
    from ddpm_phema import reconstruct_from_folder

    def network(weights: dict) -> nn.Module:
        net = build_network(loaded.description)
        net.load_state_dict(weights)
        return net.eval()

    steps = study.steps
    emas = {"ema": model} | {f"{s:.2f}": network(reconstruct_from_folder(run / "phema", s)) for s in STUDY_EMAS}
    guide = network(reconstruct_from_folder(run / "phema", 0.10, target_t=steps // GUIDE_FRACTION))
    images, seconds = study_draw(model, diffusion, channels, args, "ddpm", diffusion.num_timesteps, 3.0)
    study.add("ddpm 1000 steps, w=3 CFG, EMA (the default until w=1.5)", "default", images, seconds)
    study.references["1000_steps"] = features_of(study.judge, images)
    ode_sampler, ode_steps = ODE_REFERENCE[0], min(ODE_REFERENCE[1], diffusion.num_timesteps)
    images, seconds = study_draw(model, diffusion, channels, args, ode_sampler, ode_steps, 3.0)
    study.add(f"{ode_sampler} {ode_steps} steps, w=3 CFG, EMA (the ODE reference)", "ode reference", images, seconds)
    study.references["ode"] = features_of(study.judge, images)
    for sampler in ("dpm++2m", "dpm++3m"):
        for count in (10, 20):
            study.add(
                f"{sampler} {count} steps, w=3 CFG, EMA",
                "solver",
                *study_draw(model, diffusion, channels, args, sampler, count, 3.0),
            )
    sweep_started = time.perf_counter()
    cells = [(ema, "cfg", w) for ema in emas for w in STUDY_CFG_SCALES] + [
        (ema, "auto", w) for ema in emas for w in STUDY_AUTO_SCALES
    ]
    for ema, kind, w in cells:
        images, seconds = study_draw(
            emas[ema], diffusion, channels, args, *STUDY_SOLVER, w, guide if kind == "auto" else None
        )
        study.add(
            f"EMA {ema}, {kind} w={w:g}, {STUDY_SOLVER[0]} {STUDY_SOLVER[1]}",
            "sweep",
            images,
            seconds,
            ema=ema,
            guidance=kind,
            scale=w,
        )
    sweep_seconds = time.perf_counter() - sweep_started
    sweep = [row for row in study.rows if row["part"] == "sweep"]
    for part, chosen in (
        ("post-hoc EMA alone (CFG w=3)", [r for r in sweep if r["guidance"] == "cfg" and r["scale"] == 3.0]),
        ("autoguidance alone (EMA)", [r for r in sweep if r["guidance"] == "auto" and r["ema"] == "ema"]),
        ("the sweep's best", sweep),
    ):
        best = min(chosen, key=lambda r: r["frechet_distance"])
        study.rows.append(
            {**best, "part": part, "sweep_seconds": round(sweep_seconds, 1) if part == "the sweep's best" else None}
        )
    return study.rows


def solver_markdown(rows: list[dict], guidance_scale: float) -> str:
    """The solvers part as a table: solver, spacing, evaluations, distance to the data, to the ODE limit, seconds."""
    lines = [
        f"Guided samples at the default guidance scale (w = {guidance_scale:g}); Frechet distance on the judge's "
        "features.",
        "",
        "| budget | solver | spacing | evaluations | distance to data | distance to the ODE limit | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["part"] not in ("ode limit", "solver grid"):
            continue
        to_limit = "(the limit)" if row["part"] == "ode limit" else f"{row['distance_to_ode_limit']:.3f}"
        lines.append(
            f"| {row['steps']} | {row['solver']} | {row['spacing']} | {row['evaluations']} | "
            f"{row['frechet_distance']:.2f} | {to_limit} | {row['sampling_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def study_markdown(rows: list[dict]) -> str:
    lines = [
        "| steps | part | setting | class accuracy | Frechet distance | distance to 1000 steps | distance to the ODE "
        "| sampling s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["part"] in ("sweep", "ode limit", "solver grid"):
            continue
        to_references = [row.get(key) for key in ("distance_to_1000_steps", "distance_to_ode")]
        lines.append(
            f"| {row['steps']} | {row['part']} | {row['setting']} | {row['class_accuracy']:.3f} | "
            f"{row['frechet_distance']:.2f} | "
            + " | ".join("-" if value is None else f"{value:.2f}" for value in to_references)
            + f" | {row['sampling_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, args.tool_repo)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    splits = digits(args.image_size, args.seed)
    data_dir = write_folder(splits, out / "digits", args.flat_folder)
    judge_dir = (
        write_folder(splits, out / "digits_judged", flat=False) if args.flat_folder else data_dir
    )  # the real test split
    judge = load_judge(judge_dir, args)
    if judge is None:
        raise SystemExit("the digits have no judge (see the line above)")
    accuracy, floor = judge.test_accuracy, judge.floor(args.num_samples)
    print(
        f"judge: {accuracy:.3f} on the {len(splits['test'][1])} real test digits; {args.num_samples} real training "
        f"digits against the test digits: Frechet distance {floor:.2f} (the floor)"
    )

    if args.sampling_study:
        rows = [
            row
            for steps in (int(b) for b in args.budgets.split(","))
            for row in sampling_study(steps, args, data_dir, out, judge)
        ]
        (out / "sampling_study.json").write_text(
            json.dumps({"config": vars(args), "train_vs_test_frechet": floor, "rows": rows}, indent=2)
        )
        from ddpm_config import GUIDANCE_SCALE

        if "ema_guidance" in args.study_parts.split(","):
            (out / "sampling_study.md").write_text(study_markdown(rows))
            print(study_markdown(rows), end="")
        if "solvers" in args.study_parts.split(","):
            (out / "solver_table.md").write_text(solver_markdown(rows, GUIDANCE_SCALE))
            print(solver_markdown(rows, GUIDANCE_SCALE), end="")
        return 0
    jobs = [(steps, trainer) for steps in (int(b) for b in args.budgets.split(",")) for trainer in args.rows.split(",")]
    shared = (args, splits, data_dir, out, judge_dir)
    if args.jobs == 1:
        outcomes = [run_row(steps, trainer, *shared) for steps, trainer in jobs]
    else:  # rows in parallel processes, the cores shared out between them (each trains with its own seeds, as alone)
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcomes = list(pool.map(run_row, *zip(*jobs), *([item] * len(jobs) for item in shared)))
    results = []
    for row, report in outcomes:
        results.append(row)
        print(json.dumps(row))
        if report:
            print(report.strip())
    table = markdown(results, accuracy, floor, args)
    (out / "quality_benchmark.md").write_text(table)
    (out / "quality_benchmark.json").write_text(
        json.dumps(
            {"config": vars(args), "judge_test_accuracy": accuracy, "train_vs_test_frechet": floor, "results": results},
            indent=2,
        )
    )
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
