"""Gaussian diffusion: noise schedules, the forward process, the training loss, guidance and the sampling loop.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM):
    betas[t]          = beta_t, the variance added at step t
    alphas_cumprod[t] = alpha_bar_t = prod_{s<=t} (1 - beta_s)
    q(x_t | x_0)      = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)          (eq. 4)
The network predicts the noise eps (Ho et al.), the clean image x_0, or the velocity
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, "Progressive Distillation",
section 4); `Diffusion.eps_from_output` turns any of them into eps, in which guidance mixes. `Diffusion.sample`
runs the reverse process: at each step the guided noise estimate (`predict_noise`) goes to a sampler's `step`
(ddpm_samplers: the ancestral sampler, DDIM, DPM-Solver++; ddpm_solvers: UniPC, iPNDM, DPM-Solver++(2M) SDE),
which moves x_t to an earlier step.
Timestep indices run from 0 (almost clean) to T-1 (pure noise); the index -1 stands for the clean image
itself (alpha_bar = 1).

Reading order: `Diffusion.q_sample` (eq. 4) -> `Diffusion.p_losses` (the training loss) -> `Diffusion.sample`
-> a sampler's `step` in ddpm_samplers.
"""

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm_samplers import VARIANCES, eps_from_x0, make_sampler, posterior, randn

if TYPE_CHECKING:
    from ddpm_config import SamplingConfig

SCHEDULES = ("linear", "cosine", "sigmoid")
LOSS_TYPES = ("l2", "l1", "huber")
PREDICTION_TYPES = ("eps", "v", "x0")
MAX_BETA = 0.999

NoisePredictor = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def linear_beta_range(timesteps: int) -> tuple[float, float]:
    """Ho et al.'s 1e-4..0.02 at T=1000, scaled by 1000/T (Improved DDPM code) so x_T is noise for any T."""
    scale = 1000.0 / timesteps
    return scale * 1e-4, scale * 0.02


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    beta_start, beta_end = linear_beta_range(timesteps)
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]


