"""The diffusion math, checked against closed forms and against analytic noise predictors.

An analytic predictor is the exact E[eps | x_t] for a data distribution we know (a point mass,
a Gaussian, a two-class Gaussian mixture), so a correct sampler must return that distribution.
"""
import math

import pytest
import torch

from ddpm_diffusion import SCHEDULES, Diffusion, make_beta_schedule
from ddpm_samplers import SAMPLERS, evenly_spaced_timesteps


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny elementwise ops, which intra-op threads only slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def sample_1d(diffusion: Diffusion, model, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return diffusion.sample(model, (n, 1, 1, 1), generator=generator, progress=False, **kwargs).flatten()


# Schedules


def test_every_schedule_reaches_noise_for_every_length():
    for schedule in SCHEDULES:
        for timesteps in range(10, 4001):
            betas = make_beta_schedule(schedule, timesteps)
            assert betas.shape == (timesteps,)
            assert (betas > 0).all() and (betas < 1).all(), (schedule, timesteps)
            assert torch.cumprod(1 - betas, 0)[-1] < 1e-3, (schedule, timesteps)


def test_linear_schedule_is_ho_et_al_scaled_by_length():
    betas = make_beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    betas = make_beta_schedule("linear", 250)
    assert betas[0].item() == pytest.approx(4e-4) and betas[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_follows_its_alpha_bar_formula():
    timesteps, s = 1000, 0.008
    alphas_cumprod = Diffusion(timesteps, "cosine").alphas_cumprod.double()
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.tensor(0.0, dtype=torch.float64))
    # The last few betas are clipped at 0.999; before that the schedule is the formula.
    torch.testing.assert_close(alphas_cumprod[:-5], expected[:-5], rtol=1e-5, atol=1e-7)


def test_sigmoid_schedule_rises_between_linear_end_points():
    betas = make_beta_schedule("sigmoid", 1000)
    assert (betas[1:] > betas[:-1]).all()
    assert 1e-4 < betas[0].item() < 2e-4 and 0.0199 < betas[-1].item() < 0.02


def test_unknown_schedule_and_too_few_steps_are_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="at least 2"):
        make_beta_schedule("linear", 1)


# Forward process


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_sample_has_the_marginal_of_eq_4(schedule):
    diffusion = Diffusion(1000, schedule)
    n, x0_value = 200_000, 0.6
    for step in (0, 250, 600, 999):
        alpha_bar = diffusion.alphas_cumprod[step].item()
        t = torch.full((n,), step)
        x_t = diffusion.q_sample(torch.full((n, 1, 1, 1), x0_value), t).flatten().double()
        expected_mean, expected_var = math.sqrt(alpha_bar) * x0_value, 1 - alpha_bar
        standard_error = math.sqrt(expected_var / n)
        assert abs(x_t.mean().item() - expected_mean) < 5 * standard_error + 1e-6
        assert x_t.var().item() == pytest.approx(expected_var, rel=0.02, abs=1e-6)


def test_posterior_coefficients_match_ho_et_al_eq_7():
    diffusion = Diffusion(1000, "linear")
    betas = diffusion.betas.double()
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    torch.testing.assert_close(
        diffusion.posterior_variance.double(), betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        diffusion.posterior_mean_coef1.double(), betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        diffusion.posterior_mean_coef2.double(), alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod), rtol=1e-5, atol=0
    )


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


# Loss


def test_p_losses_is_zero_for_the_true_noise_and_one_for_a_zero_guess():
    diffusion = Diffusion(1000, "linear")
    x0 = torch.rand(512, 3, 4, 4) * 2 - 1
    t = torch.randint(0, 1000, (512,))
    noise = torch.randn_like(x0)

    def oracle(x_t, t_, labels):
        return diffusion.predict_eps_from_x0(x_t, t_, x0)

    assert diffusion.p_losses(oracle, x0, t, noise=noise).item() < 1e-6
    zero_loss = diffusion.p_losses(lambda x, t_, y: torch.zeros_like(x), x0, t, noise=noise)
    assert zero_loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    l1_loss = diffusion.p_losses(lambda x, t_, y: torch.zeros_like(x), x0, t, noise=noise, loss_type="l1")
    assert l1_loss.item() == pytest.approx(math.sqrt(2 / math.pi), rel=0.03)
    with pytest.raises(ValueError, match="unknown loss"):
        diffusion.p_losses(oracle, x0, t, loss_type="l3")


def test_p_losses_passes_labels_to_the_model():
    diffusion = Diffusion(100, "linear")
    seen = []
    diffusion.p_losses(lambda x, t, y: seen.append(y) or torch.zeros_like(x), torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]), labels=torch.tensor([3, 4]))
    assert seen[0].tolist() == [3, 4]


