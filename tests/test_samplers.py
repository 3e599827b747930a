"""ddpm_samplers and ddpm_solvers: the ancestral, DDIM, DPM-Solver++ (2M, 3M), UniPC, iPNDM and DPM-Solver++(2M) SDE
samplers, the posterior they share and their timestep spacings, checked against closed forms and against analytic noise
predictors (conftest.GaussianMixtureNoise: the exact E[eps | x_t] of a point mass, a Gaussian, a Gaussian mixture), so a
correct sampler must return that distribution. tests/test_diffusers.py pins the solvers that diffusers has."""

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
    samples = diffusion.sample(
        model, (n, 1, 1, 1), sampling(sampler=sampler, steps=steps, eta=eta), generator=generator, trajectory=trajectory
    )
    timesteps = make_sampler(sampler, diffusion).timesteps(steps)
    assert len(trajectory) == len(timesteps) + 1
    alpha_bar = diffusion.alphas_cumprod.double()[timesteps]
    return alpha_bar, [x.flatten().double() for x in trajectory[:-1]], samples.flatten()


@pytest.mark.parametrize(
    "sampler,steps,tolerance",
    [
        ("ddim", 25, 1e-4),
        ("dpm++2m", 10, 1e-4),
        ("dpm++3m", 10, 1e-4),
        ("unipc", 10, 1e-4),
        # iPNDM sums 4 float32 eps estimates with weights of total size 6.7 over steps of up to 60 in sigma: measured
        # 1.2e-4
        ("ipndm", 10, 3e-4),
    ],
)
def test_deterministic_samplers_follow_the_exact_path_to_a_point_mass(sampler, steps, tolerance):
    """For data at one point c the x_0 prediction is c at every step, and the probability-flow ODE keeps
    eps = (x_t - sqrt(alpha_bar_t) c) / sqrt(1 - alpha_bar_t) fixed: every state is sqrt(alpha_bar_t) c +
    sqrt(1 - alpha_bar_t) eps_start, which DDIM, DPM-Solver++ and UniPC (of any order: their extrapolated x_0 is c) and
    iPNDM (its eps is constant, so every Adams-Bashforth weight set integrates it exactly) reach exactly (measured
    within 3e-6; iPNDM 6e-5), not only at the end, where any step that returns its x_0 prediction lands on c."""
    alpha_bar, states, samples = point_mass_chain(sampler, steps)
    torch.testing.assert_close(samples, torch.full_like(samples, POINT), atol=tolerance, rtol=0)
    eps = (states[0] - alpha_bar[0].sqrt() * POINT) / (1 - alpha_bar[0]).sqrt()
    for state, ab in zip(states[1:], alpha_bar[1:]):
        torch.testing.assert_close(state, ab.sqrt() * POINT + (1 - ab).sqrt() * eps, atol=tolerance / 2, rtol=0)


