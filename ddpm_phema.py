"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Sec. 3 and Appendix C): track a few power-function EMAs while training, store their snapshots now and then, and
after training combine the snapshots into the EMA of any other length, at any stored time, without retraining.

The power-function EMA of exponent gamma at time t averages the weights theta(tau) of the run so far with the
profile p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 <= tau <= t (Sec. 3.1):

    theta_hat_gamma(t) = integral_0^t p_{t,gamma}(tau) theta(tau) dtau.

Its length is its relative standard deviation sigma_rel (the profile's standard deviation over t), eq. (123):
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). (Equation and algorithm numbers: the paper's arXiv
version, 2312.02696, whose appendix they are in; NVlabs/edm2 training/phema.py cites the same.)

Here time is counted in EMA updates (optimizer steps): theta(tau) = theta_s, the weights after update s, on
s - 1 < tau <= s. The update of eq. (127), beta_t = (1 - 1/t)^(gamma + 1), then gives exactly the integral above:
after t updates the weights theta_s carry (s^(gamma + 1) - (s - 1)^(gamma + 1)) / t^(gamma + 1). So snapshots of the
tracked EMAs are exact samples of the integral, and the reconstruction (Algorithm 3, eqs. (151) ff.) is exact
whenever the target profile is a combination of the stored ones.

Wiring, for the training loop: `PowerFunctionEMA.update(model, skip)` after each optimizer step (no host read);
`state_dict` / `load_state_dict` in the checkpoint; every `snapshot_interval(total_steps)` steps
`save_snapshot(s, folder)` for each `s` in `ema.snapshot()`; after training `reconstruct_from_folder(folder,
sigma_rel)` gives a state dict for `model.load_state_dict`.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ddpm_checkpoint import ModelDescription, load_checkpoint, save_weights
from ddpm_config import UsageError
from ddpm_outputs import atomic_write

SIGMA_RELS = (
    0.05,
    0.10,
)  # EDM2's two tracked profiles; sigma_rel 0.04 to 0.2 reconstruct from them (solve_posthoc_weights)
LONGEST_GAMMA = (math.sqrt(5) - 3) / 2
"""sigma_rel(gamma) peaks here, where d/dgamma log sigma_rel^2 = 1/(gamma+1) - 2/(gamma+2) - 1/(gamma+3) = 0,
i.e. gamma^2 + 3 gamma + 1 = 0. Every shorter profile has two exponents > -1, one on each side of this one;
sigma_rel_to_gamma takes the larger, as EDM2 does."""
MAX_SIGMA_REL = math.sqrt((LONGEST_GAMMA + 1) / ((LONGEST_GAMMA + 2) ** 2 * (LONGEST_GAMMA + 3)))  # 0.3003
SNAPSHOT_FORMAT = "ddpm-phema-1"
SNAPSHOT_PATTERN = "phema-*.safetensors"
STORAGE_DTYPE = torch.float16
"""The precision snapshot files store by default: lossless for the reconstruction (measured; see `save_snapshot`)."""
SNAPSHOTS_PER_RUN = 20
"""`snapshot_interval`'s lower bound on the number of snapshots (it stores 20 to 40)."""


# Power-function profiles


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of the power-function profile of exponent gamma (> -1), eq. (123):
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    if not gamma > -1:
        raise ValueError(f"a power-function EMA needs gamma > -1, not {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has this sigma_rel (eq. (126)): the largest root of the cubic that
    eq. (123) becomes with s = sigma_rel^-2,

        gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0,

    in closed form (Viete's trigonometric solution; the cubic has three real roots for every
    0 < sigma_rel <= MAX_SIGMA_REL). EDM2's examples: 0.05 -> 16.97, 0.10 -> 6.94."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(
            f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (the longest power-function profile), not {sigma_rel}"
        )
    s = sigma_rel**-2
    # gamma = x - 7/3 turns the cubic into x^3 + p x + q = 0 with:
    p = -(s + 1 / 3)
    q = 2 / 27 + 4 * s / 3
    cosine = min(max(3 * q / (2 * p) * math.sqrt(-3 / p), -1.0), 1.0)  # clamped: rounding at MAX_SIGMA_REL
    return 2 * math.sqrt(-p / 3) * math.cos(math.acos(cosine) / 3) - 7 / 3


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral_0^inf p_a(tau) p_b(tau) dtau, elementwise with broadcasting,
    in float64 (eq. (151)). With m = min(t_a, t_b), the integral of (gamma_a+1)(gamma_b+1) tau^(gamma_a+gamma_b)
    / (t_a^(gamma_a+1) t_b^(gamma_b+1)) over [0, m] is, written with ratios <= 1 so that it cannot overflow,

        (gamma_a+1)(gamma_b+1) / ((gamma_a+gamma_b+1) max(t_a, t_b)) * (m / max(t_a, t_b))^(gamma of the longer one)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    longer = np.maximum(t_a, t_b)
    ratio = np.minimum(t_a, t_b) / longer
    exponent = np.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * longer) * ratio**exponent