# Samplers


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 25), ("ddim", 25), ("dpm++2m", 10), ("dpm++3m", 10)])
def test_samplers_recover_a_point_mass(sampler, steps):
    diffusion = Diffusion(200, "linear")
    model = GaussianMixtureNoise(diffusion, [0.37], std=0.0)
    samples = sample_1d(diffusion, model, 64, sampler=sampler, steps=steps)
    torch.testing.assert_close(samples, torch.full_like(samples, 0.37), atol=1e-4, rtol=0)


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


def test_ddim_with_eta_zero_is_deterministic_given_the_start_noise():
    diffusion = Diffusion(100, "cosine")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    first = sample_1d(diffusion, model, 128, seed=3, sampler="ddim", steps=20)
    second = sample_1d(diffusion, model, 128, seed=3, sampler="ddim", steps=20)
    other = sample_1d(diffusion, model, 128, seed=4, sampler="ddim", steps=20)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_classes_are_routed_to_their_own_component():
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    labels = torch.tensor([0, 1]).repeat(2000)
    samples = sample_1d(diffusion, model, 4000, labels=labels, guidance_scale=1.0, sampler="dpm++2m", steps=20)
    assert samples[labels == 0].mean().item() == pytest.approx(-0.5, abs=0.01)
    assert samples[labels == 1].mean().item() == pytest.approx(0.5, abs=0.01)
    assert samples[labels == 1].std().item() == pytest.approx(0.1, rel=0.05)


def test_guidance_zero_samples_the_unconditional_mixture():
    diffusion = Diffusion(1000, "linear")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    labels = torch.zeros(4000, dtype=torch.long)
    samples = sample_1d(diffusion, model, 4000, labels=labels, guidance_scale=0.0, sampler="dpm++2m", steps=20)
    assert (samples > 0).float().mean().item() == pytest.approx(0.5, abs=0.04)


def test_guidance_formula_and_its_exact_end_points():
    diffusion = Diffusion(100, "linear")
    calls = []

    def model(x, t, labels):
        calls.append(x.shape[0])
        return x * 0.5 + labels.float().reshape(-1, 1, 1, 1) * 0.1 + t.float().reshape(-1, 1, 1, 1) * 0.01

    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([5, 6, 7])
    labels = torch.tensor([0, 1, 2])
    null = torch.full_like(labels, 10)
    eps = lambda w: diffusion.predict_noise(model, x, t, labels, guidance_scale=w, null_label=10)  # noqa: E731
    assert torch.equal(eps(0.0), model(x, t, null))
    assert torch.equal(eps(1.0), model(x, t, labels))
    calls.clear()
    guided = eps(3.0)
    assert calls == [6], "both branches must be one batched forward pass"
    expected = model(x, t, null) + 3.0 * (model(x, t, labels) - model(x, t, null))
    torch.testing.assert_close(guided, expected)


def test_unconditional_sampling_passes_no_labels_and_leaves_model_mode_alone():
    diffusion = Diffusion(20, "linear")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, labels):
            seen.append(labels)
            return torch.zeros_like(x)

    model = Recorder().train()
    diffusion.sample(model, (2, 1, 2, 2), sampler="ddim", steps=5, progress=False)
    assert seen == [None] * 5
    assert model.training


def test_sampler_output_is_in_range_and_reproducible_from_a_seed():
    diffusion = Diffusion(50, "sigmoid")
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  (a bad predictor: x_0 estimates fall outside [-1, 1])
    first = diffusion.sample(model, (4, 3, 8, 8), generator=torch.Generator().manual_seed(1), progress=False)
    second = diffusion.sample(model, (4, 3, 8, 8), generator=torch.Generator().manual_seed(1), progress=False)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, second)


@pytest.mark.parametrize("timesteps", [10, 11, 37])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_short_chains_sample_without_nan(timesteps, schedule):
    diffusion = Diffusion(timesteps, schedule)
    samples = sample_1d(diffusion, GaussianMixtureNoise(diffusion, [0.1], 0.2), 256)
    assert torch.isfinite(samples).all()


def test_evenly_spaced_timesteps():
    assert evenly_spaced_timesteps(10, None) == list(range(9, -1, -1))
    steps = evenly_spaced_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="between 1 and 10"):
        evenly_spaced_timesteps(10, 11)


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


# Guidance rescale and guidance interval


def _two_branch_model(x, t, labels):
    """A toy predictor whose conditional branch (labels < 10) has a smaller spread than the unconditional one."""
    scale = torch.where(labels < 10, 0.5, 2.0).reshape(-1, *[1] * (x.ndim - 1))
    return scale * x + 0.1 * t.float().reshape(-1, *[1] * (x.ndim - 1))


