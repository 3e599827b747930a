"""ddpm_diffusion: schedules, the forward process, the training loss and its weighting, classifier-free guidance and
autoguidance, and the sampling loop, checked against closed forms and against analytic noise predictors
(conftest.GaussianMixtureNoise: the exact E[eps | x_t] of a point mass, a Gaussian, a Gaussian mixture). The samplers
themselves are in test_samplers.py.
"""

import math

import numpy as np
import pytest
import torch

from conftest import GaussianMixtureNoise, sample_1d, sampling, two_branch_model
from ddpm_config import SamplingConfig
from ddpm_diffusion import SCHEDULES, Diffusion, drop_labels, make_beta_schedule
from ddpm_samplers import evenly_spaced_timesteps

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


@pytest.mark.parametrize("timesteps", [10, 11, 37])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_short_chains_sample_without_nan(timesteps, schedule):
    """The shortest schedules still end at the data: the full ancestral chain of the exact predictor of a point mass
    returns that point (to 1e-7 measured: a last step that adds noise, or a wrong alpha_bar at either end, moves it),
    and of a Gaussian N(0.1, 0.2^2) keeps its mean (within 4 standard errors) and at most its spread (fixed_small
    shrinks it at these lengths: 0.10 to 0.18 measured)."""
    diffusion = Diffusion(timesteps, schedule)
    samples = sample_1d(diffusion, GaussianMixtureNoise(diffusion, [0.1], 0.2), 256)
    assert torch.isfinite(samples).all()
    assert samples.abs().max() <= 1
    assert samples.mean().item() == pytest.approx(0.1, abs=4 * 0.2 / math.sqrt(256))
    assert 0.08 < samples.std().item() < 0.21
    point = sample_1d(diffusion, GaussianMixtureNoise(diffusion, [0.1], 0.0), 64)
    torch.testing.assert_close(point, torch.full_like(point, 0.1), atol=1e-5, rtol=0)


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
        diffusion.posterior_variance.double(),
        betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(
        diffusion.posterior_mean_coef1.double(),
        betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(
        diffusion.posterior_mean_coef2.double(),
        alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        rtol=1e-5,
        atol=0,
    )


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
    diffusion.p_losses(
        lambda x, t, y: seen.append(y) or torch.zeros_like(x),
        torch.zeros(2, 1, 2, 2),
        torch.tensor([1, 2]),
        labels=torch.tensor([3, 4]),
    )
    assert seen[0].tolist() == [3, 4]


def test_drop_labels_replaces_each_label_by_the_null_label_with_probability_p_uncond():
    labels = torch.arange(20_000) % 10
    torch.manual_seed(0)
    dropped = drop_labels(labels, 0.2, null_label=10)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept]), "a label is kept or nulled, never changed to another class"
    assert (~kept).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert torch.bincount(labels[~kept], minlength=10).min() > 300, "every class is dropped"
    assert torch.equal(drop_labels(labels, 0.0, 10), labels) and (drop_labels(labels, 1.0, 10) == 10).all()


# Classifier-free guidance


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


def test_unconditional_sampling_passes_no_labels_and_leaves_model_mode_alone():
    diffusion = Diffusion(20, "linear")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, labels):
            seen.append(labels)
            return torch.zeros_like(x)

    model = Recorder().train()
    diffusion.sample(model, (2, 1, 2, 2), sampling(sampler="ddim", steps=5))
    assert seen == [None] * 5
    assert model.training


# Guidance rescale and guidance interval


def test_guidance_rescale_zero_is_the_plain_guided_prediction():
    diffusion = Diffusion(100, "linear")
    x, t, labels = torch.randn(3, 2, 4, 4), torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])
    plain = diffusion.predict_noise(two_branch_model, x, t, labels, guidance_scale=4.0, null_label=10)
    rescaled = diffusion.predict_noise(
        two_branch_model, x, t, labels, guidance_scale=4.0, null_label=10, guidance_rescale=0.0
    )
    assert torch.equal(plain, rescaled)


def test_guidance_rescale_one_matches_the_conditional_std_and_blends_linearly():
    diffusion = Diffusion(100, "linear")
    x, t, labels = torch.randn(3, 2, 4, 4), torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])

    def eps(phi):
        return diffusion.predict_noise(
            two_branch_model, x, t, labels, guidance_scale=4.0, null_label=10, guidance_rescale=phi
        )

    conditional = two_branch_model(x, t, labels)
    per_sample_std = lambda e: e.flatten(1).std(dim=1)  # noqa: E731
    assert not torch.allclose(per_sample_std(eps(0.0)), per_sample_std(conditional)), (
        "guidance must change the std here"
    )
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

    def run(**kw):
        return sample_1d(diffusion, model, 128, labels=labels, guidance_scale=3.0, sampler="ddim", steps=10, **kw)

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
        return two_branch_model(x, t, labels)

    diffusion.sample(
        model,
        (3, 1, 2, 2),
        sampling(guidance_scale=4.0, sampler="ddim", steps=10, guidance_interval=interval),
        labels=torch.tensor([0, 1, 2]),
        null_label=10,
    )
    assert batch_sizes == [3, 3, 6, 6, 6, 6, 3, 3, 3, 3]


# Autoguidance (Karras et al. 2024): a weaker model of the same data guides instead of the unconditional branch