def solve_posthoc_weights(
    snapshot_t: Sequence[float], snapshot_gamma: Sequence[float], target_t: float, target_gamma: float
) -> np.ndarray:
    """The coefficients x (float64, one per snapshot) of EDM2's Algorithm 3: the least-squares fit
    sum_i x_i p_{t_i,gamma_i} ~ p_{target_t,target_gamma} in L2, i.e. the normal equations A x = b with
    A_ij = <p_i, p_j> and b_i = <p_i, p_target> (`profile_inner_products`), rescaled to sum to 1 as EDM2 does
    (so that weights which never changed come back unchanged; unscaled, the sum is within 1e-3 of 1 from 16
    snapshots per profile on). With EDM2's two profiles (0.05, 0.10) at 20 / 40 evenly spaced times each,
    cond(A) is 1e4 / 2e5 and, for targets at the last time, the fit's relative L2 residual and |x|_2 are:

        target sigma_rel   0.03         0.04         0.075        0.15         0.2          0.25
        residual           2.6 / 0.7%   0.7 / 0.2%   0.2 / 0.06%  0.6 / 0.15%  1.6 / 0.4%   6 / 2.6%
        |x|_2              4.6 / 5.6    2.0 / 2.2    0.9 / 0.9    0.9 / 0.8    0.7 / 0.6    0.5 / 0.5

    From 0.05 up, |x|_2 < 1: the combination does not amplify the snapshots' rounding. Shorter than the
    shortest tracked profile is extrapolation: the coefficients alternate, and the rounding grows |x|_2-fold."""
    t = np.asarray(snapshot_t, dtype=np.float64)
    gamma = np.asarray(snapshot_gamma, dtype=np.float64)
    if t.ndim != 1 or t.shape != gamma.shape or len(t) == 0:
        raise ValueError("solve_posthoc_weights needs one t and one gamma per snapshot, and at least one snapshot")
    if not (t > 0).all() or not 0 < target_t <= t.max():
        raise ValueError(f"snapshot times must be > 0 and the target time in (0, {t.max():g}], not {target_t}")
    gram = profile_inner_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    x = np.linalg.solve(gram, profile_inner_products(t, gamma, target_t, target_gamma))
    return x / x.sum()


# Tracking during training


class Snapshot(NamedTuple):
    """The weights of one tracked EMA after t updates, with its exponent gamma."""

    t: int
    gamma: float
    state_dict: dict[str, torch.Tensor]

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)


