"""The judge: a small CNN classifier trained on the data set itself, whose figures measure samples of that data.

    judge = load_or_train_judge("cifar10", "data", 32, 3, "cuda")  # None (one line says why) for data without one
    figures = judge.figures(images, labels)  # uint8 images (N, H, W, C), int labels (N,) or None

Inception features (FID) were learnt on ImageNet photos and are a poor fit for digits, crops of other photos or
anything far from ImageNet; a classifier trained on the run's own data knows its classes. Its figures:

* class accuracy: the share of guided samples it puts in the class they were drawn for, overall and per class. Its
  own accuracy on the real test images is the ceiling of what it can tell, and is given with every figure;
* the Frechet distance (the FID formula, ddpm_metrics.frechet_distance) between its penultimate features of the
  samples and of the real test images, with the floor beside it: the same distance from as many real training
  images (at most all of them; the mean over FLOOR_DRAWS random choices) to the test images. Both are biased upwards
  at small sample counts, alike, so the floor is what samples as good as the data get at that count. Neither is
  comparable to published FIDs.

The judge is trained once (seeded; random flips where the data set flips, small random translations everywhere;
JUDGE_EPOCHS over the training split, within [MIN_STEPS, MAX_STEPS] steps) on the training split of
ddpm_data.load_datasets (the default 10% validation share held out and unused, seed 0), tested on its test split,
and cached in <data_dir>/judge_<dataset>_<size>px_<channels>ch_seed<seed>.pt with a description of that data
(dataset, image size, channels, class names, numbers of images, seed, training steps), beside the FID statistics.
A cache that does not describe the data, or that cannot be read, is retrained (one line says why). A data set
without classes, or with too few images per class, has no judge (one line says why).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpm_config import UsageError, first_line
from ddpm_data import DataSplits, load_datasets
from ddpm_metrics import feature_statistics, frechet_distance
from ddpm_outputs import atomic_write

FEATURE_DIM = 64  # of the penultimate features the distance is measured on
JUDGE_EPOCHS, MIN_STEPS, MAX_STEPS = 30, 600, 8000
JUDGE_BATCH, JUDGE_LR, JUDGE_WEIGHT_DECAY = 128, 3e-3, 5e-4
MIN_TRAIN_PER_CLASS, MIN_TEST_PER_CLASS = 20, 5
JUDGE_VAL_FRACTION = 0.1  # the tool's default validation share: the judge trains on the default training split
RECIPE = 1  # bumped when the network or its training changes, so older caches are retrained
FLOOR_DRAWS, FLOOR_SEED = 10, 0  # the floor at N is the mean over this many random choices of N training images


class JudgeNet(nn.Module):
    """Conv-BN-ReLU stages of 32, 64, 128, 128, ... channels, halving the size until it is about 4, then a 2x2
    average pool, a FEATURE_DIM-d ReLU layer (the features) and the class logits."""

    def __init__(self, channels: int, image_size: int, num_classes: int):
        super().__init__()
        pools = max(1, int(math.log2(image_size / 4)))
        layers: list[nn.Module] = []
        width_in = channels
        for stage in range(pools + 1):
            width = min(32 * 2**stage, 128)
            layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if stage < pools else []
            width_in = width
        self.trunk = nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width_in, FEATURE_DIM), nn.ReLU()
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] (N, C, H, W) -> (features (N, FEATURE_DIM), logits (N, classes))."""
        features = self.trunk(x)
        return features, self.head(features)


def training_steps(num_images: int) -> int:
    """JUDGE_EPOCHS passes over the training images, within [MIN_STEPS, MAX_STEPS]: about 10,500 steps for CIFAR-10's
    45,000 images are cut to 8,000 (0.14 s a step at 32x32 on one CPU thread, about 18 minutes; not yet timed on a
    GPU); 600 for the 1,213 digits of the benchmark (about 20 s on one CPU thread)."""
    return int(min(MAX_STEPS, max(MIN_STEPS, round(JUDGE_EPOCHS * num_images / JUDGE_BATCH))))