class GaussianEps:
    """The exact noise prediction for data N(mean, std^2) (1-D, any shape), so every network output is known."""

    def __init__(self, diffusion: Diffusion, mean: float, std: float):
        self.diffusion, self.mean, self.std = diffusion, mean, std

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        ab = self.diffusion.alpha_bar(t).view(-1, *([1] * (x.ndim - 1))).double()
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mean) / (ab * self.std**2 + 1 - ab)).float()


def guided_ode_moments(
    diffusion: Diffusion, main: tuple[float, float], guide: tuple[float, float], w: float
) -> tuple[float, float]:
    """Mean and std at t = 0 of the probability-flow ODE whose denoiser is D_guide + w (D_main - D_guide), for Gaussian
    main and guide models, integrated to 1e-10 from sigma_max: in x~ = x / sqrt(alpha_bar), sigma = sqrt((1 - ab) / ab),
    dx~/dsigma = (x~ - D(x~, sigma)) / sigma with D(x~, sigma) = c(sigma) + k(sigma) x~ linear (Karras et al. 2022, eq.
    3), so the map from x~_T to x~_0 is affine and its mean and std follow two scalar ODEs."""
    from scipy.integrate import solve_ivp

    ab_max = diffusion.alphas_cumprod[-1].double().item()
    sigma_max = math.sqrt((1 - ab_max) / ab_max)

    def coefficients(sigma: float) -> tuple[float, float]:
        c, k = 0.0, 0.0
        for (mean, std), weight in ((guide, 1 - w), (main, w)):
            gain = std**2 / (std**2 + sigma**2)  # D = mean + gain (x~ - mean)
            c, k = c + weight * mean * (1 - gain), k + weight * gain
        return c, k

    def rhs(sigma: float, state: np.ndarray) -> list[float]:
        mean, std = state
        c, k = coefficients(sigma)
        return [((1 - k) * mean - c) / sigma, (1 - k) * std / sigma]

    sigma_min = 1e-6
    start = [0.0, 1 / math.sqrt(ab_max)]  # x_T ~ N(0, 1)
    solution = solve_ivp(rhs, (sigma_max, sigma_min), start, rtol=1e-10, atol=1e-12, method="DOP853")
    return float(solution.y[0, -1]), float(solution.y[1, -1])


def test_autoguidance_at_scale_one_is_the_main_model_alone():
    diffusion = Diffusion(50, "linear")
    main, guide = GaussianEps(diffusion, 0.3, 0.2), GaussianEps(diffusion, 0.0, 0.5)

    def settings(w):
        return sampling(sampler="ddim", steps=10, guidance_scale=w)

    alone = diffusion.sample(main, (64, 1), settings(1.0), generator=torch.Generator().manual_seed(1))
    guided = diffusion.sample(main, (64, 1), settings(1.0), guide=guide, generator=torch.Generator().manual_seed(1))
    assert torch.equal(alone, guided)
    pushed = diffusion.sample(main, (64, 1), settings(2.0), guide=guide, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(alone, pushed)


@pytest.mark.parametrize("w", [1.5, 3.0])
def test_autoguided_sampler_of_two_gaussian_denoisers_has_the_closed_form_mean_and_std(w):
    """Main N(0.2, 0.15^2), guide N(0, 0.3^2) (a blurrier model of the same data): the samples of the guided dpm++2m
    chain (100 steps) have the mean and std of the guided probability-flow ODE (guided_ode_moments); guidance sharpens
    (std below the main model's) and pushes the mean away from the guide's. Measured: std within 0.2%, mean within 6e-4
    (Monte Carlo 2.4e-4 at w = 1.5); first-order DDIM needs far more steps (500 steps: std 2.5% low)."""
    diffusion = Diffusion(1000, "linear")
    main, guide = (0.2, 0.15), (0.0, 0.3)
    samples = diffusion.sample(
        GaussianEps(diffusion, *main),
        (200_000, 1),
        sampling(guidance_scale=w, sampler="dpm++2m", steps=100),
        guide=GaussianEps(diffusion, *guide),
        clip_denoised=False,
        generator=torch.Generator().manual_seed(0),
    ).double()
    mean, std = guided_ode_moments(diffusion, main, guide, w)
    assert std < main[1] and mean > main[0]
    assert samples.mean().item() == pytest.approx(mean, abs=4 * std / math.sqrt(len(samples)) + 1e-3)
    assert samples.std().item() == pytest.approx(std, rel=0.005)


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
    torch.testing.assert_close(
        sample_1d(diffusion, as_prediction(diffusion, model, prediction_type), 512, **kwargs),
        reference,
        atol=1e-4,
        rtol=0,
    )


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
        losses[prediction_type] = diffusion.p_losses(
            as_prediction(diffusion, wrong_eps, prediction_type), x0, t, noise=noise
        ).item()
    assert losses["v"] == pytest.approx(losses["eps"], rel=1e-4) and losses["x0"] == pytest.approx(
        losses["eps"], rel=1e-4
    )

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


def test_sample_wants_a_guidance_scale_resolved_by_the_caller():
    """SamplingConfig's guidance scale None means "derived from the kind of samples" (SamplingConfig.derived), which
    Diffusion.sample cannot know: refused, not guessed."""
    with pytest.raises(ValueError, match="guidance_scale is None"):
        Diffusion(10, "linear").sample(
            lambda x, t, labels: torch.zeros_like(x), (2, 1), SamplingConfig(sampler="ddim", steps=2)
        )
