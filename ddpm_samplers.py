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

# On real digits at the default guidance scale, dpm++3m at 10 steps measured as close to the data as 1,000 ancestral
# steps, a hundredth of the network evaluations: the cheapest setting that was (docs/after_training.md).
DPM3M_STEPS = 10
FEW_STEPS = 50  # network evaluations of the fast samplers when none are asked for (at most T)
# The ancestral sampler's sigma_t^2 (Ho et al., section 3.2): the posterior variance beta_tilde_t, optimal for x_0 at a
# point, or beta_t, optimal for x_0 ~ N(0, I). Ho et al. report their CIFAR-10 numbers with fixed_large.
VARIANCES = ("fixed_small", "fixed_large")
# DPM-Solver++ starts no higher than this lambda = log(alpha_t / sigma_t) (diffusers' `lambda_min_clipped`, the
# value it recommends for the cosine schedule; DPM-Solver's reference code likewise stops the cosine schedule short of
# t = 1). The cosine schedule's clipped last betas drive lambda to about -9.9, where log-SNR spacing would spend 8 of 20
# steps at t >= 992; the linear schedule ends at -5.06 and is not clipped.
DPM_LAMBDA_MIN = -5.1
# How a run's timesteps are spread (`spaced_timesteps`): uniformly in t, in log-SNR, or on EDM's polynomial noise levels
SPACINGS = ("time", "logsnr", "edm")
EDM_RHO = 7.0  # Karras et al. 2022, eq. 5 and Table 1


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


def half_log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = (log alpha_bar - log(1 - alpha_bar)) / 2, DPM-Solver's time variable."""
    return 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())


def evenly_spaced_timesteps(num_timesteps: int, steps: Optional[int]) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced; all T of them when steps is None."""
    if steps is None or steps == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def first_spaced_timestep(lambdas: torch.Tensor, steps: int, lambda_min: float) -> int:
    """The first timestep of a spacing in lambda or sigma: the last one whose lambda is at least `lambda_min`
    (DPM_LAMBDA_MIN), or later where that leaves fewer than `steps` timesteps."""
    return max(int((lambdas >= lambda_min).sum()) - 1, steps - 1)


def distinct_timesteps(indices: list[int]) -> list[int]:
    """Timesteps made strictly decreasing (each at least one below the one before), without running below 0."""
    steps = len(indices)
    for i in range(1, steps):
        indices[i] = min(indices[i], indices[i - 1] - 1)
    for i in range(steps):
        indices[i] = max(indices[i], steps - 1 - i)
    return indices


def check_spaced_steps(spacing: str, steps: int, num_timesteps: int) -> None:
    if not 2 <= steps <= num_timesteps:
        raise ValueError(
            f"the {spacing} timestep spacing needs between 2 and {num_timesteps} sampling steps, got {steps}"
        )


def log_snr_spaced_timesteps(alphas_cumprod: torch.Tensor, steps: int, lambda_min: float = DPM_LAMBDA_MIN) -> list[int]:
    """`steps` distinct timesteps down to 0 whose log-SNR (2 lambda) is as evenly spaced as integer steps
    allow: the DPM-Solver paper's "logSNR" skip type, recommended for low-resolution images (Lu et al. 2022,
    appendix). Evenly spaced t would leave one huge last step in lambda, which a second-order multistep
    solver overshoots. The first timestep is `first_spaced_timestep`'s."""
    num_timesteps = len(alphas_cumprod)
    check_spaced_steps("logsnr", steps, num_timesteps)
    lambdas = half_log_snr(alphas_cumprod.double().cpu())  # decreasing in t
    first = first_spaced_timestep(lambdas, steps, lambda_min)
    targets = torch.linspace(lambdas[first].item(), lambdas[0].item(), steps, dtype=torch.float64)
    return distinct_timesteps(torch.searchsorted(-lambdas, -targets).clamp(max=first).tolist())


def edm_spaced_timesteps(
    alphas_cumprod: torch.Tensor, steps: int, rho: float = EDM_RHO, lambda_min: float = DPM_LAMBDA_MIN
) -> list[int]:
    """`steps` distinct timesteps down to 0 on EDM's polynomial noise levels (Karras et al. 2022, eq. 5):
        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0 .. N - 1,
    in sigma = sqrt((1 - alpha_bar) / alpha_bar) = e^-lambda; rho = 7 crowds the steps towards sigma_min, where
    the images' details form. sigma_min is sigma at t = 0, sigma_max at `first_spaced_timestep` (linear schedule:
    t = T-1, sigma 157; EDM's own sigma_max is 80); each sigma_i goes to the timestep nearest in log sigma, then
    repeats are pushed down (`distinct_timesteps`)."""
    num_timesteps = len(alphas_cumprod)
    check_spaced_steps("edm", steps, num_timesteps)
    lambdas = half_log_snr(alphas_cumprod.double().cpu())  # lambda = -log sigma, decreasing in t
    first = first_spaced_timestep(lambdas, steps, lambda_min)
    sigma_max, sigma_min = (-lambdas[first]).exp(), (-lambdas[0]).exp()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    nearest = (sigmas.log()[:, None] + lambdas[None, : first + 1]).abs().argmin(dim=1)
    return distinct_timesteps(nearest.tolist())


