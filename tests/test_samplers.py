"""ddpm_samplers: the ancestral, DDIM and DPM-Solver++ (2M, 3M) samplers, the posterior they share and their timestep
spacings, checked against closed forms and against analytic noise predictors (conftest.GaussianMixtureNoise: the exact
E[eps | x_t] of a point mass, a Gaussian, a Gaussian mixture), so a correct sampler must return that distribution."""
import math

import pytest
import torch

from conftest import GaussianMixtureNoise, sample_1d, sampling, two_branch_model
from ddpm_diffusion import Diffusion
from ddpm_samplers import SAMPLERS, AncestralSampler, DDIMSampler, evenly_spaced_timesteps, make_sampler, sampler_class


@pytest.mark.parametrize("step,earlier", [(400, 399), (400, 250), (999, 0)])
def test_posterior_is_the_true_conditional_of_the_forward_chain(step, earlier):
    """Simulate x_s ~ q(x_s | x_0), then x_t ~ q(x_t | x_s); regressing x_s on x_t must give the posterior."""
    from ddpm_samplers import posterior

    diffusion = Diffusion(1000, "linear")
    generator = torch.Generator().manual_seed(0)
    n, x0 = 400_000, 0.7
    alpha_bar_s = diffusion.alphas_cumprod.double()[earlier]
    alpha_bar_t = diffusion.alphas_cumprod.double()[step]
    x_s = alpha_bar_s.sqrt() * x0 + (1 - alpha_bar_s).sqrt() * torch.randn(n, generator=generator, dtype=torch.float64)
    alpha = alpha_bar_t / alpha_bar_s
    x_t = alpha.sqrt() * x_s + (1 - alpha).sqrt() * torch.randn(n, generator=generator, dtype=torch.float64)
    slope = torch.cov(torch.stack([x_t, x_s]))[0, 1] / x_t.var()
    intercept = x_s.mean() - slope * x_t.mean()
    residual_var = (x_s - intercept - slope * x_t).var()
    coef_x0, coef_xt, variance = posterior(alpha_bar_t, alpha_bar_s)
    assert slope.item() == pytest.approx(coef_xt.item(), abs=0.01)
    assert intercept.item() == pytest.approx((coef_x0 * x0).item(), abs=0.01)
    assert residual_var.item() == pytest.approx(variance.item(), rel=0.02)


POINT = 0.37  # the data of the point-mass tests: x_0 = POINT


def point_mass_chain(sampler: str, steps: int | None, eta: float = 0.0, n: int = 20_000):
    """n one-pixel chains towards a point mass at POINT with its exact noise predictor, from seed 0: the timesteps, the
    chain's states at them (x_{t_0} = the start noise first) and the samples, in float64."""
    diffusion = Diffusion(200, "linear")
    trajectory = []
    generator = torch.Generator().manual_seed(0)
    model = GaussianMixtureNoise(diffusion, [POINT], std=0.0)
    samples = diffusion.sample(model, (n, 1, 1, 1), sampling(sampler=sampler, steps=steps, eta=eta), generator=generator,
                               trajectory=trajectory)
    timesteps = make_sampler(sampler, diffusion).timesteps(steps)
    assert len(trajectory) == len(timesteps) + 1
    alpha_bar = diffusion.alphas_cumprod.double()[timesteps]
    return alpha_bar, [x.flatten().double() for x in trajectory[:-1]], samples.flatten()


