"""Samplers of the reverse process: one `Sampler` interface, one posterior q(x_s | x_t, x_0).

Each sampler chooses its timesteps (`timesteps(steps)`) and moves x_t to x_{t_prev} given the noise estimate at t
(`step(x, t, t_prev, eps, generator)`). t and t_prev are Python ints (t_prev = -1: the clean image), so that a step
reads nothing back from the device. The full ancestral chain, its respaced version (Improved DDPM, Nichol & Dhariwal
2021, section 4) and DDIM (Song et al. 2021) share `posterior` and differ only in how much fresh noise they add;
DPM-Solver++ (Lu et al. 2022) extrapolates the same x_0 predictions. A sampler sees the diffusion through
`ScheduleView` only (its alpha_bar), so this module does not depend on the training side of ddpm_diffusion.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
# The ancestral sampler's sigma_t^2 (Ho et al., section 3.2): the posterior variance beta_tilde_t, optimal for x_0 at a
# point, or beta_t, optimal for x_0 ~ N(0, I). Ho et al. report their CIFAR-10 numbers with fixed_large.
VARIANCES = ("fixed_small", "fixed_large")
# DPM-Solver++ starts no higher than this lambda = log(alpha_t / sigma_t) (diffusers' `lambda_min_clipped`, the
# value it recommends for the cosine schedule; DPM-Solver's reference code likewise stops the cosine schedule short of
# t = 1). The cosine schedule's clipped last betas drive lambda to about -9.9, where log-SNR spacing would spend 8 of 20
# steps at t >= 992; the linear schedule ends at -5.06 and is not clipped.
DPM_LAMBDA_MIN = -5.1


def posterior(alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of q(x_s | x_t, x_0) = N(coef_x0 * x_0 + coef_xt * x_t, variance) for s < t.

    Ho et al. eq. 6-7 for s = t-1; for any s < t it is the same formula with the betas of the
    skipped steps merged into beta = 1 - alpha_bar_t / alpha_bar_s (Improved DDPM, section 4).
    alpha_bar_s = 1 (s = -1, the clean image) gives variance 0 and mean x_0.
    """
    beta = 1 - alpha_bar_t / alpha_bar_s
    variance = beta * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    coef_x0 = beta * alpha_bar_s.sqrt() / (1 - alpha_bar_t)
    coef_xt = (1 - alpha_bar_s) * (1 - beta).sqrt() / (1 - alpha_bar_t)
    return coef_x0, coef_xt, variance


def x0_from_eps(x: torch.Tensor, alpha_bar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert Ho et al. eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x: torch.Tensor, alpha_bar: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The noise that takes x_0 to x_t (Ho et al. eq. 4 solved for eps)."""
    return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def default_steps(sampler: str, num_timesteps: int) -> int:
    """Network evaluations per image when none are asked for: the whole chain for the ancestral sampler, 50 (at
    most T) for ddim and dpm++2m."""
    return num_timesteps if sampler == "ddpm" else min(50, num_timesteps)


def evenly_spaced_timesteps(num_timesteps: int, steps: Optional[int]) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced; all T of them when steps is None."""
    if steps is None or steps == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def log_snr_spaced_timesteps(alphas_cumprod: torch.Tensor, steps: int, lambda_min: float = DPM_LAMBDA_MIN) -> list[int]:
    """`steps` distinct timesteps down to 0 whose log-SNR (2 lambda) is as evenly spaced as integer steps
    allow: the DPM-Solver paper's "logSNR" skip type, recommended for low-resolution images (Lu et al. 2022,
    appendix). Evenly spaced t would leave one huge last step in lambda, which a second-order multistep
    solver overshoots. The first timestep is the last one whose lambda is at least `lambda_min`
    (DPM_LAMBDA_MIN), or later where that leaves fewer than `steps` timesteps."""
    num_timesteps = len(alphas_cumprod)
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"dpm++2m needs between 2 and {num_timesteps} sampling steps, got {steps}")
    alphas_cumprod = alphas_cumprod.double().cpu()
    lambdas = 0.5 * (alphas_cumprod.log() - (1 - alphas_cumprod).log())  # decreasing in t
    first = max(int((lambdas >= lambda_min).sum()) - 1, steps - 1)
    targets = torch.linspace(lambdas[first].item(), lambdas[0].item(), steps, dtype=torch.float64)
    indices = torch.searchsorted(-lambdas, -targets).clamp(max=first).tolist()
    for i in range(1, steps):  # make them strictly decreasing ...
        indices[i] = min(indices[i], indices[i - 1] - 1)
    for i in range(steps):  # ... without running below 0
        indices[i] = max(indices[i], steps - 1 - i)
    return indices


class ScheduleView(Protocol):
    """What a sampler reads of a diffusion (ddpm_diffusion.Diffusion is one)."""

    num_timesteps: int
    alphas_cumprod: torch.Tensor
    variance: str

    def alpha_bar(self, t: int) -> torch.Tensor: ...


