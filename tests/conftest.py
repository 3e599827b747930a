"""Fixtures and helpers shared by the test modules (no test module imports another).

* Every test process computes on one CPU thread, and so do the processes it starts (OMP_NUM_THREADS, unless set):
  the tests run tiny networks, where a second intra-op thread gains little and, on a machine whose cores are shared,
  waits for a descheduled partner (measured with other load: two 3-step training runs took 14 s on one thread, 160 s
  on two).
* run_cli runs the command line in-process; trained_runs / trained_workspace share two tiny trained runs.
* Analytic noise predictors (GaussianMixtureNoise) for the diffusion and sampler tests.
* Small data sets in their real on-disk formats.
"""

import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
import struct
import zipfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in every process a test starts

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_main
from ddpm_config import SamplingConfig, UsageError
from ddpm_diffusion import Diffusion

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1)

REPO = Path(__file__).resolve().parent.parent


def run_cli(command: str, cwd: Path) -> int:
    """Run ddpm_main in-process from `cwd`, as `python ddpm_main.py <command>` would; return its exit code."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return ddpm_main.main(shlex.split(command))
    finally:
        os.chdir(previous)


def usage_error(call, *args, **kwargs) -> str:
    """Run call expecting a UsageError; return its message, which must be one line."""
    with pytest.raises(UsageError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) by relative path, with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tensor_reads(monkeypatch) -> dict:
    """Counts the reads of a tensor's value on the host (.item(), .tolist(), bool(), float(), int()): on a GPU
    each one waits for all queued work. The count is in the returned dict's "count"; set it to 0 to restart."""
    reads = {"count": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


# Two tiny runs trained once per test session: models/U (unconditional) and models/C (conditional), 3 steps each on
# 16x16 synthetic images, with their outputs in out_U/ and out_C/. Tests that only read them take `trained_runs`
# (which fails the test that writes into it); tests that write (inference outputs, extra files) take
# `trained_workspace`, their own copy, so every test passes alone and in any order.

TINY = (
    "--dataset synthetic --image_size 16 --model_size tiny --timesteps 20 --batch_size 16 --warmup_steps 1 "
    "--log_interval 1 --num_samples 4"
)


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    assert run_cli(f"{TINY} --max_steps 3 --save_model --run_name U --save_dir out_U", root) == 0
    assert (
        run_cli(
            f"{TINY} --max_steps 3 --save_model --run_name C --save_dir out_C --conditional --p_uncond 0.2 --lr 0.003",
            root,
        )
        == 0
    )
    return root


# A 2D run trained once per session (models/moons, outputs in out_moons/), to read only: 150 steps of the MLP on the
# moons, conditional, sampled at the derived w = 1 (measured: sliced Wasserstein 0.119 against a floor of 0.068 at 500
# samples).
MOONS = (
    "--dataset moons --model_size mlp --mlp_width 64 --conditional --batch_size 256 --lr 3e-3 --timesteps 100 "
    "--num_samples 500 --seed 0"
)


@pytest.fixture(scope="session")
def trained_moons(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moons")
    assert (
        run_cli(f"{MOONS} --max_steps 150 --sample_every 1 --save_model --run_name moons --save_dir out_moons", root)
        == 0
    )
    return root


@pytest.fixture
def trained_runs(trained_template) -> Path:
    """The shared trained runs, to read only."""
    before = tree_fingerprint(trained_template)
    yield trained_template
    assert tree_fingerprint(trained_template) == before, (
        "this test wrote into the shared runs: give it trained_workspace"
    )


@pytest.fixture
def trained_workspace(trained_template, tmp_path) -> Path:
    """This test's own copy of the trained runs, to write into."""
    return Path(shutil.copytree(trained_template, tmp_path / "workspace"))


def write_random_checkpoint(path: Path, conditional: bool) -> None:
    """A tiny 16x16 model for the synthetic data set in the checkpoint format, with random weights
    (perturbed so that its output, and its conditional and unconditional branches, differ), at training step 3."""
    from ddpm_checkpoint import save_checkpoint
    from ddpm_data import SYNTHETIC_CLASS_NAMES
    from ddpm_model import UNet, preset_config

    torch.manual_seed(0)
    model = UNet(in_channels=3, image_size=16, num_classes=10 if conditional else None, **preset_config("tiny", 16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_checkpoint(
        {
            "model_config": model.config,
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "diffusion": {"timesteps": 20, "schedule": "linear"},
            "conditional": conditional,
            "data": {
                "dataset": "synthetic",
                "class_names": list(SYNTHETIC_CLASS_NAMES),
                "image_size": 16,
                "channels": 3,
            },
            "train_state": {"step": 3},
            "config": {},
        },
        path,
    )


# Analytic noise predictors: the exact E[eps | x_t] for a data distribution we know (a point mass, a Gaussian, a
# Gaussian mixture), so a correct sampler must return that distribution.


class GaussianMixtureNoise:
    """Exact E[eps | x_t, class] for data x_0 ~ sum_k w_k N(means[k], std^2), elementwise.

    With a label k the data is the k-th component alone; the null label (or labels=None)
    means the whole mixture, so this is also a perfect classifier-free-guidance model.
    """

    def __init__(self, diffusion: Diffusion, means: list[float], std: float, weights: list[float] | None = None):
        self.diffusion = diffusion
        self.means = torch.tensor(means, dtype=torch.float64)
        self.std = std
        self.weights = torch.tensor(weights or [1 / len(means)] * len(means), dtype=torch.float64)
        self.num_classes = len(means)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x64 = x.double()
        alpha_bar = self.diffusion.alphas_cumprod.double()[t].reshape(-1, *[1] * (x.ndim - 1))
        variance = alpha_bar * self.std**2 + 1 - alpha_bar
        centres = alpha_bar.sqrt().unsqueeze(-1) * self.means  # (B, 1, ..., K)
        log_resp = self.weights.log() - (x64.unsqueeze(-1) - centres) ** 2 / (2 * variance.unsqueeze(-1))
        resp = torch.softmax(log_resp, dim=-1)
        if labels is not None:
            conditional = labels != self.num_classes
            one_hot = torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1), self.num_classes).double()
            one_hot = one_hot.reshape(-1, *[1] * (x.ndim - 1), self.num_classes)
            resp = torch.where(conditional.reshape(-1, *[1] * x.ndim), one_hot, resp)
        mean_x_t = (resp * centres).sum(-1)
        return ((1 - alpha_bar).sqrt() * (x64 - mean_x_t) / variance).to(x.dtype)


class GaussianMixture2DNoise:
    """Exact E[eps | x_t, class] for points x_0 ~ (1 / K) sum_k N(means[k], std^2 I) in 2D (means: (K, 2)); as
    GaussianMixtureNoise, a label k means the k-th component alone and the null label (or None) the whole mixture."""

    def __init__(self, diffusion: Diffusion, means: list[list[float]], std: float):
        self.diffusion, self.std = diffusion, std
        self.means = torch.tensor(means, dtype=torch.float64)
        self.num_classes = len(means)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        alpha_bar = self.diffusion.alphas_cumprod.double()[t][:, None]  # (B, 1)
        variance = alpha_bar * self.std**2 + 1 - alpha_bar
        centres = alpha_bar.sqrt()[:, None] * self.means  # (B, K, 2)
        log_resp = -((x.double()[:, None] - centres) ** 2).sum(-1) / (2 * variance)  # (B, K)
        resp = torch.softmax(log_resp, dim=-1)
        if labels is not None:
            conditional = (labels != self.num_classes)[:, None]
            resp = torch.where(
                conditional,
                torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1), self.num_classes).double(),
                resp,
            )
        mean_x_t = (resp[..., None] * centres).sum(1)
        return ((1 - alpha_bar).sqrt() * (x.double() - mean_x_t) / variance).to(x.dtype)

    def draw(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Points of the mixture's components `labels`."""
        generator = torch.Generator().manual_seed(seed)
        return (
            self.means[labels] + self.std * torch.randn(len(labels), 2, generator=generator, dtype=torch.float64)
        ).float()


def sampling(**fields) -> SamplingConfig:
    """The settings of Diffusion.sample: SamplingConfig's `fields`, unguided (guidance scale 1) unless told."""
    return SamplingConfig(**{"guidance_scale": 1.0} | fields)


def sample_1d(
    diffusion: Diffusion, model, n: int, seed: int = 0, labels=None, null_label=None, **fields
) -> torch.Tensor:
    """n one-pixel samples of Diffusion.sample with the settings `sampling(**fields)`, flattened."""
    generator = torch.Generator().manual_seed(seed)
    return diffusion.sample(
        model, (n, 1, 1, 1), sampling(**fields), labels, null_label=null_label, generator=generator
    ).flatten()


def two_branch_model(x, t, labels):
    """A toy predictor whose conditional branch (labels < 10) has a smaller spread than the unconditional one."""
    scale = torch.where(labels < 10, 0.5, 2.0).reshape(-1, *[1] * (x.ndim - 1))
    return scale * x + 0.1 * t.float().reshape(-1, *[1] * (x.ndim - 1))


# Small data sets in their real on-disk formats (CIFAR-10 pickles, MNIST idx files, an image folder), so tests
# load them through the real code paths. Each fixture returns the data_dir to pass to load_datasets; what the
# files hold is described in the fixture's docstring.

CIFAR10_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_IMAGES_PER_BATCH = 20


def _fake_cifar_images(first_index: int, count: int) -> np.ndarray:
    """count x 3072 uint8 rows: R plane = index, G plane = 255 - index, B plane = 8 * column."""
    index = np.arange(first_index, first_index + count)[:, None, None]
    planes = np.empty((count, 3, 32, 32), dtype=np.uint8)
    planes[:, 0] = index
    planes[:, 1] = 255 - index
    planes[:, 2] = 8 * np.arange(32)
    return planes.reshape(count, 3072)


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """See write_cifar10."""
    return write_cifar10(tmp_path)


def write_cifar10(tmp_path: Path) -> Path:
    """<tmp>/cifar-10-batches-py with 5 training batches of 20 images (training image k = 0..99) and a
    test_batch of 20 (test image k = 100..119). Image k has label k % 10, red plane filled with k, green
    plane filled with 255 - k and blue pixel (row, column) = 8 * column, so it is not mirror-symmetric."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    n = CIFAR10_IMAGES_PER_BATCH
    batches = [(f"data_batch_{b}", (b - 1) * n) for b in range(1, 6)] + [("test_batch", 5 * n)]
    for name, first in batches:
        _write_pickle(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"data": _fake_cifar_images(first, n),
                b"labels": [k % 10 for k in range(first, first + n)],
            },
        )
    _write_pickle(
        folder / "batches.meta",
        {b"label_names": [name.encode() for name in CIFAR10_CLASS_NAMES], b"num_cases_per_batch": n, b"num_vis": 3072},
    )
    return tmp_path


def _write_idx(path: Path, data: np.ndarray) -> None:
    """idx format: big-endian magic (2051 images, 2049 labels), one big-endian int32 per dimension, uint8 data."""
    magic = 2051 if data.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(f">{1 + data.ndim}i", magic, *data.shape))
        f.write(data.astype(np.uint8).tobytes())


def _write_fake_mnist(raw_dir: Path) -> None:
    raw_dir.mkdir(parents=True)
    for prefix, first, count in (("train", 0, 30), ("t10k", 100, 10)):
        index = np.arange(first, first + count)
        images = np.broadcast_to(index[:, None, None] + 4 * np.arange(28), (count, 28, 28))
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", index % 10)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """<tmp>/MNIST/raw with 30 training images (k = 0..29) and 10 test images (k = 100..109), 28x28.
    Image k has label k % 10 and pixel (row, column) = k + 4 * column."""
    _write_fake_mnist(tmp_path / "MNIST" / "raw")
    return tmp_path


@pytest.fixture
def fashion_mnist_dir(tmp_path: Path) -> Path:
    """Same content as mnist_dir, under <tmp>/FashionMNIST/raw."""
    _write_fake_mnist(tmp_path / "FashionMNIST" / "raw")
    return tmp_path


IMAGE_FOLDER_COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


@pytest.fixture
def image_folder_dir(tmp_path: Path) -> Path:
    """<tmp>/images/{cat,dog,fox}/ with 4 PNGs each (40 wide, 24 high), filled with one colour per class:
    cat red, dog green, fox blue, plus a fifth cat image stored greyscale (mode "L", grey level 128): 13 images."""
    root = tmp_path / "images"
    for name, colour in IMAGE_FOLDER_COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (40, 24), colour).save(root / name / f"{index}.png")
    Image.new("L", (40, 24), 128).save(root / "cat" / "grey.png")
    return root


def write_grey_folder(root: Path, layout: str) -> None:
    """Grey PNGs (mode "L", a vertical bar brighter on its left edge: not mirror-symmetric) for classes a and b:
    layout "flat" is root/<class>/, "split" is root/train/<class>/ (4 each) and root/test/<class>/ (2 each)."""
    splits = {"train": 4, "test": 2} if layout == "split" else {"": 6}
    for split, count in splits.items():
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.zeros((8, 8), dtype=np.uint8)
                pixels[:, 2 + label] = 200 + index
                pixels[:, 1 + label] = 100
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")


def write_digits_folder(root: Path, image_size: int = 16) -> Path:
    """scikit-learn's 1,797 real handwritten digits (8x8, 17 grey levels) upscaled bilinearly to image_size, as grey
    PNGs in root/train/<digit>/ and root/test/<digit>/: the stratified 75/25 split (1,347 and 450) and the files of
    scripts/quality_benchmark.py."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.clip(digits.images * (255 / 16), 0, 255).astype(np.uint8)
    train, test = train_test_split(np.arange(len(pixels)), test_size=0.25, random_state=0, stratify=digits.target)
    for split, indices in (("train", train), ("test", test)):
        for position, index in enumerate(indices):  # the benchmark's file names: the order ImageFolder reads them in
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[index]).resize((image_size, image_size), Image.BILINEAR)
            image.save(folder / f"{position:05d}.png")
    return root


