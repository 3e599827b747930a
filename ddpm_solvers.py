"""Fast solvers beyond DPM-Solver++: UniPC, iPNDM and the stochastic DPM-Solver++(2M) SDE.

Each is a `ddpm_samplers.Sampler` (it receives the guided noise estimate from `Diffusion.sample`, as the others do)
and is registered in `ddpm_samplers.SAMPLERS` under its --sampler name when this module is imported (ddpm_samplers
imports it). Notation as in ddpm_samplers: alpha_s = sqrt(alpha_bar_s), sigma_s = sqrt(1 - alpha_bar_s),
lambda = log(alpha / sigma) (`half_log_snr`), and from t to s = t_prev the step h = lambda_s - lambda_t > 0; t_prev = -1
is the clean image (alpha_bar = 1, lambda = +inf).

* `UniPC` (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"):
  a multistep predictor (UniP) and a corrector (UniC) that reuses the next step's network evaluation, so it costs
  none; order 3, B(h) = e^h - 1 ("bh2"), data prediction; pinned to diffusers' UniPCMultistepScheduler.
* `IPNDM` (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (DEIS), the improved
  pseudo-numerical method iPNDM): Adams-Bashforth of order up to 4 on the probability-flow ODE in EDM's
  parametrisation; checked by its order of convergence and by exactness on a point mass.
* `DPMSolverPlusPlus2MSDE`: DPM-Solver++(2M) on the reverse SDE, with fresh noise at every step; pinned to diffusers'
  DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") fed the same noise.
"""

from __future__ import annotations

from typing import Optional

import torch

from ddpm_samplers import SAMPLERS, Sampler, ScheduleView, eps_from_x0, half_log_snr, predicted_x0, randn_like


class DPMSolverPlusPlus2MSDE(Sampler):
    """DPM-Solver++(2M) SDE: the reverse SDE solved in data-prediction form (Lu et al. 2022, "DPM-Solver++", the SDE
    variant of their code; diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", midpoint)).

    With x_0 held at D over the step, the variance-preserving reverse SDE has the exact solution
        x_s = (sigma_s / sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) D + sigma_s sqrt(1 - e^{-2h}) z,  z ~ N(0, I)   (S)
    With D the x_0 prediction m0 (first order) this is the ancestral step, the posterior q(x_s | x_t, x_0 = m0) (DDIM
    with eta = 1). Second order (2M) adds the midpoint correction D = m0 + (m0 - m1) / (2 r), r = h_1 / h, from the
    previous step's x_0 prediction m1, h_1 the previous step in lambda. Its noise shrinks with h, so it needs far
    fewer steps than the ancestral chain. The final step returns the x_0 prediction, without noise."""

    name = "dpm++2m-sde"
    default_spacing = "logsnr"

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True, spacing: Optional[str] = None):
        self.diffusion, self.clip_denoised, self.spacing = diffusion, clip_denoised, self.chosen_spacing(spacing)
        self.previous: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (x_0 prediction, lambda) of the last step

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        m0 = predicted_x0(x, alpha_bar_t, eps, self.clip_denoised)
        if t_prev == -1:
            return m0  # (S) with alpha_s = 1, sigma_s = 0
        lambda_t = half_log_snr(alpha_bar_t)
        h = half_log_snr(alpha_bar_s) - lambda_t
        denoised = m0
        if self.previous is not None:
            m1, lambda_1 = self.previous
            denoised = m0 + (m0 - m1) * h / (2 * (lambda_t - lambda_1))  # D = m0 + (m0 - m1) / (2 r)
        self.previous = (m0, lambda_t)
        sigma_ratio, alpha_s = ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt(), alpha_bar_s.sqrt()
        one_minus = -torch.expm1(-2 * h)  # 1 - e^{-2h}
        noise = (1 - alpha_bar_s).sqrt() * one_minus.sqrt() * randn_like(x, generator)
        return sigma_ratio * torch.exp(-h) * x + alpha_s * one_minus * denoised + noise  # (S)