def spaced_timesteps(spacing: str, alphas_cumprod: torch.Tensor, steps: int) -> list[int]:
    """The timesteps of a run of `steps` network evaluations, from T-1 (or the first of the spacing) down to 0, spaced
    uniformly in time ("time"), in log-SNR ("logsnr") or on EDM's polynomial noise levels ("edm", rho = 7)."""
    if spacing == "time":
        return evenly_spaced_timesteps(len(alphas_cumprod), steps)
    if spacing == "logsnr":
        return log_snr_spaced_timesteps(alphas_cumprod, steps)
    if spacing == "edm":
        return edm_spaced_timesteps(alphas_cumprod, steps)
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


class ScheduleView(Protocol):
    """What a sampler reads of a diffusion (ddpm_diffusion.Diffusion is one)."""

    num_timesteps: int
    alphas_cumprod: torch.Tensor
    variance: str

    def alpha_bar(self, t: int) -> torch.Tensor: ...


class Sampler:
    """The interface of every sampler, and what the command line asks of one by its --sampler name (`name`,
    `sampler_class`): its default number of steps and timestep spacing, and which of --eta, --variance and
    --timestep_spacing it takes. `make_sampler` builds a fresh one per run (the multistep solvers remember earlier
    steps)."""

    name: str  # the --sampler name
    takes_eta = False  # --eta, DDIM's noise
    takes_variance = False  # --variance, the ancestral sampler's sigma_t^2 (VARIANCES)
    takes_spacing = True  # --timestep_spacing (SPACINGS)
    default_spacing = "time"  # its spacing when none is asked for
    diffusion: ScheduleView
    spacing: str

    @classmethod
    def default_steps(cls, num_timesteps: int) -> int:
        """Network evaluations per image when none are asked for: FEW_STEPS, at most T."""
        return min(FEW_STEPS, num_timesteps)

    @classmethod
    def chosen_spacing(cls, spacing: Optional[str]) -> str:
        """`spacing`, or the sampler's default where it is None."""
        spacing = spacing or cls.default_spacing
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        return spacing

    def timesteps(self, steps: Optional[int]) -> list[int]:
        """The timesteps of a run with `steps` network evaluations (None: the sampler's default), from high to low."""
        steps = self.default_steps(self.diffusion.num_timesteps) if steps is None else steps
        return spaced_timesteps(self.spacing, self.diffusion.alphas_cumprod, steps)

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """x_{t_prev} from x_t and the noise estimate at t; t_prev = -1 is the clean image."""
        raise NotImplementedError


def predicted_x0(x: torch.Tensor, alpha_bar_t: torch.Tensor, eps: torch.Tensor, clip: bool) -> torch.Tensor:
    """The x_0 that the noise estimate implies, clipped to the data range [-1, 1] when `clip`."""
    x0 = x0_from_eps(x, alpha_bar_t, eps)
    return x0.clamp(-1, 1) if clip else x0


class AncestralSampler(Sampler):
    """Ho et al. Algorithm 2: x_{t_prev} ~ N(mean of q(x_{t_prev} | x_t, x_0 = predicted x_0), sigma_t^2), with
    sigma_t^2 = beta_tilde_t (fixed_small, the posterior variance) or beta_t (fixed_large); no noise is added on
    the last step. On a respaced chain t_prev is the next kept step and beta_t = 1 - alpha_bar_t / alpha_bar_{t_prev}
    (Improved DDPM, section 4). `variance` None: the diffusion's. By default the whole chain of T steps."""

    name = "ddpm"
    takes_variance = True
    takes_spacing = False  # evenly spaced, as Improved DDPM respaces it

    @classmethod
    def default_steps(cls, num_timesteps: int) -> int:
        return num_timesteps

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True, variance: Optional[str] = None):
        variance = variance or diffusion.variance
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
        self.diffusion, self.clip_denoised, self.variance, self.spacing = diffusion, clip_denoised, variance, "time"

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        coef_x0, coef_xt, variance = posterior(alpha_bar_t, alpha_bar_s)
        if self.variance == "fixed_large" and t_prev >= 0:
            variance = 1 - alpha_bar_t / alpha_bar_s
        mean = coef_x0 * predicted_x0(x, alpha_bar_t, eps, self.clip_denoised) + coef_xt * x
        return mean + variance.sqrt() * randn_like(x, generator)