def sigmoid_beta_schedule(timesteps: int) -> torch.Tensor:
    """Betas follow a sigmoid between the linear schedule's end points (slow start, slow finish)."""
    beta_start, beta_end = linear_beta_range(timesteps)
    return torch.sigmoid(torch.linspace(-6, 6, timesteps, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def make_beta_schedule(schedule: str, timesteps: int) -> torch.Tensor:
    """Betas of length `timesteps` in (0, MAX_BETA], float64."""
    builders = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule, "sigmoid": sigmoid_beta_schedule}
    if schedule not in builders:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if timesteps < 2:
        raise ValueError(f"timesteps must be at least 2, got {timesteps}")
    return builders[schedule](timesteps).clamp(max=MAX_BETA)


def _broadcast(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


class Diffusion:
    """The fixed forward process of a DDPM and everything computed from its schedule."""

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: str = "linear",
        prediction_type: str = "eps",
        snr_gamma: float = 0.0,
        variance: str = "fixed_small",
    ):
        """`prediction_type`: what the network outputs (eps, v or x0); `snr_gamma` > 0: min-SNR-gamma loss
        weighting (Hang et al. 2023), 0: L_simple's uniform weighting; `variance`: the ancestral sampler's default."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
        self.num_timesteps = timesteps
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.variance = variance  # the ancestral sampler's default (AncestralSampler)
        betas = make_beta_schedule(schedule, timesteps)
        # Computed in float64, kept in float32: what the network and the samplers work in.
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        # alpha_bar with a 1 appended, so that index -1 (the clean image) reads alpha_bar = 1
        self.alphas_cumprod_and_clean = torch.cat([self.alphas_cumprod, torch.ones(1)])

    def to(self, device: torch.device | str) -> "Diffusion":
        """Move the schedule tensors to `device` (so indexing them costs no host-device copy)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar at integer steps t (a tensor, or one step as a Python int); t = -1 is the clean image (alpha_bar =
        1)."""
        if isinstance(t, int):
            return self.alphas_cumprod_and_clean[t]
        return self.alphas_cumprod_and_clean.to(t.device)[t]

    def posterior_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) for every t (Ho et al. eq. 7), computed in float64 from the schedule:
        (posterior_mean_coef1, posterior_mean_coef2, posterior_variance). The samplers use `posterior` directly."""
        alphas_cumprod = torch.cumprod(1 - make_beta_schedule(self.schedule, self.num_timesteps), dim=0)
        return posterior(alphas_cumprod, torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]))

    posterior_mean_coef1 = property(lambda self: self.posterior_coefficients()[0].float())
    posterior_mean_coef2 = property(lambda self: self.posterior_coefficients()[1].float())
    posterior_variance = property(lambda self: self.posterior_coefficients()[2].float())

    # Forward process and loss

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in one step (Ho et al. eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        alpha_bar = _broadcast(self.alpha_bar(t), x0.ndim).to(x0.dtype)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def p_losses(
        self,
        model: NoisePredictor,
        x0: torch.Tensor,
        t: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        loss_type: str = "l2",
    ) -> torch.Tensor:
        """The training loss: the distance between the network's output and its target (eps, v or x_0, per
        `prediction_type`), averaged per example, weighted per timestep (`loss_weight`) and averaged.
        With eps and no weighting this is L_simple (Ho et al. eq. 14)."""
        if noise is None:
            noise = torch.randn_like(x0)
        predicted = model(self.q_sample(x0, t, noise), t, labels)
        target = self.training_target(x0, t, noise)
        losses = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}
        if loss_type not in losses:
            raise ValueError(f"unknown loss type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        per_example = losses[loss_type](predicted.float(), target, reduction="none").flatten(1).mean(1)
        return (per_example * self.loss_weight(t)).mean()

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to output for x_t = q_sample(x0, t, noise)."""
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "x0":
            return x0
        alpha_bar = _broadcast(self.alpha_bar(t), x0.ndim).to(x0.dtype)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # v (Salimans & Ho 2022, eq. 9 and appendix D)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t)."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1 - alpha_bar)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weights of the loss: 1 without `snr_gamma`; with it, min-SNR-gamma (Hang et al. 2023,
        "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8 and section 3.4): the x_0 loss
        weighted by min(SNR, gamma), which in terms of the eps loss is min(SNR, gamma) / SNR and of the v loss
        min(SNR, gamma) / (SNR + 1)."""
        if not self.snr_gamma:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction_type]

    # Reverse process

    def predict_noise(
        self,
        model: NoisePredictor,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        null_label: Optional[int] = None,
        guidance_rescale: float = 0.0,
        guide: Optional[NoisePredictor] = None,
    ) -> torch.Tensor:
        """The noise estimate, guided; the networks' outputs are turned into eps first (`eps_from_output`), so
        guidance mixes in eps space whatever the network predicts.

        Without `guide`, classifier-free guidance when labels are given (Ho & Salimans 2022):
        eps = eps_uncond + w * (eps_cond - eps_uncond). w = 0 is the unconditional model, w = 1 the plain
        conditional one (both computed alone, exactly); any other w evaluates both branches in one batched
        forward pass. With `guide`, autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad
        Version of Itself", eq. 2): eps = eps_guide + w * (eps_main - eps_guide), the guide a weaker network of the
        same task (an earlier or shorter-EMA snapshot, a smaller model) given the same labels, for conditional
        and unconditional models alike; w = 1 is the main network alone. Either way the result may then be
        rescaled (`rescale_guidance`, Lin et al. 2023).
        """
        if guide is not None:
            if guidance_scale == 1.0:
                return self.eps_from_output(model(x, t, labels), x, t)
            eps_main = self.eps_from_output(model(x, t, labels), x, t)
            eps_guide = self.eps_from_output(guide(x, t, labels), x, t)
            guided = eps_guide + guidance_scale * (eps_main - eps_guide)
            return rescale_guidance(guided, eps_main, guidance_rescale) if guidance_rescale else guided
        if labels is None:
            return self.eps_from_output(model(x, t, None), x, t)
        if null_label is None:
            null_label = getattr(model, "num_classes", None)
            if null_label is None:
                raise ValueError("labels were given but the model has no `num_classes`: pass null_label")
        null_labels = torch.full_like(labels, null_label)
        if guidance_scale == 1.0:
            return self.eps_from_output(model(x, t, labels), x, t)
        if guidance_scale == 0.0:
            return self.eps_from_output(model(x, t, null_labels), x, t)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels]))
        eps_cond, eps_uncond = self.eps_from_output(both, torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        if guidance_rescale:
            guided = rescale_guidance(guided, eps_cond, guidance_rescale)
        return guided

    def eps_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise estimate that a network output of `prediction_type` stands for, at x_t = x."""
        if self.prediction_type == "eps":
            return output
        alpha_bar = _broadcast(self.alpha_bar(t), x.ndim).to(x.dtype)
        if self.prediction_type == "x0":
            return eps_from_x0(x, alpha_bar, output)
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x  # from v = sqrt(ab) eps - sqrt(1 - ab) x_0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps,
        the parametrisation of Karras et al. 2022 in which guidance intervals are given."""
        alpha_bar = self.alpha_bar(t)
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def guided_steps(self, timesteps: list[int], interval: Optional[tuple[float, float]]) -> list[bool]:
        """Per step of a sampler run: is guidance on? Always without an interval; else where lo < sigma_t <= hi
        (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution
        Quality in Diffusion Models"). Decided on the host once per run, so that no step waits for the GPU."""
        if interval is None:
            return [True] * len(timesteps)
        sigmas = self.sigma(torch.tensor(timesteps, device=self.alphas_cumprod.device)).tolist()
        return [interval[0] < sigma <= interval[1] for sigma in sigmas]

    def predict_eps_from_x0(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x_0 to x_t at step t (Ho et al. eq. 4 solved for eps): the prediction of a perfect
        model."""
        return eps_from_x0(x, _broadcast(self.alpha_bar(t), x.ndim).to(x.dtype), x0)

    @torch.no_grad()
    def sample(
        self,
        model: NoisePredictor,
        shape: Sequence[int],
        settings: "SamplingConfig",
        labels: Optional[torch.Tensor] = None,
        *,
        null_label: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str | None = None,
        guide: Optional[NoisePredictor] = None,
        clip_denoised: bool = True,
        trajectory: Optional[list[torch.Tensor]] = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate a batch of images in [-1, 1] of the full batch `shape` (N, C, H, W), or of samples of any shape
        (N, ...); `clip_denoised` False leaves the predicted x_0 and the result unclipped (points are not in [-1, 1]).

        `model(x, t, labels)` is any network that predicts `prediction_type` (eps unless told otherwise); its
        train/eval mode is left as it is. `settings` (ddpm_config.SamplingConfig) chooses the sampler, its steps
        (None: the sampler's default, ddpm_samplers.Sampler.default_steps), their spacing (None: the sampler's own,
        Sampler.default_spacing), eta, variance (None: the diffusion's) and the guidance: its scale (a number;
        SamplingConfig.derived gives the default), rescale and interval. Noise is drawn from `generator` (on its
        own device) so a seed gives the same images on any device. `guide`: autoguidance with that network instead of
        classifier-free guidance (`predict_noise`). `trajectory`: a list that receives x_T and x after every step
        (the reverse process, for pictures).
        """
        if settings.guidance_scale is None:
            raise ValueError("settings.guidance_scale is None: give a number (SamplingConfig.derived)")
        solver = make_sampler(
            settings.sampler,
            self,
            eta=settings.eta,
            clip_denoised=clip_denoised,
            variance=settings.variance,
            spacing=settings.timestep_spacing,
        )
        timesteps = solver.timesteps(settings.steps)
        if device is None:
            device = labels.device if labels is not None else self.alphas_cumprod.device
        guided = self.guided_steps(timesteps, settings.guidance_interval)
        x = randn(shape, generator, device)
        if trajectory is not None:
            trajectory.append(x)
        for i, step in enumerate(
            tqdm(timesteps, desc=f"sampling ({settings.sampler})", disable=not progress, leave=False)
        ):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            scale = settings.guidance_scale if guided[i] else 1.0
            eps = self.predict_noise(model, x, t, labels, scale, null_label, settings.guidance_rescale, guide)
            x = solver.step(x, step, timesteps[i + 1] if i + 1 < len(timesteps) else -1, eps, generator)
            if trajectory is not None:
                trajectory.append(x)
        return x.clamp(-1, 1) if clip_denoised else x


def rescale_guidance(guided: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are
    Flawed", section 3.4): scale the guided prediction so that its standard deviation
    (per sample, over C, H, W) equals the conditional prediction's, then blend
    phi * rescaled + (1 - phi) * guided. Large guidance scales inflate the prediction's spread,
    which over-saturates images; phi = 0 changes nothing. The paper rescales the x_0 (v)
    prediction; like diffusers' `rescale_noise_cfg` this applies it to the noise prediction.
    """
    dims = tuple(range(1, guided.ndim))
    std_cond = eps_cond.std(dim=dims, correction=0, keepdim=True)
    std_guided = guided.std(dim=dims, correction=0, keepdim=True)
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    return phi * guided * ratio + (1 - phi) * guided


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): each label becomes the null label with
    probability p_uncond."""
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)