@pytest.mark.parametrize("sampler,steps", [("ddim", 25), ("dpm++2m", 10), ("dpm++3m", 10)])
def test_deterministic_samplers_follow_the_exact_path_to_a_point_mass(sampler, steps):
    """For data at one point c the x_0 prediction is c at every step, and the probability-flow ODE keeps
    eps = (x_t - sqrt(alpha_bar_t) c) / sqrt(1 - alpha_bar_t) fixed: every state is sqrt(alpha_bar_t) c +
    sqrt(1 - alpha_bar_t) eps_start, which DDIM and DPM-Solver++ (of any order: their extrapolated x_0 is c) reach
    exactly (measured within 3e-6), not only at the end, where any step that returns its x_0 prediction lands on c."""
    alpha_bar, states, samples = point_mass_chain(sampler, steps)
    torch.testing.assert_close(samples, torch.full_like(samples, POINT), atol=1e-4, rtol=0)
    eps = (states[0] - alpha_bar[0].sqrt() * POINT) / (1 - alpha_bar[0]).sqrt()
    for state, ab in zip(states[1:], alpha_bar[1:]):
        torch.testing.assert_close(state, ab.sqrt() * POINT + (1 - ab).sqrt() * eps, atol=2e-5, rtol=0)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("ddpm", 25, 0.0), ("ddim", 25, 1.0)])
def test_ancestral_samplers_pass_through_the_exact_marginals_to_a_point_mass(sampler, steps, eta):
    """The ancestral step (and DDIM with eta = 1) draws x_s from the true posterior q(x_s | x_t, x_0 = c), so started
    from x_{t_0} ~ N(0, 1) the state at every later timestep s is Gaussian with
        mean sqrt(alpha_bar_s) c - k sqrt(alpha_bar_{t_0}) c,
        variance 1 - alpha_bar_s - k^2 (1 - alpha_bar_{t_0}) + k^2,
    where k = Cov(x_s, x_{t_0}) / Var(x_{t_0}) under q given c = sqrt(alpha_bar_{t_0} / alpha_bar_s) (1 - alpha_bar_s)
    / (1 - alpha_bar_{t_0}).
    20,000 chains: every state's mean within 4 standard errors (at most 2.6 measured over the 200 states) and its
    standard deviation within 2.5% (1.2% measured; fixed_large's beta_t is 61% off)."""
    alpha_bar, states, samples = point_mass_chain(sampler, steps, eta)
    torch.testing.assert_close(samples, torch.full_like(samples, POINT), atol=1e-4, rtol=0)
    start = alpha_bar[0]
    for state, ab in zip(states[1:], alpha_bar[1:]):
        k = (start / ab).sqrt() * (1 - ab) / (1 - start)
        mean = ab.sqrt() * POINT - k * start.sqrt() * POINT
        std = (1 - ab - k**2 * (1 - start) + k**2).sqrt()
        assert abs(state.mean() - mean) < 4 * std / len(state) ** 0.5, (state.mean(), mean)
        assert state.std().item() == pytest.approx(std.item(), rel=0.025)


@pytest.mark.parametrize(
    "sampler,steps,eta,std_tolerance",
    [
        # The full ancestral chain and DPM-Solver++ are accurate; DDIM and a respaced ancestral
        # chain shrink the spread at few steps (discretisation error, see the convergence test).
        ("ddpm", None, 0.0, 0.03),
        ("dpm++2m", 20, 0.0, 0.03),
        ("dpm++2m", 50, 0.0, 0.03),
        ("ddim", 50, 0.0, 0.10),
        ("ddim", 100, 1.0, 0.10),
        ("ddpm", 100, 0.0, 0.10),
    ],
)
def test_samplers_recover_a_gaussian(sampler, steps, eta, std_tolerance):
    diffusion = Diffusion(1000, "linear")
    mean, std = 0.2, 0.3
    samples = sample_1d(diffusion, GaussianMixtureNoise(diffusion, [mean], std), 10_000, sampler=sampler, steps=steps, eta=eta)
    assert samples.mean().item() == pytest.approx(mean, abs=0.015)
    assert samples.std().item() == pytest.approx(std, rel=std_tolerance)