class DDIMSampler(Sampler):
    """One DDIM step (Song et al. 2021, eq. 12) with sigma = eta * sqrt(posterior variance) (eq. 16):
    eta = 0 is deterministic; eta = 1 has the ancestral step's variance. With eta = 0 it is Euler's method on the
    probability-flow ODE in x / sqrt(alpha_bar) against sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022,
    section 3). By default on evenly spaced timesteps."""

    name = "ddim"
    takes_eta = True

    def __init__(
        self, diffusion: ScheduleView, eta: float = 0.0, clip_denoised: bool = True, spacing: Optional[str] = None
    ):
        self.diffusion, self.eta, self.clip_denoised = diffusion, eta, clip_denoised
        self.spacing = self.chosen_spacing(spacing)

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        x0 = predicted_x0(x, alpha_bar_t, eps, self.clip_denoised)
        if self.clip_denoised:  # the direction towards x_t must agree with the clipped x_0
            eps = eps_from_x0(x, alpha_bar_t, x0)
        sigma = self.eta * posterior(alpha_bar_t, alpha_bar_s)[2].sqrt()
        direction = (1 - alpha_bar_s - sigma**2).clamp(min=0).sqrt()
        return alpha_bar_s.sqrt() * x0 + direction * eps + sigma * randn_like(x, generator)


class MultistepDPMSolverPlusPlus(Sampler):
    """Multistep DPM-Solver++ in data-prediction form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
    of Diffusion Probabilistic Models"), of order 2 (DPMSolverPlusPlus2M) or 3 (DPMSolverPlusPlus3M), by default on
    log-SNR-spaced steps (`log_snr_spaced_timesteps`).

    Time is lambda = log(alpha / sigma) (`half_log_snr`), with alpha = sqrt(alpha_bar) and sigma = sqrt(1 - alpha_bar).
    From t to s = t_prev, h = lambda_s - lambda_t > 0, the diffusion ODE written for the data prediction x_0 has the
    exact solution (variation of constants; the data-prediction counterpart of eq. 3.4 of DPM-Solver, Lu et al. 2022a)
        x_s = (sigma_s / sigma_t) x_t + sigma_s * integral_{lambda_t}^{lambda_s} e^lambda x_0(lambda) dlambda.     (E)
    DPM-Solver++ of order k replaces x_0(lambda) in (E) by its Taylor expansion at lambda_t up to order k - 1, whose
    integrals are alpha_s * phi_1, phi_2, phi_3 below; a multistep solver estimates the derivatives from the x_0
    predictions of the last k steps (one network evaluation per step). With m0 the x_0 prediction at t, m1 and m2
    those of the previous two steps, h_1 = lambda_t - lambda_{t of m1} and h_2 the step before it in lambda:
        phi_1 = e^{-h} - 1 (expm1),  phi_2 = phi_1 / h + 1,  phi_3 = phi_2 / h - 1/2
        order 1: x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 m0                  (DDIM, Song et al. 2021)          (1)
        order 2: (1) with m0 replaced by D = (1 + 1/(2 r)) m0 - 1/(2 r) m1, r = h_1 / h  (DPM-Solver++(2M), Alg. 2)  (2)
        order 3: r0 = h_1 / h, r1 = h_2 / h, D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
                 D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)  (= h x_0' + O(h^3)),
                 D2 = (D1_0 - D1_1) / (r0 + r1)            (= h^2 x_0'' / 2 + O(h^3)),
                 x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 m0 + alpha_s phi_2 D1 - alpha_s phi_3 D2       (3)
    (3) is the third-order multistep rule as the authors' reference code (`multistep_dpm_solver_third_update` in
    LuChengTHU/dpm-solver's dpm_solver_pytorch.py) and diffusers' DPMSolverMultistepScheduler (solver_order=3,
    algorithm_type="dpmsolver++") implement it; tests/test_diffusers.py pins it to the latter. Note that the x_0'' term
    of (E)'s expansion is -alpha_s phi_3 h^2 x_0'' = -2 alpha_s phi_3 D2, so (3) carries half of it: its local error
    is O(h^3), not a third-order step's O(h^4) (with 2 D2 it would be exact for any x_0 quadratic in lambda). Kept as
    implemented there: on the analytic mixture of tests/test_samplers.py the full coefficient measured closer at 10
    steps but farther at 15 to 30.

    The first step is first order, the second at most second order, then `order`. The final step to the clean image
    (t_prev = -1: alpha_s = 1, sigma_s = 0, e^{-h} = 0) is (1), i.e. it returns the x_0 prediction, as diffusers does
    with final_sigmas_type="zero"; the step before it, into t = 0, is of full order (diffusers' lower_order_final=False,
    which is also what its default does from 15 steps on; measured, lowering it costs accuracy at 10 steps).

    The sampler keeps the x_0 predictions and lambdas of the previous steps (`history`), so it serves one run;
    `make_sampler` makes a fresh one. All of it stays on the device: a step reads nothing back.
    """

    default_spacing = "logsnr"

    def __init__(self, diffusion: ScheduleView, order: int, clip_denoised: bool = True, spacing: Optional[str] = None):
        if order not in (2, 3):
            raise ValueError(f"multistep DPM-Solver++ has order 2 or 3, got {order}")
        self.diffusion, self.order, self.clip_denoised = diffusion, order, clip_denoised
        self.spacing = self.chosen_spacing(spacing)
        # (x_0 prediction, lambda) of the previous steps, oldest first, at most order - 1 of them
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        m0 = predicted_x0(x, alpha_bar_t, eps, self.clip_denoised)
        if t_prev == -1:
            return m0  # (1) with alpha_s = 1, sigma_s = 0
        lambda_t, lambda_s = half_log_snr(alpha_bar_t), half_log_snr(alpha_bar_s)
        h = lambda_s - lambda_t
        sigma_ratio, alpha_s, phi_1 = (
            ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt(),
            alpha_bar_s.sqrt(),
            torch.expm1(-h),
        )
        previous = self.history[-(self.order - 1) :]
        self.history = [*previous, (m0, lambda_t)]
        if not previous:
            return sigma_ratio * x - alpha_s * phi_1 * m0  # (1)
        if len(previous) == 1:
            ((m1, lambda_1),) = previous
            r = (lambda_t - lambda_1) / h
            denoised = (1 + 1 / (2 * r)) * m0 - (1 / (2 * r)) * m1
            return sigma_ratio * x - alpha_s * phi_1 * denoised  # (2)
        (m2, lambda_2), (m1, lambda_1) = previous
        r0, r1 = (lambda_t - lambda_1) / h, (lambda_1 - lambda_2) / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        return sigma_ratio * x - alpha_s * phi_1 * m0 + alpha_s * phi_2 * d1 - alpha_s * phi_3 * d2  # (3)