# The judge (ddpm_judge) of the 16x16 digits, trained once per session (about 20 s on one thread) and cached in its
# folder. Tests that only read take `digits_judge`; tests that evaluate (which writes caches into the data folder)
# take `digits_workspace`, their own copy of the folder with the judge's cache in it.


@pytest.fixture(scope="session")
def digits_judge(tmp_path_factory):
    """(the digits folder with the judge's cache, the judge, the lines it reported when it was trained): trained once
    per test session whatever the number of xdist workers, by the first that needs it, under a file lock, into the
    folder the workers share; the others read its cache."""
    from filelock import FileLock

    from ddpm_judge import load_or_train_judge

    pytest.importorskip("sklearn")
    under_xdist = "PYTEST_XDIST_WORKER" in os.environ  # each worker's folder is then inside the session's
    shared = tmp_path_factory.getbasetemp().parent if under_xdist else tmp_path_factory.getbasetemp()
    root, report = shared / "digits_judge" / "digits", shared / "digits_judge" / "report.json"
    with FileLock(str(shared / "digits_judge.lock")):
        if not report.exists():
            write_digits_folder(root)
            lines = []
            load_or_train_judge("folder", root, 16, 1, "cpu", report=lines.append)
            report.write_text(json.dumps(lines))
    judge = load_or_train_judge("folder", root, 16, 1, "cpu", report=lambda line: None)
    return root, judge, json.loads(report.read_text())