def test_ddim_error_shrinks_with_more_steps():
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, [0.2], 0.3)
    errors = [abs(sample_1d(diffusion, model, 5000, sampler="ddim", steps=steps).std().item() - 0.3) for steps in (10, 50, 250)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_ddim_with_eta_zero_is_deterministic_given_the_start_noise():
    diffusion = Diffusion(100, "cosine")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    first = sample_1d(diffusion, model, 128, seed=3, sampler="ddim", steps=20)
    second = sample_1d(diffusion, model, 128, seed=3, sampler="ddim", steps=20)
    other = sample_1d(diffusion, model, 128, seed=4, sampler="ddim", steps=20)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_sampler_output_is_in_range_and_reproducible_from_a_seed():
    diffusion = Diffusion(50, "sigmoid")
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  (a bad predictor: x_0 estimates fall outside [-1, 1])
    first = diffusion.sample(model, (4, 3, 8, 8), sampling(), generator=torch.Generator().manual_seed(1))
    second = diffusion.sample(model, (4, 3, 8, 8), sampling(), generator=torch.Generator().manual_seed(1))
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, second)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_steps_never_wait_for_the_device(tensor_reads, sampler):
    """No host read per sampling step (tensor_reads fixture): 40 steps make as many reads as 4."""
    diffusion = Diffusion(100, "linear")
    counts = {}
    for steps in (4, 40):
        tensor_reads["count"] = 0
        settings = sampling(guidance_scale=4.0, sampler=sampler, steps=steps, guidance_interval=(0.5, 50.0), eta=1.0)
        diffusion.sample(two_branch_model, (3, 1, 2, 2), settings, labels=torch.tensor([0, 1, 2]), null_label=10,
                         generator=torch.Generator().manual_seed(0))
        counts[steps] = tensor_reads["count"]
    assert counts[40] == counts[4], f"{(counts[40] - counts[4]) / 36:.1f} tensor reads per sampling step"


# Timestep spacings


def test_evenly_spaced_timesteps():
    assert evenly_spaced_timesteps(10, None) == list(range(9, -1, -1))
    steps = evenly_spaced_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="between 1 and 10"):
        evenly_spaced_timesteps(10, 11)


def test_log_snr_spacing_gives_distinct_timesteps_for_any_count():
    from ddpm_samplers import log_snr_spaced_timesteps

    alphas_cumprod = Diffusion(1000, "linear").alphas_cumprod
    for steps in (2, 10, 50, 300, 1000):
        timesteps = log_snr_spaced_timesteps(alphas_cumprod, steps)
        assert len(timesteps) == steps and timesteps[0] == 999 and timesteps[-1] == 0
        assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_log_snr_spacing_starts_the_cosine_schedule_below_its_clipped_end():
    """The cosine schedule's clipped last betas send lambda to about -9.9; without DPM_LAMBDA_MIN, 8 of 20 steps sat at t >= 992."""
    from ddpm_samplers import DPM_LAMBDA_MIN, log_snr_spaced_timesteps

    alphas_cumprod = Diffusion(1000, "cosine").alphas_cumprod.double()
    timesteps = log_snr_spaced_timesteps(alphas_cumprod, 20)
    assert sum(t >= 992 for t in timesteps) <= 2
    lambdas = 0.5 * (alphas_cumprod.log() - (1 - alphas_cumprod).log())
    assert lambdas[timesteps[0]] >= DPM_LAMBDA_MIN > lambdas[timesteps[0] + 1]
    assert len(log_snr_spaced_timesteps(alphas_cumprod, 1000)) == 1000, "more steps than the clipped range: it yields"


# DPM-Solver++ on both schedules


@pytest.mark.parametrize("schedule,means,std,tolerance", [
    # Wasserstein-1 distance of 20,000 samples to the exact distribution; before the log-SNR clip the cosine
    # rows measured 0.0104 (Gaussian) and 0.0188 (mixture), the linear ones as now (0.0030, 0.0110).
    ("linear", [0.2], 0.3, 0.006), ("linear", [-0.5, 0.5], 0.1, 0.015),
    ("cosine", [0.2], 0.3, 0.010), ("cosine", [-0.5, 0.5], 0.1, 0.013),
])
def test_dpm_solver_at_20_steps_on_both_schedules(schedule, means, std, tolerance):
    diffusion = Diffusion(1000, schedule)
    n, generator = 20_000, torch.Generator().manual_seed(123)
    component = torch.randint(0, len(means), (n,), generator=generator)
    exact = torch.tensor(means)[component] + std * torch.randn(n, generator=generator)
    samples = sample_1d(diffusion, GaussianMixtureNoise(diffusion, means, std), n, sampler="dpm++2m", steps=20)
    assert (samples.sort().values - exact.sort().values).abs().mean().item() < tolerance