class Sampler(Protocol):
    """The interface of every sampler; `make_sampler` builds one by its --sampler name (a fresh one per run: the
    multistep solvers remember earlier steps)."""

    def timesteps(self, steps: Optional[int]) -> list[int]:
        """The timesteps of a run with `steps` network evaluations (None: the sampler's default), from high to low."""

    def step(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """x_{t_prev} from x_t and the noise estimate at t; t_prev = -1 is the clean image."""


def predicted_x0(x: torch.Tensor, alpha_bar_t: torch.Tensor, eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """The x_0 that the noise estimate implies, clipped to the data range [-1, 1] when `clip`."""
    x0 = x0_from_eps(x, alpha_bar_t, eps)
    return x0.clamp(-1, 1) if clip else x0


class AncestralSampler:
    """Ho et al. Algorithm 2: x_{t_prev} ~ N(mean of q(x_{t_prev} | x_t, x_0 = predicted x_0), sigma_t^2), with
    sigma_t^2 = beta_tilde_t (fixed_small, the posterior variance) or beta_t (fixed_large); no noise is added on
    the last step. On a respaced chain t_prev is the next kept step and beta_t = 1 - alpha_bar_t / alpha_bar_{t_prev}
    (Improved DDPM, section 4). `variance` None: the diffusion's."""

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True, variance: Optional[str] = None):
        variance = variance or diffusion.variance
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
        self.diffusion, self.clip_denoised, self.variance = diffusion, clip_denoised, variance

    def timesteps(self, steps: Optional[int]) -> list[int]:
        num_timesteps = self.diffusion.num_timesteps
        return evenly_spaced_timesteps(num_timesteps, default_steps("ddpm", num_timesteps) if steps is None else steps)

    def step(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        coef_x0, coef_xt, variance = posterior(alpha_bar_t, alpha_bar_s)
        if self.variance == "fixed_large" and t_prev >= 0:
            variance = 1 - alpha_bar_t / alpha_bar_s
        mean = coef_x0 * predicted_x0(x, alpha_bar_t, eps, self.clip_denoised) + coef_xt * x
        return mean + variance.sqrt() * randn_like(x, generator)


class DDIMSampler:
    """One DDIM step (Song et al. 2021, eq. 12) with sigma = eta * sqrt(posterior variance) (eq. 16):
    eta = 0 is deterministic; eta = 1 has the ancestral step's variance."""

    def __init__(self, diffusion: ScheduleView, eta: float = 0.0, clip_denoised: bool = True):
        self.diffusion, self.eta, self.clip_denoised = diffusion, eta, clip_denoised

    def timesteps(self, steps: Optional[int]) -> list[int]:
        num_timesteps = self.diffusion.num_timesteps
        return evenly_spaced_timesteps(num_timesteps, default_steps("ddim", num_timesteps) if steps is None else steps)

    def step(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        x0 = predicted_x0(x, alpha_bar_t, eps, self.clip_denoised)
        if self.clip_denoised:  # the direction towards x_t must agree with the clipped x_0
            eps = eps_from_x0(x, alpha_bar_t, x0)
        sigma = self.eta * posterior(alpha_bar_t, alpha_bar_s)[2].sqrt()
        direction = (1 - alpha_bar_s - sigma**2).clamp(min=0).sqrt()
        return alpha_bar_s.sqrt() * x0 + direction * eps + sigma * randn_like(x, generator)


class DPMSolverPlusPlus2M:
    """DPM-Solver++(2M), the multistep second-order solver in data-prediction form (Lu et al. 2022, Alg. 2).

    Works in lambda_t = log(alpha_t / sigma_t) with alpha_t = sqrt(alpha_bar_t) and
    sigma_t = sqrt(1 - alpha_bar_t), on log-SNR-spaced steps. The first step is first order (DDIM); later
    steps extrapolate the x_0 predictions of the last two steps. The final step to the clean image
    (lambda = infinity) returns the x_0 prediction, i.e. it is first order, as recommended for few steps.
    """

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True):
        self.diffusion, self.clip_denoised = diffusion, clip_denoised
        self.previous_x0: Optional[torch.Tensor] = None
        self.previous_h: Optional[torch.Tensor] = None

    def timesteps(self, steps: Optional[int]) -> list[int]:
        steps = default_steps("dpm++2m", self.diffusion.num_timesteps) if steps is None else steps
        return log_snr_spaced_timesteps(self.diffusion.alphas_cumprod, steps)

    def step(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        x0 = predicted_x0(x, alpha_bar_t, eps, self.clip_denoised)
        if t_prev == -1:
            return x0
        lambda_t = 0.5 * (alpha_bar_t.log() - (1 - alpha_bar_t).log())
        lambda_s = 0.5 * (alpha_bar_s.log() - (1 - alpha_bar_s).log())
        h = lambda_s - lambda_t
        denoised = x0
        if self.previous_x0 is not None:
            r = self.previous_h / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self.previous_x0
        self.previous_x0, self.previous_h = x0, h
        sigma_ratio = ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt()
        return sigma_ratio * x - alpha_bar_s.sqrt() * torch.expm1(-h) * denoised


def make_sampler(name: str, diffusion: ScheduleView, eta: float = 0.0, clip_denoised: bool = True,
                 variance: Optional[str] = None) -> Sampler:
    """A fresh sampler (DPM-Solver++ keeps the previous steps' predictions, so one per run) by its --sampler name;
    `variance` is the ancestral sampler's (the others have their own)."""
    if name == "ddpm":
        return AncestralSampler(diffusion, clip_denoised, variance)
    if name == "ddim":
        return DDIMSampler(diffusion, eta, clip_denoised)
    if name == "dpm++2m":
        return DPMSolverPlusPlus2M(diffusion, clip_denoised)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """Standard normal noise from `generator` (on its own device), moved to `device`. Noise from a CPU generator
    goes to a GPU through pinned memory, asynchronously: a plain copy would wait for the GPU at every step."""
    noise_device = generator.device if generator is not None else torch.device(device)
    noise = torch.randn(tuple(shape), generator=generator, device=noise_device)
    if noise.device.type == "cpu" and torch.device(device).type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return randn(x.shape, generator, x.device).to(x.dtype)