@pytest.fixture
def digits_workspace(digits_judge, tmp_path) -> Path:
    """This test's own copy of the digits folder, with the judge's cache."""
    return Path(shutil.copytree(digits_judge[0], tmp_path / "digits"))


def indexed_pixels(index: int, width: int = 12, height: int = 8) -> np.ndarray:
    """An RGB image (height, width, 3) that tells its index: red = index, green = 255 - index, blue = 20 * column."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = index, 255 - index, 20 * np.arange(width)
    return pixels


def write_flat_folder(root: Path, count: int, width: int = 12, height: int = 8) -> None:
    """root/NNN.png, image k = indexed_pixels(k) (RGB PNGs, 12 x 8: wider than high, so they are cropped)."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(indexed_pixels(index, width, height)).save(root / f"{index:03d}.png")


def write_edm_zip(path: Path, labels: list[int] | None, size: int = 8, dataset_json: bool = True) -> None:
    """A dataset zip laid out as NVlabs/edm's dataset_tool.py writes one: image k as <k:08d>[:5]/img<k:08d>.png
    (uncompressed PNG, size x size, red = k), then dataset.json, {"labels": [[name, label], ...]} or
    {"labels": null}; one image per entry of `labels` (None: 6 unlabelled images)."""
    count = 6 if labels is None else len(labels)
    names = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(count):
            index_text = f"{index:08d}"
            names.append(f"{index_text[:5]}/img{index_text}.png")
            buffer = io.BytesIO()
            image = Image.fromarray(indexed_pixels(index, size, size))
            image.save(buffer, format="png", compress_level=0, optimize=False)
            archive.writestr(names[-1], buffer.getvalue())
        if dataset_json:
            entries = None if labels is None else [[name, label] for name, label in zip(names, labels)]
            archive.writestr("dataset.json", json.dumps({"labels": entries}))