def describe(dataset: str, data: DataSplits, seed: int, steps: int) -> dict:
    """What a cached judge was trained on; a cache is used only for data with this exact description."""
    return {
        "dataset": dataset,
        "image_size": data.image_size,
        "channels": data.channels,
        "class_names": list(data.class_names),
        "train_images": len(data.train),
        "test_images": len(data.test),
        "seed": seed,
        "steps": steps,
        "hflip": data.train.hflip,
        "recipe": RECIPE,
    }


def judge_path(data_dir: str | Path, dataset: str, image_size: int, channels: int, seed: int) -> Path:
    return Path(data_dir) / f"judge_{dataset}_{image_size}px_{channels}ch_seed{seed}.pt"


def why_no_judge(data: DataSplits) -> str | None:
    """Why this data set cannot have a judge, or None."""
    if data.num_classes < 2:
        return "the data set has no classes (a single class folder), so no judge classifier"
    train_counts = torch.bincount(data.train.labels, minlength=data.num_classes)
    test_counts = torch.bincount(data.test.labels, minlength=data.num_classes)
    for name, train_count, test_count in zip(data.class_names, train_counts.tolist(), test_counts.tolist()):
        if train_count < MIN_TRAIN_PER_CLASS or test_count < MIN_TEST_PER_CLASS:
            return (
                f"class {name!r} has {train_count} training and {test_count} test images; a judge needs at least "
                f"{MIN_TRAIN_PER_CLASS} and {MIN_TEST_PER_CLASS} per class"
            )
    return None


@dataclass
class Judge:
    """A trained judge on `device`, with what its figures need: its test accuracy, the statistics of its features of
    the test images (the reference of the distance) and its features of the training images (the floor)."""

    net: JudgeNet
    description: dict
    test_accuracy: float
    test_mu: np.ndarray
    test_sigma: np.ndarray
    train_features: np.ndarray  # float32 (training images, FEATURE_DIM)
    device: str
    path: Path | None = None  # its cache file

    @property
    def class_names(self) -> list[str]:
        return self.description["class_names"]

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, torch.Tensor]:
        """Features (float64, N x FEATURE_DIM) and logits (N x classes) of uint8 images (N, C, H, W)."""
        features, logits = [], []
        for batch in images.split(batch_size):
            batch_features, batch_logits = self.net(batch.to(self.device).float() / 127.5 - 1)
            features.append(batch_features.double().cpu())
            logits.append(batch_logits.float().cpu())
        return torch.cat(features).numpy(), torch.cat(logits)

    def features(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Features of uint8 images (N, H, W, C)."""
        return self.features_and_logits(self._as_nchw(images))[0]

    def floor(self, count: int) -> float | None:
        """The distance from `count` real training images to the test images, the mean over FLOOR_DRAWS fixed random
        choices of them (one distance alone varies by a factor 2 at 200 digits); all of them if there are fewer.
        What samples as good as the data get at that count; None below 2 images."""
        count = min(count, len(self.train_features))
        if count < 2:
            return None
        generator = torch.Generator().manual_seed(FLOOR_SEED)
        draws = 1 if count == len(self.train_features) else FLOOR_DRAWS
        distances = []
        for _ in range(draws):
            chosen = torch.randperm(len(self.train_features), generator=generator)[:count].numpy()
            mu, sigma = feature_statistics(self.train_features[chosen].astype(np.float64))
            distances.append(frechet_distance(mu, sigma, self.test_mu, self.test_sigma))
        return float(np.mean(distances))

    def figures(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None) -> dict:
        """The judge's figures of uint8 images (N, H, W, C) drawn for `labels` (None: unconditional samples, no class
        accuracy): class accuracy overall and per class, the distance to the test images and its floor at N."""
        features, logits = self.features_and_logits(self._as_nchw(images))
        count = len(features)
        figures = {
            "test_accuracy": self.test_accuracy,
            "num_samples": count,
            "class_accuracy": None,
            "per_class_accuracy": None,
            "distance": None,
            "floor": self.floor(count),
            "feature_dim": FEATURE_DIM,
            "cache": None if self.path is None else str(self.path),
        }
        if count >= 2:
            figures["distance"] = frechet_distance(*feature_statistics(features), self.test_mu, self.test_sigma)
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
            correct = (logits.argmax(dim=1) == labels).double()
            figures["class_accuracy"] = correct.mean().item()
            figures["per_class_accuracy"] = {
                name: correct[labels == index].mean().item() if (labels == index).any() else None
                for index, name in enumerate(self.class_names)
            }
        return figures

    def _as_nchw(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        images = torch.as_tensor(np.asarray(images))
        expected = (self.description["image_size"], self.description["image_size"], self.description["channels"])
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UsageError(
                f"the judge of {self.description['dataset']} takes uint8 images (N, {', '.join(map(str, expected))}), "
                f"not {images.dtype} {tuple(images.shape)}"
            )
        return images.permute(0, 3, 1, 2)


def describe_figures(figures: dict) -> str:
    """One line of the judge's figures, its test accuracy (the ceiling of what it can tell) always beside them."""
    parts = []
    if figures["class_accuracy"] is not None:
        parts.append(f"class accuracy {figures['class_accuracy']:.3f}")
    if figures["distance"] is not None:
        parts.append(f"distance {figures['distance']:.3f} (floor {figures['floor']:.3f})")
    return (
        f"judge {', '.join(parts) or 'none'} on {figures['num_samples']} samples "
        f"(its test accuracy {figures['test_accuracy']:.3f}: the ceiling)"
    )