# Samplers against a known two-component mixture, measured by the 1-D Wasserstein distance


MIXTURE = {"means": [-0.5, 0.4], "std": 0.12, "weights": [0.3, 0.7]}


def wasserstein_to_mixture(samples: torch.Tensor, means: list[float], std: float, weights: list[float]) -> float:
    """W1 = integral of |F_n(x) - F(x)| dx between the samples' empirical CDF and the exact mixture CDF.
    With 10,000 samples from the exact mixture itself it is about 0.006 (the noise floor)."""
    grid = torch.linspace(-2, 2, 40_001, dtype=torch.float64)
    exact = sum(w * 0.5 * (1 + torch.erf((grid - m) / (std * math.sqrt(2)))) for m, w in zip(means, weights))
    empirical = torch.searchsorted(samples.double().sort().values, grid, right=True) / len(samples)
    return ((empirical - exact).abs().sum() * (grid[1] - grid[0])).item()


def test_wasserstein_helper_separates_right_and_wrong_samples():
    generator = torch.Generator().manual_seed(0)
    component = torch.multinomial(torch.tensor(MIXTURE["weights"]), 10_000, replacement=True, generator=generator)
    right = torch.tensor(MIXTURE["means"])[component] + MIXTURE["std"] * torch.randn(10_000, generator=generator)
    assert wasserstein_to_mixture(right, **MIXTURE) < 0.012
    swapped = {**MIXTURE, "weights": [0.7, 0.3]}  # mass 0.4 moved over a distance 0.9: W1 = 0.36
    assert wasserstein_to_mixture(right, **swapped) == pytest.approx(0.36, abs=0.02)


@pytest.mark.parametrize(
    "sampler,steps,eta,tolerance",
    [
        # Tolerances in W1 against the exact mixture (noise floor about 0.006 with 10,000 samples):
        # the full ancestral chain and DPM-Solver++ at 20 steps are at the noise floor; DDIM and a
        # respaced ancestral chain pay a visible discretisation error at 50-100 steps.
        ("ddpm", None, 0.0, 0.02),
        ("ddpm", 100, 0.0, 0.03),
        ("ddim", 50, 0.0, 0.03),
        ("ddim", 100, 1.0, 0.03),
        ("dpm++2m", 20, 0.0, 0.02),
        ("dpm++3m", 20, 0.0, 0.02),
    ],
)
def test_samplers_recover_a_gaussian_mixture(sampler, steps, eta, tolerance):
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    samples = sample_1d(diffusion, model, 10_000, sampler=sampler, steps=steps, eta=eta)
    assert wasserstein_to_mixture(samples, **MIXTURE) < tolerance


def test_dpm_solver_at_20_steps_is_closer_than_ddim_at_20():
    """Second order pays off: from the same start noise, DPM-Solver++(2M) lands at about a quarter
    of DDIM's distance (about 0.01 against 0.04)."""
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    distance = {sampler: wasserstein_to_mixture(sample_1d(diffusion, model, 10_000, sampler=sampler, steps=20), **MIXTURE)
                for sampler in ("ddim", "dpm++2m")}
    assert distance["dpm++2m"] < 0.5 * distance["ddim"], distance


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_3m_at_10_steps_is_closer_to_the_mixture_than_2m(schedule):
    """Third order pays off at 10 steps on the mixture, from the same start noise: W1 measured 0.0257 against
    0.0272 (linear) and 0.0277 against 0.0301 (cosine), and 3M was the closer one for each of 5 seeds."""
    diffusion = Diffusion(1000, schedule)
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    distance = {sampler: wasserstein_to_mixture(sample_1d(diffusion, model, 10_000, sampler=sampler, steps=10), **MIXTURE)
                for sampler in ("dpm++2m", "dpm++3m")}
    assert distance["dpm++3m"] < 0.03, distance
    assert distance["dpm++3m"] < distance["dpm++2m"], distance