def unipc_coefficients(h: torch.Tensor, count: int) -> list[torch.Tensor]:
    """UniPC's right-hand sides g_i = i! h' phi_{i+1}(h') / B(h), i = 1 .. count, with h' = -h (data prediction),
    phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z and B(h) = e^{h'} - 1 (bh2): Zhao et al. 2023,
    Algorithm 2 and Theorem 3.1, computed by the recurrence of their code."""
    hh = -h
    b_h = torch.expm1(hh)
    h_phi_k = b_h / hh - 1  # h' phi_2(h')
    factorial, coefficients = 1, []
    for i in range(1, count + 1):
        coefficients.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial  # h' phi_{i+2}(h')
    return coefficients


class UniPC(Sampler):
    """UniPC of order 3 with B(h) = e^h - 1 (bh2) in data-prediction form (Zhao et al. 2023), as diffusers'
    UniPCMultistepScheduler(solver_order=3, predict_x0=True, solver_type="bh2") with its defaults (corrector on every
    step, lower_order_final); tests/test_diffusers.py pins it.

    From t to s, with m_t the x_0 prediction at t and earlier predictions m_k at lambda_k
    (r_k = (lambda_k - lambda_t) / h, D_k = (m_k - m_t) / r_k), both halves are
        x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) m_t - alpha_s B(h) sum_k rho_k D_k          (U)
    UniP-p (the predictor, eq. 8): the p - 1 earlier predictions, rho solving sum_k rho_k r_k^{i-1} = g_i for
    i = 1 .. p - 1 (`unipc_coefficients`; rho = 1/2 for p = 2), order p.
    UniC-p (the corrector, eq. 9): once the network has been evaluated at the predicted x_s, (U) is taken again from the
    same x_t with that prediction m_s added as a point with r = 1 and rho solving i = 1 .. p, which raises the order to
    p + 1 (Theorem 3.1). The corrected x_s replaces the predicted one; the network is not evaluated again there.
    So `step` at t first corrects the x_t it is given with the x_0 prediction that its eps implies, then predicts.

    The order p is 1 at the first step, 2 at the second, then 3; as diffusers' default lower_order_final, 2 on the step
    into t = 0 and 1 on the final step, which returns the x_0 prediction (every spacing ends at t = 0)."""

    name = "unipc"
    default_spacing = "logsnr"
    order = 3

    def __init__(self, diffusion: ScheduleView, clip_denoised: bool = True, spacing: Optional[str] = None):
        self.diffusion, self.clip_denoised, self.spacing = diffusion, clip_denoised, self.chosen_spacing(spacing)
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x_0 prediction, lambda), oldest first, <= order
        self.last: Optional[tuple[torch.Tensor, torch.Tensor, int]] = (
            None  # x, alpha_bar and order of the last predictor
        )

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        alpha_bar_t = self.diffusion.alpha_bar(t)
        m_t = predicted_x0(x, alpha_bar_t, eps, self.clip_denoised)
        if t_prev == -1:
            return m_t  # UniP-1 to sigma = 0 (its correction would not change this)
        lambda_t = half_log_snr(alpha_bar_t)
        if self.last is not None:  # UniC: redo the last step with m_t
            last_x, last_alpha_bar, last_order = self.last
            older = self.history[len(self.history) - last_order : -1]
            x = unipc_update(last_x, self.history[-1], last_alpha_bar, alpha_bar_t, older, m_t)
        self.history = [*self.history, (m_t, lambda_t)][-self.order :]
        order = min(self.order, len(self.history), 2 if t_prev == 0 else self.order)
        self.last = (x, alpha_bar_t, order)
        older = self.history[len(self.history) - order : -1]
        return unipc_update(x, self.history[-1], alpha_bar_t, self.diffusion.alpha_bar(t_prev), older)  # UniP