class DPMSolverPlusPlus2M(MultistepDPMSolverPlusPlus):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): MultistepDPMSolverPlusPlus of order 2. The first step is first order
    (DDIM); later steps extrapolate the x_0 predictions of the last two steps; the final step returns the x_0
    prediction."""

    name = "dpm++2m"

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True, spacing: Optional[str] = None):
        super().__init__(diffusion, 2, clip_denoised, spacing)


class DPMSolverPlusPlus3M(MultistepDPMSolverPlusPlus):
    """DPM-Solver++(3M): MultistepDPMSolverPlusPlus of order 3, rule (3) there. The first step is first order, the
    second second order, then third order; the final step returns the x_0 prediction."""

    name = "dpm++3m"

    @classmethod
    def default_steps(cls, num_timesteps: int) -> int:
        """DPM3M_STEPS, at most T: the --inference default, chosen by measurement (docs/after_training.md)."""
        return min(DPM3M_STEPS, num_timesteps)

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True, spacing: Optional[str] = None):
        super().__init__(diffusion, 3, clip_denoised, spacing)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (AncestralSampler, DDIMSampler, DPMSolverPlusPlus2M, DPMSolverPlusPlus3M)
}


def sampler_class(name: str) -> type[Sampler]:
    """The sampler of a --sampler name, whose class attributes say what it takes (`Sampler`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def make_sampler(
    name: str,
    diffusion: ScheduleView,
    eta: float = 0.0,
    clip_denoised: bool = True,
    variance: Optional[str] = None,
    spacing: Optional[str] = None,
) -> Sampler:
    """A fresh sampler (the multistep solvers keep the previous steps' predictions, so one per run) by its --sampler
    name; `eta` goes to the sampler that takes it (DDIM), `variance` to the one that takes it (the ancestral sampler),
    `spacing` (None: the sampler's own) to those that take it (all but the ancestral one)."""
    cls = sampler_class(name)
    return cls(
        diffusion,
        clip_denoised=clip_denoised,
        **({"eta": eta} if cls.takes_eta else {}),
        **({"variance": variance} if cls.takes_variance else {}),
        **({"spacing": spacing} if cls.takes_spacing else {}),
    )


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


# The solvers of ddpm_solvers (UniPC, iPNDM, DPM-Solver++(2M) SDE) build on this module and register themselves in
# SAMPLERS; imported last, so that whichever of the two modules is imported first, SAMPLERS holds them all.
import ddpm_solvers  # noqa: E402,F401