@pytest.mark.parametrize("schedule,steps,tolerance", [
    # W1 to the exact Gaussian (10,000 samples: noise floor about 0.005). Measured 0.0261 (linear) and 0.0257 (cosine)
    # at 10 steps, where dpm++2m lands closer (0.008: the quadratic extrapolation over steps of about 1 in lambda
    # widens the spread by 10%), and 0.0055 at 20.
    ("linear", 10, 0.035), ("cosine", 10, 0.035), ("linear", 20, 0.008),
])
def test_dpm_solver_3m_recovers_a_gaussian(schedule, steps, tolerance):
    diffusion = Diffusion(1000, schedule)
    samples = sample_1d(diffusion, GaussianMixtureNoise(diffusion, [0.2], 0.3), 10_000, sampler="dpm++3m", steps=steps)
    assert wasserstein_to_mixture(samples, means=[0.2], std=0.3, weights=[1.0]) < tolerance


def test_dpm_solver_with_guidance_solves_the_guided_ode():
    """Guided sampling has no closed form, and the ODE and ancestral samplers even sample different
    distributions under guidance; the reference is the same ODE solved with 1000 DDIM steps."""
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.4], 0.3)
    labels = torch.ones(10_000, dtype=torch.long)
    guided = lambda sampler, steps, w: sample_1d(diffusion, model, 10_000, labels=labels, guidance_scale=w, sampler=sampler, steps=steps)  # noqa: E731
    gap = lambda a, b: (a.sort().values - b.sort().values).abs().mean().item()  # noqa: E731  (W1 of equal-size samples)
    reference = guided("ddim", 1000, 3.0)
    assert gap(guided("dpm++2m", 20, 3.0), reference) < 0.025  # measured 0.016 (DDIM at 20 steps: 0.040)
    assert gap(guided("dpm++2m", 50, 3.0), reference) < 0.005  # measured 0.002: it converges to the same ODE
    assert gap(guided("dpm++3m", 20, 3.0), reference) < 0.012  # measured 0.007
    assert gap(guided("dpm++3m", 50, 3.0), reference) < 0.003  # measured 0.001
    assert gap(guided("dpm++2m", 20, 1.0), reference) > 0.05, "guidance must visibly change the distribution for this test to mean anything"


def test_each_sampler_says_its_default_steps_and_which_flags_it_takes():
    """The facts the command line asks of a sampler by its name: all T steps for the ancestral chain, 50 (at most T) for
    the others; --eta is DDIM's alone, --variance the ancestral sampler's alone; make_sampler hands each only its own."""
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpm++2m", "dpm++3m"]
    assert {name: (cls.default_steps(1000), cls.default_steps(30)) for name, cls in SAMPLERS.items()} == \
        {"ddpm": (1000, 30), "ddim": (50, 30), "dpm++2m": (50, 30), "dpm++3m": (50, 30)}
    assert [name for name, cls in SAMPLERS.items() if cls.takes_eta] == ["ddim"]
    assert [name for name, cls in SAMPLERS.items() if cls.takes_variance] == ["ddpm"]
    diffusion = Diffusion(40, "linear")
    assert len(make_sampler("ddpm", diffusion).timesteps(None)) == 40 and len(make_sampler("dpm++3m", diffusion).timesteps(None)) == 40
    ddim, ancestral = make_sampler("ddim", diffusion, eta=0.7, variance="fixed_large"), make_sampler("ddpm", diffusion, eta=0.7, variance="fixed_large")
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.7
    assert isinstance(ancestral, AncestralSampler) and ancestral.variance == "fixed_large"
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sampler_class("heun")