def translate(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image (N, C, H, W) by its own random whole number of pixels in [-max_shift, max_shift] along each
    axis, repeating the edge pixels into the space it leaves."""
    n, _, height, width = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    rows = torch.arange(height, device=x.device) + max_shift - shifts[0][:, None]  # (N, H)
    columns = torch.arange(width, device=x.device) + max_shift - shifts[1][:, None]  # (N, W)
    picked = padded[
        torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], columns[:, None, :]
    ]  # (N, H, W, C)
    return picked.permute(0, 3, 1, 2)


def fit(
    net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, *, hflip: bool, steps: int, seed: int, device: str
) -> None:
    """Train with AdamW, a 5% linear warm-up then a cosine decay to 0, on batches drawn (and augmented) from a CPU
    generator seeded with `seed`: the same seed gives the same judge on one device."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    max_shift = max(1, images.shape[-1] // 16)
    optimizer = torch.optim.AdamW(net.parameters(), lr=JUDGE_LR, weight_decay=JUDGE_WEIGHT_DECAY)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
    )
    net.train()
    order, position = torch.randperm(len(labels), generator=generator), 0
    for _ in tqdm(range(steps), desc="training the judge (once)", unit="step"):
        if position + JUDGE_BATCH > len(order):
            order, position = torch.randperm(len(labels), generator=generator), 0
        batch = order[position : position + JUDGE_BATCH].to(device)
        position += JUDGE_BATCH
        x = translate(images[batch].float() / 127.5 - 1, max_shift, generator)
        if hflip:
            flip = (torch.rand(len(batch), generator=generator) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(net(x)[1], labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()


def train_judge(dataset: str, data: DataSplits, device: str, *, seed: int = 0, steps: int | None = None) -> Judge:
    """A judge trained on data.train and measured on data.test (not cached: see load_or_train_judge)."""
    steps = steps or training_steps(len(data.train))
    with torch.random.fork_rng(devices=[]):  # the initial weights from `seed`, leaving the caller's random state alone
        torch.manual_seed(seed)
        net = JudgeNet(data.channels, data.image_size, data.num_classes)
    net = net.to(device)
    fit(net, data.train.images, data.train.labels, hflip=data.train.hflip, steps=steps, seed=seed, device=device)
    judge = Judge(net, describe(dataset, data, seed, steps), math.nan, np.zeros(0), np.zeros(0), np.zeros(0), device)
    test_features, test_logits = judge.features_and_logits(data.test.images)
    judge.test_accuracy = (test_logits.argmax(dim=1) == data.test.labels).double().mean().item()
    judge.test_mu, judge.test_sigma = feature_statistics(test_features)
    judge.train_features = judge.features_and_logits(data.train.images)[0].astype(np.float32)
    return judge


def save_judge(judge: Judge, path: Path) -> None:
    """The network's weights and everything its figures need, with the description of its data (atomic)."""
    state = {
        "description": judge.description,
        "state_dict": {k: v.cpu() for k, v in judge.net.state_dict().items()},
        "test_accuracy": judge.test_accuracy,
        "test_mu": torch.from_numpy(judge.test_mu),
        "test_sigma": torch.from_numpy(judge.test_sigma),
        "train_features": torch.from_numpy(judge.train_features),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    judge.path = path


def read_judge(path: Path, expected: dict, device: str) -> tuple[Judge | None, str | None]:
    """(the cached judge, None) when `path` holds one for data described by `expected`; else (None, why not),
    the reason None when there is no file."""
    if not path.is_file():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        description = state["description"]
    except Exception as error:
        return None, f"judge cache {path} is unreadable ({first_line(error) or type(error).__name__})"
    if description != expected:
        differing = [key for key in expected if description.get(key) != expected[key]]
        shown = ", ".join(f"{key} {description.get(key)!r} not {expected[key]!r}" for key in differing)
        return None, f"judge cache {path} was trained on other data ({shown[:300]})"
    net = JudgeNet(expected["channels"], expected["image_size"], len(expected["class_names"]))
    try:
        net.load_state_dict(state["state_dict"])
        arrays = [state[key].numpy() for key in ("test_mu", "test_sigma", "train_features")]
    except Exception as error:
        return None, f"judge cache {path} is unreadable ({first_line(error) or type(error).__name__})"
    return Judge(net.to(device).eval(), description, float(state["test_accuracy"]), *arrays, device, path), None


def load_or_train_judge(
    dataset: str,
    data_dir: str | Path,
    image_size: int,
    channels: int,
    device: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    report: Callable[[str], None] = print,
) -> Judge | None:
    """The judge of a data set: read from its cache, else trained and cached; None (one line through `report` saying
    why) for a data set that cannot have one. A cache of other data, or a cut-short one, is retrained (one line)."""
    data = load_datasets(dataset, data_dir, image_size, seed=0, channels=channels, val_fraction=JUDGE_VAL_FRACTION)
    reason = why_no_judge(data)
    if reason is not None:
        report(f"no judge for {dataset}: {reason}; class accuracy and the judge's distance not measured")
        return None
    path = judge_path(data_dir, dataset, data.image_size, data.channels, seed)
    steps = steps or training_steps(len(data.train))
    judge, problem = read_judge(path, describe(dataset, data, seed, steps), device)
    if judge is not None:
        report(f"judge: {path} (test accuracy {judge.test_accuracy:.3f} on {len(data.test)} test images)")
        return judge
    if problem is not None:
        report(f"{problem}: retraining it")
    judge = train_judge(dataset, data, device, seed=seed, steps=steps)
    save_judge(judge, path)
    report(
        f"judge trained for {steps} steps on {len(data.train)} {dataset} images: "
        f"test accuracy {judge.test_accuracy:.3f} "
        f"on {len(data.test)} test images; cached in {path}"
    )
    return judge


def judge_of_model_data(
    data: dict, data_dir: str | Path, device: str, report: Callable[[str], None] = print
) -> Judge | None:
    """The judge of the data a checkpoint was trained on (its description's `data`: dataset, image_size, channels,
    class_names), or None with one line saying why; a judge whose classes are not the model's is not used."""
    judge = load_or_train_judge(data["dataset"], data_dir, data["image_size"], data["channels"], device, report=report)
    if judge is not None and judge.class_names != list(data["class_names"]):
        report(
            f"no judge: the classes of {data['dataset']} in {data_dir} "
            f"({', '.join(judge.class_names)[:200]}) are not the "
            f"model's ({', '.join(data['class_names'])[:200]}); class accuracy and the judge's distance not measured"
        )
        return None
    return judge