class PowerFunctionEMA:
    """Power-function EMAs of the weights (EDM2 Sec. 3.1), one per sigma_rel, updated by eq. (127):

        theta_hat <- beta_t theta_hat + (1 - beta_t) theta,   beta_t = (1 - 1/t)^(gamma + 1),

    t the 1-based number of this update (beta_1 = 0: the first update copies the weights, whatever the
    initial copy holds). Parameters and floating-point buffers are averaged, as by ddpm_optim.EMA.

    As in ddpm_optim.EMA, the update count lives on the device (float64, exact up to 2^53) and an update can be
    cancelled there (`skip`), so updating never reads a tensor on the host; `snapshot` is the one call that does."""

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float] = SIGMA_RELS):
        if not sigma_rels:
            raise ValueError("PowerFunctionEMA needs at least one sigma_rel")
        if not all(tensor.is_floating_point() for tensor in self.tensors(model)):
            raise TypeError(
                "PowerFunctionEMA averages floating-point parameters and buffers only; this model has others"
            )
        self.sigma_rels = tuple(float(sigma_rel) for sigma_rel in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(sigma_rel) for sigma_rel in self.sigma_rels)
        self.modules = tuple(copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels)
        self.num_updates = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)

    @staticmethod
    def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """One update of every profile with `model`'s weights, unless `skip` (a bool tensor on the device) is
        true: then nothing changes, the count included (as long as the weights are finite: 0 * inf is nan)."""
        if skip is not None and (not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool):
            raise TypeError(f"skip is a bool tensor (on the device), not {skip!r}")  # ~True is -2
        keep = 1 - 1 / (self.num_updates + 1)  # 1 - 1/t for this update's t
        weights = self.tensors(model)
        for module, gamma in zip(self.modules, self.gammas):
            step = 1 - keep ** (gamma + 1)  # 1 - beta_t
            if skip is not None:
                step = step * ~skip
            averages = self.tensors(module)
            deltas = torch._foreach_sub(weights, averages)
            torch._foreach_mul_(deltas, step)
            torch._foreach_add_(averages, deltas)
        self.num_updates += 1 if skip is None else ~skip

    def state_dict(self) -> dict:
        """Everything an exact resume needs. The weights are the modules' own tensors (as Module.state_dict
        gives them): save the dict before the next update."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "num_updates": self.num_updates.clone(),
            "modules": [module.state_dict() for module in self.modules],
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise ValueError(f"this state tracks sigma_rel {state['sigma_rels']}, not {list(self.sigma_rels)}")
        for module, module_state in zip(self.modules, state["modules"]):
            module.load_state_dict(module_state)
        self.num_updates.copy_(torch.as_tensor(state["num_updates"], dtype=torch.float64))

    def snapshot(self, dtype: Optional[torch.dtype] = None) -> list[Snapshot]:
        """Each profile's weights now (a copy on the CPU, in `dtype` if given, e.g. torch.float16), with the
        number of updates t and its gamma: what `reconstruct` combines. Reads the count on the host (waits for
        the device), so call it every `snapshot_interval` steps, not every step."""
        t = int(self.num_updates)
        if t == 0:
            raise ValueError("no update yet: a power-function EMA is defined from its first update on")
        return [
            Snapshot(
                t,
                gamma,
                {
                    key: value.detach().to(device="cpu", dtype=dtype, copy=True)
                    for key, value in module.state_dict().items()
                },
            )
            for module, gamma in zip(self.modules, self.gammas)
        ]


# Reconstruction


def reconstruct(
    snapshots: Sequence[Snapshot],
    target_sigma_rel: float,
    target_t: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The power-function EMA of `target_sigma_rel` at `target_t` (default: the latest snapshot's t) as the
    combination sum_i x_i theta_hat_i of the snapshots' weights (`solve_posthoc_weights`), in `dtype`."""
    x = _solve(((s.t, s.gamma) for s in snapshots), target_sigma_rel, target_t)
    return _combine(x, (s.state_dict for s in snapshots), dtype)