@pytest.mark.parametrize(
    "sampler,steps,eta", [("ddpm", None, 0.0), ("ddpm", 25, 0.0), ("ddim", 25, 1.0), ("dpm++2m-sde", 25, 0.0)]
)
def test_ancestral_samplers_pass_through_the_exact_marginals_to_a_point_mass(sampler, steps, eta):
    """The ancestral step (and DDIM with eta = 1, and DPM-Solver++(2M) SDE, whose step with x_0 known is that posterior
    step and whose second-order term vanishes for a constant x_0) draws x_s from the true posterior q(x_s | x_t, x_0 =
    c), so started from x_{t_0} ~ N(0, 1) the state at every later timestep s is Gaussian with
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
    samples = sample_1d(
        diffusion, GaussianMixtureNoise(diffusion, [mean], std), 10_000, sampler=sampler, steps=steps, eta=eta
    )
    assert samples.mean().item() == pytest.approx(mean, abs=0.015)
    assert samples.std().item() == pytest.approx(std, rel=std_tolerance)


def test_ddim_error_shrinks_with_more_steps():
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, [0.2], 0.3)
    errors = [
        abs(sample_1d(diffusion, model, 5000, sampler="ddim", steps=steps).std().item() - 0.3)
        for steps in (10, 50, 250)
    ]
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
        diffusion.sample(
            two_branch_model,
            (3, 1, 2, 2),
            settings,
            labels=torch.tensor([0, 1, 2]),
            null_label=10,
            generator=torch.Generator().manual_seed(0),
        )
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
    """The cosine schedule's clipped last betas send lambda to about -9.9; without DPM_LAMBDA_MIN, 8 of 20 steps sat at
    t >= 992."""
    from ddpm_samplers import DPM_LAMBDA_MIN, log_snr_spaced_timesteps

    alphas_cumprod = Diffusion(1000, "cosine").alphas_cumprod.double()
    timesteps = log_snr_spaced_timesteps(alphas_cumprod, 20)
    assert sum(t >= 992 for t in timesteps) <= 2
    lambdas = 0.5 * (alphas_cumprod.log() - (1 - alphas_cumprod).log())
    assert lambdas[timesteps[0]] >= DPM_LAMBDA_MIN > lambdas[timesteps[0] + 1]
    assert len(log_snr_spaced_timesteps(alphas_cumprod, 1000)) == 1000, "more steps than the clipped range: it yields"


# DPM-Solver++ on both schedules


@pytest.mark.parametrize(
    "schedule,means,std,tolerance",
    [
        # Wasserstein-1 distance of 20,000 samples to the exact distribution; before the log-SNR clip the cosine
        # rows measured 0.0104 (Gaussian) and 0.0188 (mixture), the linear ones as now (0.0030, 0.0110).
        ("linear", [0.2], 0.3, 0.006),
        ("linear", [-0.5, 0.5], 0.1, 0.015),
        ("cosine", [0.2], 0.3, 0.010),
        ("cosine", [-0.5, 0.5], 0.1, 0.013),
    ],
)
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
    distance = {
        sampler: wasserstein_to_mixture(sample_1d(diffusion, model, 10_000, sampler=sampler, steps=20), **MIXTURE)
        for sampler in ("ddim", "dpm++2m")
    }
    assert distance["dpm++2m"] < 0.5 * distance["ddim"], distance


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_3m_at_10_steps_is_closer_to_the_mixture_than_2m(schedule):
    """Third order pays off at 10 steps on the mixture, from the same start noise: W1 measured 0.0257 against
    0.0272 (linear) and 0.0277 against 0.0301 (cosine), and 3M was the closer one for each of 5 seeds."""
    diffusion = Diffusion(1000, schedule)
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    distance = {
        sampler: wasserstein_to_mixture(sample_1d(diffusion, model, 10_000, sampler=sampler, steps=10), **MIXTURE)
        for sampler in ("dpm++2m", "dpm++3m")
    }
    assert distance["dpm++3m"] < 0.03, distance
    assert distance["dpm++3m"] < distance["dpm++2m"], distance


@pytest.mark.parametrize(
    "schedule,steps,tolerance",
    [
        # W1 to the exact Gaussian (10,000 samples: noise floor about 0.005). Measured 0.0261 (linear) and 0.0257
        # (cosine) at 10 steps, where dpm++2m lands closer (0.008: the quadratic extrapolation over steps of about 1 in
        # lambda widens the spread by 10%), and 0.0055 at 20.
        ("linear", 10, 0.035),
        ("cosine", 10, 0.035),
        ("linear", 20, 0.008),
    ],
)
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

    def guided(sampler, steps, w):
        return sample_1d(diffusion, model, 10_000, labels=labels, guidance_scale=w, sampler=sampler, steps=steps)

    gap = lambda a, b: (a.sort().values - b.sort().values).abs().mean().item()  # noqa: E731  (W1 of equal-size samples)
    reference = guided("ddim", 1000, 3.0)
    assert gap(guided("dpm++2m", 20, 3.0), reference) < 0.025  # measured 0.016 (DDIM at 20 steps: 0.040)
    assert gap(guided("dpm++2m", 50, 3.0), reference) < 0.005  # measured 0.002: it converges to the same ODE
    assert gap(guided("dpm++3m", 20, 3.0), reference) < 0.012  # measured 0.007
    assert gap(guided("dpm++3m", 50, 3.0), reference) < 0.003  # measured 0.001
    assert gap(guided("dpm++2m", 20, 1.0), reference) > 0.05, (
        "guidance must visibly change the distribution for this test to mean anything"
    )


def test_each_sampler_says_its_default_steps_and_which_flags_it_takes():
    """The facts the command line asks of a sampler by its name: all T steps for the ancestral chain, 10 for dpm++3m
    (the --inference default, measured), 50 for the others, at most T; --eta is DDIM's alone, --variance the ancestral
    sampler's alone, --timestep_spacing everyone's but the ancestral sampler's, with each one's default; make_sampler
    hands each only its own."""
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpm++2m", "dpm++3m", "unipc", "ipndm", "dpm++2m-sde"]
    assert {name: (cls.default_steps(1000), cls.default_steps(30)) for name, cls in SAMPLERS.items()} == {
        "ddpm": (1000, 30),
        "dpm++3m": (10, 10),
        **{name: (50, 30) for name in SAMPLERS if name not in ("ddpm", "dpm++3m")},
    }
    assert [name for name, cls in SAMPLERS.items() if cls.takes_eta] == ["ddim"]
    assert [name for name, cls in SAMPLERS.items() if cls.takes_variance] == ["ddpm"]
    assert {name: cls.default_spacing for name, cls in SAMPLERS.items() if cls.takes_spacing} == {
        "ddim": "time",
        "dpm++2m": "logsnr",
        "dpm++3m": "logsnr",
        "unipc": "logsnr",
        "ipndm": "logsnr",
        "dpm++2m-sde": "logsnr",
    }
    assert make_sampler("unipc", Diffusion(100, "linear"), spacing="edm").spacing == "edm"
    diffusion = Diffusion(40, "linear")
    assert (
        len(make_sampler("ddpm", diffusion).timesteps(None)) == 40
        and len(make_sampler("dpm++3m", diffusion).timesteps(None)) == 10
        and len(make_sampler("dpm++2m", diffusion).timesteps(None)) == 40
    )
    ddim, ancestral = (
        make_sampler("ddim", diffusion, eta=0.7, variance="fixed_large"),
        make_sampler("ddpm", diffusion, eta=0.7, variance="fixed_large"),
    )
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.7
    assert isinstance(ancestral, AncestralSampler) and ancestral.variance == "fixed_large"
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sampler_class("heun")


# Timestep spacing as a choice (--timestep_spacing)


def test_spacings_keep_each_samplers_own_timesteps_by_default():
    """The spacing of the samplers that predate the choice stays their default, so their images stay the same."""
    from ddpm_samplers import log_snr_spaced_timesteps, spaced_timesteps

    diffusion = Diffusion(1000, "linear")
    assert (
        make_sampler("ddim", diffusion).timesteps(20)
        == evenly_spaced_timesteps(1000, 20)
        == spaced_timesteps("time", diffusion.alphas_cumprod, 20)
    )
    for name in ("dpm++2m", "dpm++3m"):
        assert make_sampler(name, diffusion).timesteps(20) == log_snr_spaced_timesteps(diffusion.alphas_cumprod, 20)
    assert make_sampler("dpm++2m", diffusion, spacing="time").timesteps(20) == evenly_spaced_timesteps(1000, 20)
    with pytest.raises(ValueError, match="unknown timestep spacing 'karras'"):
        make_sampler("unipc", diffusion, spacing="karras")
    with pytest.raises(ValueError, match="the edm timestep spacing needs between 2 and 1000 sampling steps, got 1"):
        make_sampler("ipndm", diffusion, spacing="edm").timesteps(1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_edm_spacing_takes_the_timesteps_nearest_to_karras_noise_levels(schedule):
    """EDM's eq. 5 with rho = 7 between sigma at t = 0 and at the log-SNR spacing's first timestep, recomputed here in
    float64 from the schedule's betas: each timestep is the one nearest in log sigma where that is free of repeats, the
    steps crowd towards low noise (rho = 7: the last gap in sigma^(1/7) equals the first), and any count gives distinct
    timesteps from that first one down to 0."""
    from ddpm_diffusion import make_beta_schedule
    from ddpm_samplers import edm_spaced_timesteps, log_snr_spaced_timesteps

    alphas_cumprod = torch.cumprod(1 - make_beta_schedule(schedule, 1000), dim=0)
    log_sigmas = 0.5 * ((1 - alphas_cumprod).log() - alphas_cumprod.log())
    first = log_snr_spaced_timesteps(alphas_cumprod, 10)[0]
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    root_max, root_min = (log_sigmas[first] / 7).exp(), (log_sigmas[0] / 7).exp()
    targets = 7 * (root_max + ramp * (root_min - root_max)).log()
    timesteps = edm_spaced_timesteps(alphas_cumprod, 10)
    assert timesteps[0] == first and timesteps[-1] == 0
    assert timesteps == [int((log_sigmas[: first + 1] - target).abs().argmin()) for target in targets]
    sigmas = log_sigmas[timesteps].exp()
    assert (sigmas[:-1] - sigmas[1:]).tolist() == sorted((sigmas[:-1] - sigmas[1:]).tolist(), reverse=True), (
        "shrinking steps"
    )
    for steps in (2, 50, 300, 1000):
        spaced = edm_spaced_timesteps(alphas_cumprod, steps)
        assert len(spaced) == steps and spaced[-1] == 0 and all(a > b for a, b in zip(spaced, spaced[1:]))


# UniPC, iPNDM and DPM-Solver++(2M) SDE (ddpm_solvers)


class SigmaGrid:
    """A schedule (ddpm_samplers.ScheduleView) whose timestep t has the noise level sigmas[t] exactly, in float64:
    alpha_bar = 1 / (1 + sigma^2); t = -1 is the clean image. It lets a solver step on any grid of sigmas."""

    variance = "fixed_small"

    def __init__(self, sigmas: torch.Tensor):
        self.alphas_cumprod = 1 / (1 + sigmas.double() ** 2)
        self.num_timesteps = len(sigmas)
        self.with_clean = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])

    def alpha_bar(self, t: int) -> torch.Tensor:
        return self.with_clean[t]


GAUSSIAN = (
    0.2,
    0.5,
)  # data N(0.2, 0.5^2): along the probability-flow ODE, y = x / sqrt(alpha_bar) = mu + c sqrt(std^2 + sigma^2)
STARTS = torch.linspace(-2, 2, 9, dtype=torch.float64)  # the constants c of nine exact paths


def gaussian_path(sigma: torch.Tensor) -> torch.Tensor:
    mean, std = GAUSSIAN
    return mean + STARTS * (std**2 + sigma**2).sqrt()


def ipndm_local_errors(order: int, h: float, steps: int = 5, sigma_0: float = 1.0) -> list[float]:
    """The error in y of each of the first `steps` iPNDM steps of size h in sigma, each taken from the exact path with
    the exact eps history (so it is that step's local error alone)."""
    from ddpm_solvers import IPNDM

    nodes = sigma_0 - h * torch.arange(steps + 1, dtype=torch.float64)
    grid = SigmaGrid(nodes.flip(0))
    model, solver = (
        GaussianMixtureNoise(grid, [GAUSSIAN[0]], GAUSSIAN[1]),
        IPNDM(grid, clip_denoised=False, order=order),
    )
    errors = []
    for j in range(steps):
        t = steps - j
        x = grid.alpha_bar(t).sqrt() * gaussian_path(nodes[j])
        x_next = solver.step(x, t, t - 1, model(x, torch.full((len(x),), t), None))
        errors.append((x_next / grid.alpha_bar(t - 1).sqrt() - gaussian_path(nodes[j + 1])).abs().max().item())
    return errors


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_steps_have_the_local_error_of_their_adams_bashforth_order(order):
    """iPNDM capped at `order`: step j (from 1) is Adams-Bashforth of order min(j, order), the warm-up's lower orders
    first, so its local error on the exact Gaussian path falls as h^(min(j, order) + 1). Measured slopes between
    h = 0.02 and 0.01: 2.01, 3.04, 4.07, 5.11 (one more step of each order: 2.05, 3.08, 4.12, 5.16)."""
    coarse, fine = ipndm_local_errors(order, 0.02), ipndm_local_errors(order, 0.01)
    slopes = [math.log2(a / b) for a, b in zip(coarse, fine)]
    assert slopes == pytest.approx([min(j, order) + 1 for j in range(1, 6)], abs=0.5), slopes


def ipndm_global_error(order: int, steps: int, sigma_max: float = 20.0) -> float:
    """The largest error at sigma = 0 of iPNDM capped at `order` over `steps` equal steps in sigma from sigma_max,
    against the closed form of the Gaussian's probability-flow ODE."""
    from ddpm_solvers import IPNDM

    grid = SigmaGrid(sigma_max * torch.arange(1, steps + 1, dtype=torch.float64) / steps)
    model, solver = (
        GaussianMixtureNoise(grid, [GAUSSIAN[0]], GAUSSIAN[1]),
        IPNDM(grid, clip_denoised=False, order=order),
    )
    x = grid.alpha_bar(steps - 1).sqrt() * gaussian_path(torch.tensor(sigma_max, dtype=torch.float64))
    for t in range(steps - 1, -1, -1):
        x = solver.step(x, t, t - 1, model(x, torch.full((len(x),), t), None))
    return (x - gaussian_path(torch.tensor(0.0, dtype=torch.float64))).abs().max().item()


def test_ipndm_global_error_falls_with_its_order():
    """The whole solve from sigma 20 to 0 on equal steps: orders 1 and 2 converge at their order (measured slopes 0.97
    and 1.98 between 200 and 400 steps). Orders 3 and 4 show no clean slope: their error is the sum of the
    Adams-Bashforth error and that of the warm-up's first-order first step (local error h^2, small because eps hardly
    changes at high noise), of opposite signs, which cancel at some step counts (order 4 at 100 steps: 2.7e-6). At 400
    steps they land far closer than order 2 (measured 3.9e-2, 3.2e-3, 1.3e-5, 9.4e-5 for orders 1 to 4)."""
    errors = {order: [ipndm_global_error(order, steps) for steps in (200, 400)] for order in (1, 2, 3, 4)}
    for order in (1, 2):
        assert math.log2(errors[order][0] / errors[order][1]) == pytest.approx(order, abs=0.5), errors
    assert errors[1][1] > errors[2][1] > 20 * max(errors[3][1], errors[4][1]), errors


def test_ipndm_of_order_one_is_ddim():
    """Euler's method on dy/dsigma = eps is DDIM with eta = 0 (Karras et al. 2022, section 3), with clipping too (in
    float64, so that the identity is checked, not float32's rounding: the cosine schedule's first step multiplies x by
    about 1,000)."""
    from ddpm_solvers import IPNDM

    diffusion = Diffusion(1000, "cosine")
    diffusion.alphas_cumprod_and_clean = (
        diffusion.alphas_cumprod_and_clean.double()
    )  # the samplers' alpha_bar in float64
    model = GaussianMixtureNoise(diffusion, [-0.9, 0.8], 0.3)
    ddim, euler = DDIMSampler(diffusion, eta=0.0), IPNDM(diffusion, order=1, spacing="time")
    x = y = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timesteps = ddim.timesteps(10)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = ddim.step(x, t, t_prev, model(x, torch.full((2000,), t), None), None)
        y = euler.step(y, t, t_prev, model(y, torch.full((2000,), t), None))
    assert x.abs().max() == 1, "clipping acted"
    torch.testing.assert_close(y, x, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "sampler,steps,tolerance",
    [
        # W1 to the exact mixture (noise floor about 0.006); measured 0.0080, 0.0083 and 0.0080 on the linear schedule
        ("unipc", 20, 0.015),
        ("ipndm", 20, 0.015),
        ("dpm++2m-sde", 50, 0.015),
    ],
)
def test_new_solvers_recover_a_gaussian_mixture(sampler, steps, tolerance):
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    samples = sample_1d(diffusion, model, 10_000, sampler=sampler, steps=steps)
    assert wasserstein_to_mixture(samples, **MIXTURE) < tolerance


def test_the_sde_solver_needs_far_fewer_steps_than_the_ancestral_chain():
    """DPM-Solver++(2M) SDE at 20 steps lands closer to the mixture than the ancestral sampler at 100 (W1 measured
    0.0107 against 0.0150; the ancestral chain at 20 steps 0.056), both stochastic, on the linear schedule."""
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    distance = {
        sampler: wasserstein_to_mixture(sample_1d(diffusion, model, 10_000, sampler=sampler, steps=steps), **MIXTURE)
        for sampler, steps in (("dpm++2m-sde", 20), ("ddpm", 100))
    }
    assert distance["dpm++2m-sde"] < 0.015 and distance["dpm++2m-sde"] < distance["ddpm"], distance


def test_solvers_on_each_spacing_converge_to_the_probability_flow_solution():
    """Every deterministic solver on every spacing, from the same start noise, against the ODE solved closely (dpm++3m,
    200 steps): at 20 steps within 0.05 on average of it, and closer than at 5 steps (not so the multistep solvers on
    time spacing, below). Measured mean |x - x_ODE| at 5, 10 and 20 steps on the mixture (linear schedule; the cosine
    one alike), the figures behind each solver's default spacing:
        ddim     time 0.243 0.110 0.041   logsnr 0.161 0.068 0.032   edm 0.171 0.089 0.041
        dpm++2m  time 0.109 0.200 0.131   logsnr 0.049 0.030 0.006   edm 0.090 0.064 0.019
        dpm++3m  time 0.251 0.413 0.323   logsnr 0.114 0.023 0.002   edm 0.250 0.135 0.016
        unipc    time 0.109 0.215 0.142   logsnr 0.051 0.024 0.002   edm 0.092 0.170 0.029
        ipndm    time 0.143 0.068 0.040   logsnr 0.053 0.012 0.003   edm 0.122 0.025 0.004
    (time spacing leaves a last step of 2.9 in lambda at 20 steps, after one of 0.66, which the multistep solvers in
    lambda overshoot)."""
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, MIXTURE["means"], MIXTURE["std"], MIXTURE["weights"])
    limit = sample_1d(diffusion, model, 2000, sampler="dpm++3m", steps=200)
    for sampler in ("ddim", "dpm++2m", "dpm++3m", "unipc", "ipndm"):
        for spacing in ("time", "logsnr", "edm") if sampler == "ddim" else ("logsnr", "edm"):
            gap = {
                steps: (
                    sample_1d(diffusion, model, 2000, sampler=sampler, steps=steps, timestep_spacing=spacing) - limit
                )
                .abs()
                .mean()
                .item()
                for steps in (5, 20)
            }
            assert gap[20] < min(gap[5], 0.05), (sampler, spacing, gap)
    for sampler in ("unipc", "ipndm"):
        gap = {
            spacing: (sample_1d(diffusion, model, 2000, sampler=sampler, steps=10, timestep_spacing=spacing) - limit)
            .abs()
            .mean()
            .item()
            for spacing in ("time", "logsnr", "edm")
        }
        assert min(gap, key=gap.get) == sampler_class(sampler).default_spacing, (sampler, gap)