def unipc_update(
    x: torch.Tensor,
    current: tuple[torch.Tensor, torch.Tensor],
    alpha_bar_t: torch.Tensor,
    alpha_bar_s: torch.Tensor,
    older: list[tuple[torch.Tensor, torch.Tensor]],
    m_s: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(U) of `UniPC` from x at t (its x_0 prediction and lambda: `current`) to s, with the `older` predictions; UniP
    without `m_s`, UniC with it (the x_0 prediction at s)."""
    m_t, lambda_t = current
    h = half_log_snr(alpha_bar_s) - lambda_t
    ratios = [(lambda_k - lambda_t) / h for _, lambda_k in older]
    differences = [(m_k - m_t) / r_k for (m_k, _), r_k in zip(older, ratios)]
    if m_s is not None:
        ratios, differences = [*ratios, torch.ones_like(h)], [*differences, m_s - m_t]
    b_h = torch.expm1(-h)
    x_s = ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt() * x - alpha_bar_s.sqrt() * b_h * m_t
    if not differences:
        return x_s
    if len(differences) == 1:
        rhos = [0.5]  # UniP-2 and UniC-1: the simplified rho of Zhao et al.'s code (the limit of g_1 as h -> 0)
    else:
        powers = torch.stack([torch.stack(ratios) ** i for i in range(len(ratios))])
        rhos = torch.linalg.solve_ex(powers, torch.stack(unipc_coefficients(h, len(ratios)))).result
    return x_s - alpha_bar_s.sqrt() * b_h * sum(rho * difference for rho, difference in zip(rhos, differences))


# Adams-Bashforth weights of the newest eps first, by order (iPNDM, Zhang & Chen 2023, eq. 21 and appendix)
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class IPNDM(Sampler):
    """iPNDM (Zhang & Chen 2023, DEIS paper, section 4 and appendix): the probability-flow ODE in EDM's parametrisation
    (Karras et al. 2022, section 3), y = x / sqrt(alpha_bar) against sigma = sqrt((1 - alpha_bar) / alpha_bar), where
        dy / dsigma = eps(y, sigma),
    solved by the Adams-Bashforth method of order `order` (at most 4) with its fixed weights (ADAMS_BASHFORTH) on the
    noise estimates of the last steps, one network evaluation per step:
        y_s = y_t + (sigma_s - sigma_t) sum_j w_j eps_{t_j}                                                  (AB)
    The first steps, short of history, take the orders 1, 2, 3 (order 1 is DDIM with eta = 0). The final step to
    sigma = 0 extrapolates like the others. With `clip_denoised` the eps is the one of the clipped x_0 (as DDIM's).

    Fixed weights assume equal steps in sigma: there step j (from 1) has local error O(h^(min(j, order) + 1))
    (tests/test_samplers.py measures each); on unequal steps, and through the first-order first step, the global error
    falls only as (steps)^-2 asymptotically, but at the 5 to 20 steps it is used for the higher orders still pay.
    Default spacing logsnr: on the analytic mixtures of tests/test_samplers.py it landed closer to the ODE's solution
    than EDM's polynomial spacing (rho = 7) at 10 and 20 steps, on both schedules (docs/after_training.md)."""

    name = "ipndm"
    default_spacing = "logsnr"

    def __init__(
        self, diffusion: ScheduleView, clip_denoised: bool = True, spacing: Optional[str] = None, order: int = 4
    ):
        if order not in ADAMS_BASHFORTH:
            raise ValueError(f"iPNDM has order 1 to 4, got {order}")
        self.diffusion, self.clip_denoised, self.order = diffusion, clip_denoised, order
        self.spacing = self.chosen_spacing(spacing)
        self.history: list[torch.Tensor] = []  # the eps of the previous steps, newest first, at most order - 1

    def step(
        self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        alpha_bar_t, alpha_bar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        if self.clip_denoised:
            eps = eps_from_x0(x, alpha_bar_t, predicted_x0(x, alpha_bar_t, eps, True))
        newest_first = [eps, *self.history]
        self.history = newest_first[: self.order - 1]
        weights = ADAMS_BASHFORTH[len(newest_first[: self.order])]
        slope = sum(weight * past for weight, past in zip(weights, newest_first))
        # (AB) times sqrt(alpha_bar_s), with sqrt(alpha_bar_s) (sigma_s - sigma_t) written so that nothing of the size
        # of y_t = x_t / sqrt(alpha_bar_t) (hundreds at high noise) cancels in float32
        ratio = (alpha_bar_s / alpha_bar_t).sqrt()
        return ratio * x + ((1 - alpha_bar_s).sqrt() - ratio * (1 - alpha_bar_t).sqrt()) * slope


SAMPLERS.update({cls.name: cls for cls in (UniPC, IPNDM, DPMSolverPlusPlus2MSDE)})
