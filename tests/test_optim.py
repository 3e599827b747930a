"""ddpm_optim: Lion, the choice of optimizer, the learning-rate warm-up and schedules, the guarded update, the EMA."""

import math

import pytest
import torch

from ddpm_config import TrainConfig
from ddpm_optim import (
    EMA,
    EMA_HALFLIFE_RATIO,
    EMA_MAX_DECAY,
    Lion,
    apply_update,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    derived_warmup,
    lr_multiplier,
)


def test_lion_follows_its_update_rule():
    """Chen et al. 2023, Alg. 2: p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    g1 = torch.tensor([0.3, -0.2, 0.0])
    p.grad = g1.clone()
    optimizer.step()
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.05) - 0.1 * torch.sign(0.1 * g1)
    torch.testing.assert_close(p.data, expected)
    g2 = torch.tensor([-1.0, -1.0, 1.0])
    p.grad = g2.clone()
    optimizer.step()
    momentum = 0.01 * g1
    expected = expected * (1 - 0.05) - 0.1 * torch.sign(0.9 * momentum + 0.1 * g2)
    torch.testing.assert_close(p.data, expected)


def test_build_optimizer_takes_the_flags_of_each_optimizer():
    model = torch.nn.Linear(2, 2)
    for name, kind in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("lion", Lion)):
        optimizer = build_optimizer(
            TrainConfig(optimizer=name, lr=3e-3, beta1=0.8, beta2=0.95, weight_decay=0.01), model
        )
        assert type(optimizer) is kind, name
        group = optimizer.param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.8, 0.95), 0.01), name


def test_the_derived_warmup_is_five_percent_of_the_run_at_most_5000_steps():
    assert [derived_warmup(steps) for steps in (20, 600, 1200, 800_000)] == [1, 30, 60, 5000]


def test_the_lr_scheduler_follows_lr_multiplier_from_the_first_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=4, total_steps=20, schedule="cosine")
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * lr_multiplier(step, 4, 20, "cosine") for step in range(20)])
    assert seen[0] == pytest.approx(0.5 / 4), "the first step already warms up"


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_apply_update_clips_the_gradient_and_skips_a_non_finite_step_on_the_device(name):
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    optimizer = build_optimizer(TrainConfig(optimizer=name, lr=0.1), model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = (model(torch.tensor([[3.0, 4.0]])) ** 2).sum() / 2  # gradient = output * input = 7 * (3, 4): norm 35
    loss.backward()
    grad_norm, skip = apply_update(model, optimizer, scaler, loss, grad_clip=1.0)
    assert grad_norm.item() == pytest.approx(35.0) and not skip.item(), "the norm before clipping"
    assert model.weight.grad.norm().item() == pytest.approx(1.0), "clipped to --grad_clip"
    torch.testing.assert_close(
        model.weight.data, torch.tensor([[0.9, 0.9]])
    )  # the first step of both moves each weight by lr
    before, state = (
        model.weight.data.clone(),
        {k: v.clone() for k, v in optimizer.state[model.weight].items() if torch.is_tensor(v)},
    )
    model.weight.grad = torch.ones_like(model.weight)
    grad_norm, skip = apply_update(model, optimizer, scaler, torch.tensor(math.nan), grad_clip=1.0)
    assert skip.item() and torch.equal(model.weight.data, before), "a non-finite loss changes no weight"
    for key, value in state.items():
        if key != "step":
            assert torch.equal(optimizer.state[model.weight][key], value), f"nor the optimizer's {key}"


def test_lr_warmup_then_schedules():
    assert lr_multiplier(0, 10, 100, "constant") == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, "constant") == 1.0
    assert lr_multiplier(50, 10, 100, "constant") == 1.0
    assert lr_multiplier(10, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert [lr_multiplier(s, 0, 100, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_ema_warms_up_then_decays_at_the_given_rate_and_skips_on_the_device():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9999)
    model.weight.data.fill_(1.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1 - 0.1)  # decay (1+0)/(10+0) = 0.1
    ema.update(model, skip=torch.tensor(True))
    assert ema.module.weight.item() == pytest.approx(1 - 0.1) and ema.num_updates.item() == 1, (
        "a skipped step changes nothing"
    )
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1 - 0.1 * 2 / 11)  # decay (1+1)/(10+1)
    ema.module.weight.data.zero_()
    ema.num_updates.fill_(10**6)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1e-4)


def test_the_default_ema_has_a_half_life_of_a_twentieth_of_the_steps_so_far():
    """decay_n = min(0.9999, 0.5 ** (1 / (0.05 n))): the first update copies the weights; after 200 updates the
    half-life is 10 steps; late in a long run the cap (Ho et al.'s 0.9999) holds."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=EMA_MAX_DECAY, halflife_ratio=EMA_HALFLIFE_RATIO)
    expected = 0.0
    for n in range(300):
        model.weight.data.fill_(float(n))
        ema.update(model)
        decay = 0.0 if n == 0 else min(EMA_MAX_DECAY, 0.5 ** (1 / (0.05 * n)))
        expected = decay * expected + (1 - decay) * n
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-5), n
    assert 0.5 ** (1 / (0.05 * 200)) == pytest.approx(0.5**0.1), "a half-life of 10 steps at n = 200"
    ema.num_updates.fill_(10**6)
    ema.module.weight.data.zero_()
    model.weight.data.fill_(1.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1e-4)


def test_build_ema_from_the_ema_decay_flag():
    model = torch.nn.Linear(1, 1)
    derived = build_ema(model, None)
    assert (derived.decay, derived.halflife_ratio) == (EMA_MAX_DECAY, EMA_HALFLIFE_RATIO), (
        "default: a half-life growing with the run"
    )
    fixed = build_ema(model, 0.99)
    assert (fixed.decay, fixed.halflife_ratio) == (0.99, None), "a fixed decay, TensorFlow's warm-up"
    assert build_ema(model, 0.0) is None, "0: no EMA"
    assert (
        fixed.module is not model
        and torch.equal(fixed.module.weight, model.weight)
        and not fixed.module.weight.requires_grad
    )