def reconstruct_from_folder(
    folder: str | os.PathLike,
    target_sigma_rel: float,
    target_t: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """`reconstruct` from the snapshot files in `folder`, loading one file at a time (memory: one snapshot
    and the result)."""
    files = list_snapshots(folder)
    if not files:
        raise ValueError(f"{folder} holds no snapshots ({SNAPSHOT_PATTERN})")
    x = _solve(((f.t, f.gamma) for f in files), target_sigma_rel, target_t)
    return _combine(x, (load_snapshot(f.path).state_dict for f in files), dtype)


def _solve(
    times_and_gammas: Iterable[tuple[int, float]], target_sigma_rel: float, target_t: Optional[float]
) -> np.ndarray:
    pairs = list(times_and_gammas)
    if not pairs:
        raise ValueError("a reconstruction needs at least one snapshot")
    t = [t for t, _ in pairs]
    return solve_posthoc_weights(
        t, [gamma for _, gamma in pairs], max(t) if target_t is None else target_t, sigma_rel_to_gamma(target_sigma_rel)
    )


def _combine(
    x: np.ndarray, state_dicts: Iterable[dict[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """sum_i x_i state_dict_i, accumulated in `dtype` (float32: rounding ~ |x|_1 * 6e-8 relative)."""
    result: dict[str, torch.Tensor] = {}
    for coefficient, state_dict in zip(x.tolist(), state_dicts, strict=True):
        if result and state_dict.keys() != result.keys():
            raise ValueError("the snapshots hold different tensors (snapshots of different models?)")
        for key, value in state_dict.items():
            if key in result:
                result[key].add_(value.to(dtype), alpha=coefficient)
            else:
                result[key] = value.to(dtype=dtype, copy=True).mul_(coefficient)
    return result


# Storage


class SnapshotFile(NamedTuple):
    """A snapshot file, as `list_snapshots` finds it (from its header: no weights read)."""

    path: Path
    t: int
    gamma: float

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)


def snapshot_path(folder: str | os.PathLike, t: int, sigma_rel: float) -> Path:
    """`<folder>/phema-<t:07d>-<sigma_rel:.3f>.safetensors` (t: the number of EMA updates, which is the training
    step unless steps were skipped)."""
    return Path(folder) / f"phema-{t:07d}-{sigma_rel:.3f}.safetensors"


def save_snapshot(snapshot: Snapshot, folder: str | os.PathLike, dtype: Optional[torch.dtype] = STORAGE_DTYPE) -> Path:
    """Write one snapshot (the weights in `dtype`, None: as they are; t, gamma and sigma_rel as metadata) to
    `snapshot_path`, atomically (ddpm_outputs.atomic_write), and return the path.

    Disk cost per file: 2 bytes per weight in float16 (4 in float32) + a header of about 65 bytes plus the
    name's length per tensor (the tiny U-Net: 190,947 weights, 128 tensors -> 393,718 bytes, 3% of it header).
    A run stores len(sigma_rels) files every `snapshot_interval` steps: 2 x 20 to 40 files with the defaults.

    Why float16 by default: its rounding is far below what the choice of sigma_rel changes, and bfloat16's is
    not. Measured on the tiny U-Net (ddpm_model's "tiny" preset, 8x8 RGB) trained 400 Adam steps (lr 2e-3) on
    coloured squares, 20 snapshots each of sigma_rel 0.05 and 0.10 (snapshot_interval(400) = 20): the
    reconstructions of sigma_rel 0.05, 0.075, 0.10 and 0.15 from float16 files differ from those from float32
    files by 1.7e-4 to 2.0e-4 of the weights' norm, as much as rounding the result itself to float16 (2.0e-4:
    |x|_2 <= 1, the combination adds nothing); from bfloat16 files by 1.4e-3 to 1.6e-3; while sigma_rel
    s and s + 0.005 differ by 2.6e-3 to 2.9e-3. So float16 is 15 times below the smallest step one would tune
    sigma_rel by, bfloat16 only 2 times. Half the disk of float32; EDM2 stores its snapshots in float16 too.
    Weights beyond float16's range (65504) would need dtype=torch.float32."""
    path = snapshot_path(folder, snapshot.t, snapshot.sigma_rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save

    tensors = {
        key: value.detach().to(device="cpu", dtype=dtype).contiguous() for key, value in snapshot.state_dict.items()
    }
    metadata = {
        "format": SNAPSHOT_FORMAT,
        "t": str(snapshot.t),
        "gamma": repr(snapshot.gamma),
        "sigma_rel": repr(snapshot.sigma_rel),
    }
    atomic_write(path, lambda f: f.write(save(tensors, metadata)))
    return path


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """A file of `save_snapshot`, its weights in the precision stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        t, gamma = _snapshot_metadata(path, f.metadata())
        return Snapshot(t, gamma, {key: f.get_tensor(key) for key in f.keys()})


def list_snapshots(folder: str | os.PathLike) -> list[SnapshotFile]:
    """The snapshot files in `folder` (none if it does not exist), by time then sigma_rel, from their headers."""
    from safetensors import safe_open

    files = []
    for path in Path(folder).glob(SNAPSHOT_PATTERN):
        with safe_open(str(path), framework="pt") as f:
            files.append(SnapshotFile(path, *_snapshot_metadata(path, f.metadata())))
    return sorted(files, key=lambda f: (f.t, f.sigma_rel))


def _snapshot_metadata(path: str | os.PathLike, metadata: Optional[dict[str, str]]) -> tuple[int, float]:
    if not metadata or metadata.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot written by save_snapshot")
    return int(metadata["t"]), float(metadata["gamma"])


def snapshot_interval(total_steps: int) -> int:
    """Steps between snapshots for a run of `total_steps`: the largest round number (1-9, or 1, 2, 2.5 or 5
    times a power of ten) <= total_steps / 20, so that a run stores 20 to 40 snapshots per profile (all of
    them if it is shorter than 20 steps) at steps that read well.

    Why 20 to 40: how closely the stored profiles (EDM2's sigma_rel 0.05 and 0.10, snapshots evenly spaced)
    fit an untracked one at the end of the run, as the relative L2 residual of `solve_posthoc_weights`, from
    16 / 20 / 24 / 32 / 40 / 64 snapshots per profile: sigma_rel 0.075: 0.35 / 0.23 / 0.16 / 0.09 / 0.06 /
    0.02%; sigma_rel 0.15: 0.90 / 0.58 / 0.41 / 0.23 / 0.15 / 0.06%. From 20 on the fit is within about half a
    percent, and the disk stays at 20 to 40 copies of the weights per profile (in float16: 10 to 20 float32
    copies). More snapshots fit better still, at proportionally more disk."""
    if total_steps < 1:
        raise ValueError(f"a run has at least one step, not {total_steps}")
    most = total_steps / SNAPSHOTS_PER_RUN
    if most < 10:
        return max(1, int(most))
    power = 10 ** (len(str(int(most))) - 1)  # most = mantissa * power, 1 <= mantissa < 10
    return int(max(m for m in (1, 2, 2.5, 5) if m * power <= most) * power)


def snapshot_folder(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its snapshots: <run folder>/phema/."""
    return Path(run_dir) / "phema"


def posthoc_weights_path(checkpoint_path: str | os.PathLike, sigma_rel: float) -> Path:
    return Path(checkpoint_path).parent / f"posthoc_ema_{sigma_rel:.3f}.safetensors"


def write_posthoc_ema(checkpoint_path: str | os.PathLike, sigma_rels: Sequence[float]) -> list[Path]:
    """--posthoc_ema: for each sigma_rel, the EMA of that length at the run's last snapshot, reconstructed from its
    snapshots and written beside the checkpoint as a weights file (posthoc_ema_<sigma_rel>.safetensors) that
    --inference, --evaluate and --export_diffusers read like any other."""
    checkpoint = load_checkpoint(checkpoint_path)
    folder = snapshot_folder(Path(checkpoint_path).parent)
    snapshots = list_snapshots(folder)
    if not snapshots:
        raise UsageError(
            f"no post-hoc EMA snapshots in {folder}: the run was trained with --phema_every 0, or without --save_model"
        )
    written = []
    for sigma_rel in sigma_rels:
        if not 0 < sigma_rel < MAX_SIGMA_REL:
            raise UsageError(f"--posthoc_ema takes sigma_rel between 0 and {MAX_SIGMA_REL:.4f}, got {sigma_rel}")
        weights = reconstruct_from_folder(folder, sigma_rel)
        description = ModelDescription.from_checkpoint(checkpoint, checkpoint_path).to_dict() | {
            "train_state": {"step": snapshots[-1].t},
            "weights": f"post-hoc EMA, sigma_rel {sigma_rel:g} at update {snapshots[-1].t}",
        }
        path = posthoc_weights_path(checkpoint_path, sigma_rel)
        save_weights(weights, description, path)
        written.append(path)
        print(f"wrote {path}: sigma_rel {sigma_rel:g} from the {len(snapshots)} snapshots in {folder}")
    return written