def test_guidance_rescale_zero_is_the_plain_guided_prediction():
    diffusion = Diffusion(100, "linear")
    x, t, labels = torch.randn(3, 2, 4, 4), torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])
    plain = diffusion.predict_noise(_two_branch_model, x, t, labels, guidance_scale=4.0, null_label=10)
    rescaled = diffusion.predict_noise(_two_branch_model, x, t, labels, guidance_scale=4.0, null_label=10, guidance_rescale=0.0)
    assert torch.equal(plain, rescaled)


def test_guidance_rescale_one_matches_the_conditional_std_and_blends_linearly():
    diffusion = Diffusion(100, "linear")
    x, t, labels = torch.randn(3, 2, 4, 4), torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])
    eps = lambda phi: diffusion.predict_noise(_two_branch_model, x, t, labels, guidance_scale=4.0, null_label=10, guidance_rescale=phi)  # noqa: E731
    conditional = _two_branch_model(x, t, labels)
    per_sample_std = lambda e: e.flatten(1).std(dim=1)  # noqa: E731
    assert not torch.allclose(per_sample_std(eps(0.0)), per_sample_std(conditional)), "guidance must change the std here"
    torch.testing.assert_close(per_sample_std(eps(1.0)), per_sample_std(conditional))
    torch.testing.assert_close(eps(0.3), 0.3 * eps(1.0) + 0.7 * eps(0.0))


def test_guidance_interval_guides_only_the_steps_inside_it():
    diffusion = Diffusion(100, "linear")
    sigma = diffusion.sigma(torch.tensor([98, 50, 2]))
    interval = ((sigma[2] + sigma[1]).item() / 2, (sigma[1] + sigma[0]).item() / 2)  # contains only t = 50
    assert diffusion.guided_steps([98, 50, 2], interval) == [False, True, False]
    assert diffusion.guided_steps([98, 50, 2], (sigma[1].item(), math.inf)) == [True, False, False]  # lo < sigma <= hi
    assert diffusion.guided_steps([98, 50, 2], None) == [True, True, True]


def test_guidance_interval_covering_every_step_changes_nothing_and_an_empty_one_is_conditional():
    diffusion = Diffusion(50, "linear")
    model = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.2)
    labels = torch.tensor([0, 1]).repeat(64)
    run = lambda **kw: sample_1d(diffusion, model, 128, labels=labels, guidance_scale=3.0, sampler="ddim", steps=10, **kw)  # noqa: E731
    assert torch.equal(run(guidance_interval=(0.0, math.inf)), run())
    nowhere = run(guidance_interval=(1e6, 1e7))
    conditional = sample_1d(diffusion, model, 128, labels=labels, guidance_scale=1.0, sampler="ddim", steps=10)
    assert torch.equal(nowhere, conditional)
    assert not torch.equal(run(), conditional)


def test_sample_guides_exactly_the_steps_whose_sigma_is_in_the_interval():
    """Guided steps evaluate the model on a doubled batch (both branches), the others on the plain batch."""
    diffusion = Diffusion(100, "linear")
    timesteps = evenly_spaced_timesteps(100, 10)
    sigmas = diffusion.sigma(torch.tensor(timesteps))
    interval = (sigmas[6].item(), sigmas[2].item())  # lo < sigma <= hi: steps 2 to 5 of the 10
    batch_sizes = []

    def model(x, t, labels):
        batch_sizes.append(x.shape[0])
        return _two_branch_model(x, t, labels)

    diffusion.sample(model, (3, 1, 2, 2), labels=torch.tensor([0, 1, 2]), guidance_scale=4.0, null_label=10,
                     sampler="ddim", steps=10, progress=False, guidance_interval=interval)
    assert batch_sizes == [3, 3, 6, 6, 6, 6, 3, 3, 3, 3]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_steps_never_wait_for_the_device(tensor_reads, sampler):
    """No host read per sampling step (tensor_reads fixture): 40 steps make as many reads as 4."""
    diffusion = Diffusion(100, "linear")
    counts = {}
    for steps in (4, 40):
        tensor_reads["count"] = 0
        diffusion.sample(_two_branch_model, (3, 1, 2, 2), labels=torch.tensor([0, 1, 2]), guidance_scale=4.0, null_label=10,
                         sampler=sampler, steps=steps, progress=False, guidance_interval=(0.5, 50.0), eta=1.0,
                         generator=torch.Generator().manual_seed(0))
        counts[steps] = tensor_reads["count"]
    assert counts[40] == counts[4], f"{(counts[40] - counts[4]) / 36:.1f} tensor reads per sampling step"


# Prediction types and loss weighting