@pytest.mark.parametrize("sampler", ["unipc", "ipndm", "dpm++2m-sde"])
def test_new_solvers_take_guidance_its_interval_and_any_prediction_type(sampler):
    """They receive the guided eps from Diffusion.sample like every sampler: a v or x0 network gives the eps network's
    samples (classifier-free guidance w = 3 with an interval, and autoguidance w = 2), to float32's rounding."""
    from test_diffusion import as_prediction

    eps_diffusion = Diffusion(1000, "cosine")
    model, guide = (
        GaussianMixtureNoise(eps_diffusion, [-0.5, 0.5], 0.2),
        GaussianMixtureNoise(eps_diffusion, [-0.4, 0.4], 0.4),
    )
    labels = torch.tensor([0, 1]).repeat(256)
    settings = sampling(sampler=sampler, steps=15, guidance_scale=3.0, guidance_interval=(0.3, 20.0))

    def draw(diffusion: Diffusion, network, guide_network=None) -> torch.Tensor:
        extra = {"guide": guide_network} if guide_network is not None else {"labels": labels, "null_label": 2}
        return diffusion.sample(
            network, (512, 1), settings, generator=torch.Generator().manual_seed(0), clip_denoised=False, **extra
        )

    for autoguidance in (False, True):
        reference = draw(eps_diffusion, model, guide if autoguidance else None)
        for prediction_type in ("v", "x0"):
            diffusion = Diffusion(1000, "cosine", prediction_type=prediction_type)
            guide_network = as_prediction(diffusion, guide, prediction_type) if autoguidance else None
            torch.testing.assert_close(
                draw(diffusion, as_prediction(diffusion, model, prediction_type), guide_network),
                reference,
                atol=1e-4,
                rtol=0,
            )


def test_new_solvers_with_guidance_solve_the_guided_ode():
    """As dpm++ above: UniPC and iPNDM at 20 steps land close to the guided ODE solved with 1000 DDIM steps."""
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.4], 0.3)
    labels = torch.ones(10_000, dtype=torch.long)

    def guided(sampler, steps):
        return sample_1d(diffusion, model, 10_000, labels=labels, guidance_scale=3.0, sampler=sampler, steps=steps)

    gap = lambda a, b: (a.sort().values - b.sort().values).abs().mean().item()  # noqa: E731
    reference = guided("ddim", 1000)
    for sampler in ("unipc", "ipndm"):
        assert gap(guided(sampler, 20), reference) < 0.012, sampler
