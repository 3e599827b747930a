"""Autoguidance (Karras et al. 2024): analytic checks of Diffusion.sample with a guide, and --guide_model through the CLI."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from ddpm_diffusion import Diffusion


class GaussianEps:
    """The exact noise prediction for data N(mean, std^2) (1-D, any shape), so every network output is known."""

    def __init__(self, diffusion: Diffusion, mean: float, std: float):
        self.diffusion, self.mean, self.std = diffusion, mean, std

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        ab = self.diffusion.alpha_bar(t).view(-1, *([1] * (x.ndim - 1))).double()
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mean) / (ab * self.std**2 + 1 - ab)).float()


def guided_ode_moments(diffusion: Diffusion, main: tuple[float, float], guide: tuple[float, float], w: float) -> tuple[float, float]:
    """Mean and std at t = 0 of the probability-flow ODE whose denoiser is D_guide + w (D_main - D_guide), for Gaussian
    main and guide models, integrated to 1e-10 from sigma_max: in x~ = x / sqrt(alpha_bar), sigma = sqrt((1 - ab) / ab),
    dx~/dsigma = (x~ - D(x~, sigma)) / sigma with D(x~, sigma) = c(sigma) + k(sigma) x~ linear (Karras et al. 2022, eq. 3),
    so the map from x~_T to x~_0 is affine and its mean and std follow two scalar ODEs."""
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
    kwargs = dict(sampler="ddim", steps=10, progress=False)
    alone = diffusion.sample(main, (64, 1), generator=torch.Generator().manual_seed(1), **kwargs)
    guided = diffusion.sample(main, (64, 1), guide=guide, guidance_scale=1.0, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(alone, guided)
    pushed = diffusion.sample(main, (64, 1), guide=guide, guidance_scale=2.0, generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.allclose(alone, pushed)


@pytest.mark.parametrize("w", [1.5, 3.0])
def test_autoguided_sampler_of_two_gaussian_denoisers_has_the_closed_form_mean_and_std(w):
    """Main N(0.2, 0.15^2), guide N(0, 0.3^2) (a blurrier model of the same data): the samples of the guided dpm++2m chain
    (100 steps) have the mean and std of the guided probability-flow ODE (guided_ode_moments); guidance sharpens (std below
    the main model's) and pushes the mean away from the guide's. Measured: std within 0.2%, mean within 6e-4 (Monte Carlo
    2.4e-4 at w = 1.5); first-order DDIM needs far more steps (500 steps: std 2.5% low)."""
    diffusion = Diffusion(1000, "linear")
    main, guide = (0.2, 0.15), (0.0, 0.3)
    samples = diffusion.sample(GaussianEps(diffusion, *main), (200_000, 1), guide=GaussianEps(diffusion, *guide), guidance_scale=w,
                               sampler="dpm++2m", steps=100, clip_denoised=False, progress=False,
                               generator=torch.Generator().manual_seed(0)).double()
    mean, std = guided_ode_moments(diffusion, main, guide, w)
    assert std < main[1] and mean > main[0]
    assert samples.mean().item() == pytest.approx(mean, abs=4 * std / math.sqrt(len(samples)) + 1e-3)
    assert samples.std().item() == pytest.approx(std, rel=0.005)


FAST = "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --batch_size 128 --warmup_steps 3 --sample_every 0 --device cpu"


def test_an_unconditional_model_is_autoguided_by_an_earlier_snapshot_and_a_mismatched_guide_is_refused(tmp_path, capsys):
    from conftest import run_cli

    assert run_cli(f"{FAST} --max_steps 3 --save_model --run_name early --phema_every 0", tmp_path) == 0
    assert run_cli(f"{FAST} --max_steps 3 --save_model --run_name cond --conditional --phema_every 0", tmp_path) == 0
    sample = "--inference --model_path models/early/ckpt.pt --num_samples 3 --sampler ddim --sampling_steps 4 --device cpu"
    assert run_cli(f"{sample} --save_dir plain", tmp_path) == 0
    assert run_cli(f"{sample} --save_dir auto --guide_model models/early/ckpt.pt --guidance_scale 1", tmp_path) == 0
    plain, auto = (np.load(tmp_path / f"{name}/samples.npz")["arr_0"] for name in ("plain", "auto"))
    assert np.array_equal(plain, auto), "w = 1: the main model alone"
    assert run_cli(f"{sample} --save_dir pushed --guide_model models/early/ckpt.safetensors --guidance_scale 3 --no_ema", tmp_path) == 0
    pushed = np.load(tmp_path / "pushed/samples.npz")["arr_0"]
    record = __import__("json").loads((tmp_path / "pushed/samples.json").read_text())
    assert record["guidance"] == "autoguidance" and record["guidance_scale"] == 3
    assert not np.array_equal(plain, pushed), "raw weights guided by the EMA: other images"
    capsys.readouterr()
    assert run_cli(f"{sample} --save_dir refused --guide_model models/cond/ckpt.pt", tmp_path) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not match" in error and "classes" in error
    assert not (tmp_path / "refused").exists()