def as_prediction(diffusion: Diffusion, eps_model, prediction_type: str):
    """The network of `prediction_type` that stands for the noise predictor eps_model (exactly, in float64)."""
    from ddpm_samplers import x0_from_eps

    def network(x, t, labels):
        eps = eps_model(x, t, labels).double()
        alpha_bar = diffusion.alpha_bar(t).double().reshape(-1, *[1] * (x.ndim - 1))
        x0 = x0_from_eps(x.double(), alpha_bar, eps)
        output = {"eps": eps, "x0": x0, "v": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0}[prediction_type]
        return output.to(x.dtype)
    return network


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 50), ("dpm++2m", 20), ("dpm++3m", 20)])
def test_every_sampler_recovers_a_gaussian_from_a_v_or_x0_network(prediction_type, sampler, steps):
    diffusion = Diffusion(1000, "linear", prediction_type=prediction_type)
    network = as_prediction(diffusion, GaussianMixtureNoise(diffusion, [0.2], 0.3), prediction_type)
    samples = sample_1d(diffusion, network, 10_000, sampler=sampler, steps=steps)
    assert samples.mean().item() == pytest.approx(0.2, abs=0.015)
    assert samples.std().item() == pytest.approx(0.3, rel=0.1)


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_guidance_mixes_in_eps_space_whatever_the_network_predicts(prediction_type):
    eps_diffusion = Diffusion(1000, "cosine")
    model = GaussianMixtureNoise(eps_diffusion, [-0.5, 0.5], std=0.2)
    diffusion = Diffusion(1000, "cosine", prediction_type=prediction_type)
    labels = torch.tensor([0, 1]).repeat(256)
    kwargs = dict(labels=labels, guidance_scale=3.0, guidance_rescale=0.5, null_label=2, sampler="ddim", steps=20)
    reference = sample_1d(eps_diffusion, model, 512, **kwargs)
    torch.testing.assert_close(sample_1d(diffusion, as_prediction(diffusion, model, prediction_type), 512, **kwargs), reference,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_p_losses_targets_each_prediction_type(prediction_type):
    """Zero for the oracle of each type; for a network that outputs zeros, the mean square of that type's target."""
    diffusion = Diffusion(1000, "linear", prediction_type=prediction_type)
    x0 = torch.rand(256, 1, 4, 4) * 2 - 1
    t, noise = torch.randint(0, 1000, (256,)), torch.randn(256, 1, 4, 4)
    oracle = as_prediction(diffusion, lambda x_t, t_, y: diffusion.predict_eps_from_x0(x_t, t_, x0), prediction_type)
    assert diffusion.p_losses(oracle, x0, t, noise=noise).item() < 1e-6
    alpha_bar = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = {"eps": noise, "x0": x0, "v": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[prediction_type]
    zeros = diffusion.p_losses(lambda x, t_, y: torch.zeros_like(x), x0, t, noise=noise)
    assert zeros.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


def test_min_snr_weighting_is_one_loss_in_x0_space_for_all_three_parametrisations():
    """Hang et al.'s min(SNR, gamma) ||x_0 - x_0_hat||^2, whatever the network predicts: the same (wrong) network gives
    the same weighted loss as an eps, v or x0 predictor, and gamma = 0 is plain L_simple."""
    x0 = torch.rand(512, 1, 4, 4) * 2 - 1
    t, noise = torch.randint(0, 1000, (512,)), torch.randn(512, 1, 4, 4)

    def wrong_eps(x, t_, labels):
        return 0.8 * x + 0.1

    losses = {}
    for prediction_type in ("eps", "v", "x0"):
        diffusion = Diffusion(1000, "linear", prediction_type=prediction_type, snr_gamma=5.0)
        losses[prediction_type] = diffusion.p_losses(as_prediction(diffusion, wrong_eps, prediction_type), x0, t, noise=noise).item()
    assert losses["v"] == pytest.approx(losses["eps"], rel=1e-4) and losses["x0"] == pytest.approx(losses["eps"], rel=1e-4)

    diffusion = Diffusion(1000, "linear", snr_gamma=5.0)
    snr = diffusion.alphas_cumprod[t] / (1 - diffusion.alphas_cumprod[t])
    per_example = (wrong_eps(diffusion.q_sample(x0, t, noise), t, None) - noise).pow(2).flatten(1).mean(1)
    assert losses["eps"] == pytest.approx((per_example * snr.clamp(max=5.0) / snr).mean().item(), rel=1e-5)
    plain = Diffusion(1000, "linear").p_losses(wrong_eps, x0, t, noise=noise).item()
    assert plain == pytest.approx(per_example.mean().item(), rel=1e-5)
    assert plain != pytest.approx(losses["eps"], rel=1e-2), "the weighting must change the loss"


def test_an_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction type"):
        Diffusion(100, "linear", prediction_type="score")
