"""Optimisation: the optimizers (AdamW, Adam, Lion), the learning-rate schedule, the update step and the EMA."""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch

from ddpm_config import TrainConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g, with decoupled
    weight decay. Use an lr about 3-10x smaller than AdamW's.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One update; none where `self.found_inf` (set before the step, as GradScaler does for the fused
        optimizers) is 1, decided on the device."""
        skip = getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                updated = (
                    p * (1 - group["lr"] * group["weight_decay"])
                    - group["lr"] * exp_avg.lerp(p.grad, 1 - beta1).sign_()
                )
                updated_exp_avg = exp_avg.lerp(p.grad, 1 - beta2)
                if skip is not None:
                    updated = torch.where(skip.bool(), p, updated)
                    updated_exp_avg = torch.where(skip.bool(), exp_avg, updated_exp_avg)
                p.copy_(updated)
                exp_avg.copy_(updated_exp_avg)


def build_optimizer(train: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """--optimizer with --lr, --beta1, --beta2 and --weight_decay."""
    betas = (train.beta1, train.beta2)
    if train.optimizer == "lion":
        return Lion(model.parameters(), lr=train.lr, betas=betas, weight_decay=train.weight_decay)
    optimizer_class = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    # fused: the whole update in one kernel per tensor, on CUDA and (PyTorch >= 2.4) on the CPU, where it is 1.8x
    # foreach
    return optimizer_class(model.parameters(), lr=train.lr, betas=betas, weight_decay=train.weight_decay, fused=True)


WARMUP_FRACTION, MAX_WARMUP_STEPS = 0.05, 5000  # the default warm-up: 5% of the planned steps, at most Ho et al.'s


def derived_warmup(total_steps: int) -> int:
    """--warmup_steps when not given: a few percent of the run, so that a short run is not spent warming up."""
    return min(MAX_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * total_steps))


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up over `warmup_steps`, then constant, cosine decay to 0, or x0.1 at 50% and 75%."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """--warmup_steps of linear warm-up, then --lr_schedule, over total_steps (fixed before the schedule is made)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule)
    )


def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: torch.Tensor,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale and clip the gradients, then step, unless the loss or the gradients are not finite; all on
    the device. Returns (grad norm, skip)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    optimizer.found_inf = skip.float()
    optimizer.step()
    scaler.update()
    return grad_norm, skip


EMA_HALFLIFE_RATIO = (
    0.05  # the default EMA averages over a half-life of 5% of the steps so far (EDM's ema_rampup_ratio)
)
EMA_MAX_DECAY = 0.9999  # ... at most the half-life of Ho et al.'s decay (6,931 steps)


class EMA:
    """Exponential moving average of the weights, starting from the initial weights, with one of two warm-ups
    after n updates:

    * `halflife_ratio` r (the default): a half-life of r * n steps, decay_n = min(decay, 0.5 ** (1 / (r n))), the
      ramp-up of Karras et al. 2022 (EDM, ema_rampup_ratio): the average covers the last few percent of the run
      whatever its length, so a 600-step run and an 800k-step run both sample from well-trained weights;
    * without it: decay_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with
      num_updates, as Ho et al.'s code), which at 0.9999 averages over the last ~10,000 steps once n is large.

    The update count lives on the device and an update can be cancelled there (`skip`, a step whose loss or
    gradient was not finite), so updating never waits for the GPU. torch.optim.swa_utils.AveragedModel reads its
    count on the host at every update, which would stall the training loop once per step.
    """

    def __init__(self, model: torch.nn.Module, decay: float, halflife_ratio: Optional[float] = None):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.halflife_ratio = halflife_ratio
        self.num_updates = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)

    def tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*module.parameters(), *module.buffers())]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """ema <- ema + (1 - decay_n) (weights - ema), unless `skip` (a bool tensor) is true."""
        n = self.num_updates
        if self.halflife_ratio is None:
            decay = (1 + n) / (10 + n)
        else:
            decay = 0.5 ** (1 / (self.halflife_ratio * n).clamp(min=1e-8))
        weight = 1 - torch.clamp(decay, max=self.decay)
        if skip is not None:
            weight = weight * ~skip
        ema_tensors = self.tensors(self.module)
        deltas = torch._foreach_sub(self.tensors(model), ema_tensors)
        torch._foreach_mul_(deltas, weight)
        torch._foreach_add_(ema_tensors, deltas)
        self.num_updates += 1 if skip is None else ~skip


def build_ema(model: torch.nn.Module, ema_decay: Optional[float]) -> Optional[EMA]:
    """--ema_decay: None (the default) a half-life that grows with the run; 0 no EMA; else that fixed decay."""
    if ema_decay is None:
        return EMA(model, EMA_MAX_DECAY, halflife_ratio=EMA_HALFLIFE_RATIO)
    return EMA(model, ema_decay) if ema_decay > 0 else None
