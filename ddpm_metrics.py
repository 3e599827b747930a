r"""Numbers for samples: FID, Inception Score and class consistency, guidance sweeps, checkpoint comparisons.

    python ddpm_main.py --evaluate --model_path models/run/ckpt.pt --fid_num_samples 10000 \
        --sampler dpm++2m --sampling_steps 20

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the features of the
generated images and of the training images. The standard features, used by published CIFAR-10
numbers, are the 2048-d pool features of the TensorFlow Inception network of 2015
(`pt_inception-2015-12-05`); torch-fidelity ports it bit-exactly, including TensorFlow's resize to 299x299,
and also gives its logits for the Inception Score (Salimans et al. 2016).

A feature extractor here is any callable mapping uint8 images (N, 3, H, W) to a pair
(features (N, D), logits (N, K) or None). `FEATURE_EXTRACTORS` names the ones `--fid_features` offers;
`random-conv` is a fixed random network for tests and quick relative comparisons, NOT comparable to
published FID. Tests may add their own entry to that dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm_config import UsageError, first_line
from ddpm_data import SYNTHETIC_CLASSES, load_datasets

if TYPE_CHECKING:
    from ddpm_judge import Judge

FeatureExtractor = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


# The last part of torch-fidelity's URL_INCEPTION_V3 (checked by a test). torch-fidelity is imported only
# where it is used, so that training and inference do not pay for its import.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


INCEPTION_SCORE_SPLITS = 10  # as in Salimans et al.'s code and every published Inception Score


KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018, as torch-fidelity's defaults


PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds of precision and recall (Kynkaanniemi et al. 2019)


def inception_weights_path() -> Path:
    """Where torch.hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def load_inception(device: str) -> FeatureExtractor:
    """The FID Inception network (torch-fidelity's port), giving pool features and unbiased logits.

    The weights are downloaded once into the torch hub cache; offline, one line says where to put them.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    path = inception_weights_path()
    if not path.is_file():
        _download_inception_weights(path)
    try:
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
    except Exception as error:
        raise UsageError(
            f"cannot read the Inception weights {path} ({first_line(error)}): "
            f"replace it with {INCEPTION_FILE} from {URL_INCEPTION_V3}"
        ) from error
    return network.to(device)


def _download_inception_weights(path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path))
    except Exception as error:
        raise UsageError(
            f"the FID Inception weights could not be downloaded ({first_line(error)}): "
            f"place {INCEPTION_FILE} (from {URL_INCEPTION_V3}) in {path.parent}/"
        ) from error


class RandomConvFeatures(nn.Module):
    """Two random ReLU convolutions (fixed seed) and a spatial mean: 64 features per image, no logits.

    Cheap enough for tests and for comparing samplers or checkpoints of one model on a CPU. The
    numbers mean something only relative to each other; they are not comparable to published FID.
    """

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.Conv2d(32, dim, 3, stride=2, padding=1)]
        )
        for conv in self.convs:  # He initialisation, so activations neither vanish nor explode
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / fan_in)
            conv.bias.data.zero_()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = images.float() / 127.5 - 1
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3)), None


FEATURE_EXTRACTORS: dict[str, Callable[[str], FeatureExtractor]] = {
    "inception": load_inception,
    "random-conv": lambda device: RandomConvFeatures().to(device),
}


COMPARABLE_TO_PUBLISHED = {"inception"}


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: torch.Tensor, batch_size: int, device: str, desc: str = "features"
) -> tuple[np.ndarray, Optional[torch.Tensor]]:
    """Features (float64, N x D) and logits (or None) of uint8 images (N, C, H, W); grey images become RGB."""
    features, logits = [], []
    for batch in tqdm(images.split(batch_size), desc=desc, unit="batch"):
        batch = batch.to(device)
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        batch_features, batch_logits = extractor(batch)
        features.append(batch_features.double().cpu())
        if batch_logits is not None:
            logits.append(batch_logits.cpu())
    return torch.cat(features).numpy(), torch.cat(logits) if logits else None


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N - 1 normalised, as in the reference FID code) of N x D features."""
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))      (Dowson & Landau 1982)

    FID is this distance between Inception features (Heusel et al. 2017). torch-fidelity computes the
    trace of the matrix square root as the sum of the square roots of the eigenvalues of sigma1 sigma2.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def as_stats(mu, sigma) -> dict:
        return {"mu": np.asarray(mu, np.float64), "sigma": np.atleast_2d(np.asarray(sigma, np.float64))}

    return fid_statistics_to_metric(as_stats(mu1, sigma1), as_stats(mu2, sigma2), verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = INCEPTION_SCORE_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean and std over `splits` parts, by torch-fidelity."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def kernel_inception_distance(features: np.ndarray, reference: np.ndarray) -> dict:
    """KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel, mean and std over
    random subsets, by torch-fidelity. Unbiased at any sample count, unlike FID."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    subset_size = min(KID_SUBSET_SIZE, len(features), len(reference))
    result = kid_features_to_metric(
        torch.from_numpy(features),
        torch.from_numpy(reference),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=subset_size,
        verbose=False,
        rng_seed=2020,
    )
    return {
        "mean": result[KEY_METRIC_KID_MEAN],
        "std": result[KEY_METRIC_KID_STD],
        "subsets": KID_SUBSETS,
        "subset_size": subset_size,
    }


def precision_recall(features: np.ndarray, reference: np.ndarray) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019), by torch-fidelity: the share of samples inside the
    k-NN balls of the reference features, and of reference images inside those of the samples. Computed on the FID
    features, as the guided-diffusion (ADM) evaluator does."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    result = prc_features_to_metric(
        torch.from_numpy(features).float(),
        torch.from_numpy(reference).float(),
        prc_neighborhood=PRC_NEIGHBORHOOD,
        prc_batch_size=10000,
        save_cpu_ram=True,
        verbose=False,
    )
    return {
        "precision": result[KEY_METRIC_PRECISION],
        "recall": result[KEY_METRIC_RECALL],
        "neighborhood": PRC_NEIGHBORHOOD,
    }


def classify_synthetic(images: torch.Tensor) -> torch.Tensor:
    """Class of synthetic images (uint8, N x 3 x H x W), -1 where nothing is drawn.

    Each synthetic class has its own colour (ddpm_data.SYNTHETIC_CLASSES), so the mean colour of the
    bright pixels (the object; the background stays below about 60) names the class. Shapes are not checked.
    """
    pixels = images.float()
    bright = pixels.amax(dim=1, keepdim=True) > 100
    count = bright.sum(dim=(1, 2, 3))
    mean_colour = (pixels * bright).sum(dim=(2, 3)) / count.clamp(min=1).unsqueeze(1)
    palette = torch.tensor([colour for _, colour, _ in SYNTHETIC_CLASSES], dtype=torch.float32)
    nearest = torch.cdist(mean_colour, palette).argmin(dim=1)
    return torch.where(count > 0, nearest, -1)


CLASSIFIERS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "synthetic": ("colour of the drawn object (each synthetic class has its own colour)", classify_synthetic),
}


def class_consistency(dataset: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[Optional[float], str]:
    """Fraction of samples that a classifier for `dataset` puts in the class they were sampled for, and a note."""
    if dataset not in CLASSIFIERS:
        return None, f"no classifier for {dataset!r} in this tool: class consistency not measured"
    description, classify = CLASSIFIERS[dataset]
    agreement = (classify(images) == labels).float().mean().item()
    return agreement, f"class consistency by a fixed classifier: {description}"


@dataclass
class ReferenceStatistics:
    mu: np.ndarray
    sigma: np.ndarray
    num_images: Optional[int]  # None: a --fid_ref file that does not say
    path: Path
    features: Optional[np.ndarray] = None  # what KID and precision/recall need; only mu and sigma in a --fid_ref file


def reference_statistics(
    dataset: str,
    data_dir: str,
    image_size: int,
    extractor_name: str,
    extractor: FeatureExtractor,
    batch_size: int,
    device: str,
) -> ReferenceStatistics:
    """Feature statistics of the training images, cached in <data_dir>/fid_stats_<dataset>_<size>_<extractor>.npz.

    "Training images" are the training and validation splits together: for CIFAR-10 all 50,000 training
    images, the reference of published numbers.
    """
    path = Path(data_dir) / f"fid_stats_{dataset}_{image_size}_{extractor_name}.npz"
    if path.is_file():
        with np.load(path) as cached:
            features = cached["features"].astype(np.float64) if "features" in cached else None
            return ReferenceStatistics(cached["mu"], cached["sigma"], int(cached["num_images"]), path, features)
    data = load_datasets(dataset, data_dir, image_size, hflip=False)
    images = torch.cat([data.train.images, data.val.images])
    features, _ = extract_features(extractor, images, batch_size, device, desc="training-set features (once)")
    mu, sigma = feature_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, num_images=len(images), features=features.astype(np.float32))
    return ReferenceStatistics(mu, sigma, len(images), path, features.astype(np.float32).astype(np.float64))


def load_reference_file(
    path: Path, extractor: FeatureExtractor, image_shape: tuple[int, int, int], device: str
) -> ReferenceStatistics:
    """--fid_ref: precomputed `mu` and `sigma` of `feature_dim`-d features (as pytorch-fid --save-stats writes them,
    or this tool's cache) of the extractor's features; `num_images` where the file has it."""
    if not path.is_file():
        raise UsageError(f"--fid_ref file not found: {path}")
    try:
        with np.load(path) as stats:
            mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
            num_images = int(stats["num_images"]) if "num_images" in stats else None
    except KeyError:
        raise UsageError(
            f"{path} has no `mu` and `sigma` arrays (the layout pytorch-fid --save-stats writes)"
        ) from None
    except Exception as error:
        raise UsageError(f"{path} is not a readable .npz file ({first_line(error)})") from None
    feature_dim = feature_dimension(extractor, image_shape, device)
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise UsageError(
            f"{path} holds statistics of {mu.shape[-1] if mu.ndim else 0}-d features; these features are "
            f"{feature_dim}-d"
        )
    return ReferenceStatistics(mu, sigma, num_images, path)


def feature_dimension(extractor: FeatureExtractor, image_shape: tuple[int, int, int], device: str) -> int:
    """The length of the extractor's feature vector, from one black image."""
    with torch.no_grad():
        features, _ = extractor(torch.zeros((1, 3, *image_shape[1:]), dtype=torch.uint8, device=device))
    return features.shape[1]


def evaluate_sample_set(
    images: torch.Tensor,
    labels: Optional[torch.Tensor],
    dataset: str,
    extractor: FeatureExtractor,
    reference: ReferenceStatistics,
    batch_size: int,
    device: str,
    judge: Optional[Judge] = None,
) -> dict:
    """FID against the reference, Inception Score where the extractor has logits, class consistency where
    labels and a classifier exist, the figures of the data set's judge (ddpm_judge) where there is one; a missing
    metric is None with a note saying why."""
    nchw = images.permute(0, 3, 1, 2)
    features, logits = extract_features(extractor, nchw, batch_size, device, desc="sample features")
    mu, sigma = feature_statistics(features)
    results: dict = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), "notes": []}
    results["inception_score"] = None
    if logits is None:
        results["notes"].append("no Inception Score: this feature extractor has no class logits")
    elif len(logits) < INCEPTION_SCORE_SPLITS:
        results["notes"].append(f"no Inception Score: it needs at least {INCEPTION_SCORE_SPLITS} samples")
    else:
        mean, std = inception_score(logits)
        results["inception_score"] = {"mean": mean, "std": std, "splits": INCEPTION_SCORE_SPLITS}
    results["kid"], results["precision_recall"] = None, None
    if reference.features is None:
        results["notes"].append(
            f"no KID or precision/recall: {reference.path} holds mu and sigma only, not the reference features"
        )
    else:
        results["kid"] = kernel_inception_distance(features, reference.features)
        if min(len(features), len(reference.features)) > PRC_NEIGHBORHOOD:
            results["precision_recall"] = precision_recall(features, reference.features)
        else:
            results["notes"].append(
                f"no precision/recall: their k-NN balls (k={PRC_NEIGHBORHOOD}) need more than {PRC_NEIGHBORHOOD} "
                "samples"
            )
    results["class_consistency"] = None
    if labels is not None and (judge is None or dataset in CLASSIFIERS):  # else the judge's class accuracy measures it
        results["class_consistency"], note = class_consistency(dataset, nchw, labels)
        results["notes"].append(note)
    results["judge"] = None if judge is None else judge.figures(images, labels)
    return results


def require_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise UsageError(
            '--evaluate needs torch-fidelity: pip install torch-fidelity (or pip install ".[eval]")'
        ) from None
