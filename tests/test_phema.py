"""Post-hoc EMA (ddpm_phema): sigma_rel <-> gamma, the update against the exact power-function average, the
reconstruction against closed forms and against directly tracked EMAs, skip, exact resume, snapshot files."""

import io
import math

import numpy as np
import pytest
import torch

from ddpm_phema import (
    LONGEST_GAMMA,
    MAX_SIGMA_REL,
    PowerFunctionEMA,
    Snapshot,
    gamma_to_sigma_rel,
    list_snapshots,
    load_snapshot,
    reconstruct,
    reconstruct_from_folder,
    save_snapshot,
    sigma_rel_to_gamma,
    snapshot_interval,
)


class Vector(torch.nn.Module):
    """A model that is one weight vector, set to a chosen trajectory."""

    def __init__(self, size: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(size, dtype=dtype))


def synthetic_weights(s: int) -> torch.Tensor:
    """w_s: a line, a sine, a parabola and a constant, each of size about 1 over 1,000 steps."""
    return torch.tensor([s / 1000, math.sin(s / 50), (s / 1000 - 0.5) ** 2, 1.0], dtype=torch.float64)


def power_weights(t: int, gamma: float) -> np.ndarray:
    """The exact weight of w_1 ... w_t in the power-function EMA after t updates: integral of
    (gamma + 1) tau^gamma / t^(gamma + 1) over (s - 1, s]."""
    s = np.arange(1, t + 1, dtype=np.float64)
    return (s / t) ** (gamma + 1) - ((s - 1) / t) ** (gamma + 1)


def exact_average(t: int, sigma_rel: float) -> torch.Tensor:
    trajectory = torch.stack([synthetic_weights(s) for s in range(1, t + 1)])
    return torch.from_numpy(power_weights(t, sigma_rel_to_gamma(sigma_rel))) @ trajectory


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values()])


def relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def same_weights(a: PowerFunctionEMA, b: PowerFunctionEMA) -> bool:
    """Every profile's every tensor bit-identical, and the same count."""
    states = [(x.state_dict(), y.state_dict()) for x, y in zip(a.modules, b.modules, strict=True)]
    return torch.equal(a.num_updates, b.num_updates) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in states
    )


def test_sigma_rel_and_gamma_round_trip_and_match_the_paper():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)  # EDM2, Sec. 3.1
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-5)
    assert gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)
    for sigma_rel in np.linspace(0.005, 0.3, 60):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        s = sigma_rel**-2
        assert gamma == pytest.approx(np.roots([1, 7, 16 - s, 12 - s]).real.max(), rel=1e-10)  # the largest root
    for gamma in (0.0, 1.0, 6.94, 16.97, 100.0, 1e4):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(LONGEST_GAMMA, abs=1e-6)
    assert MAX_SIGMA_REL == pytest.approx(0.3003, abs=1e-4)
    for invalid in (0.0, -0.1, MAX_SIGMA_REL + 1e-6):
        with pytest.raises(ValueError):
            sigma_rel_to_gamma(invalid)


def test_update_is_the_power_function_average_of_the_trajectory():
    """After t updates each profile holds sum_s w_s (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1), whatever the
    initial weights (beta_1 = 0), to float64 rounding."""
    model = Vector(4)
    model.w.data.fill_(-5.0)
    sigma_rels = (0.05, 0.10, 0.2)
    ema = PowerFunctionEMA(model, sigma_rels)
    for s in range(1, 301):
        model.w.data.copy_(synthetic_weights(s))
        ema.update(model)
        if s in (1, 2, 37, 300):
            for module, sigma_rel in zip(ema.modules, sigma_rels):
                torch.testing.assert_close(module.w, exact_average(s, sigma_rel), rtol=1e-12, atol=1e-12)
    assert ema.num_updates.item() == 300


def test_update_reads_nothing_on_the_host(tensor_reads):
    model = Vector(3, torch.float32)
    ema = PowerFunctionEMA(model)
    tensor_reads["count"] = 0
    ema.update(model)
    ema.update(model, torch.tensor(True))
    ema.state_dict()
    assert tensor_reads["count"] == 0


def test_skip_cancels_an_update_exactly():
    """Updates with skip interleaved (skip true at every third step, with other weights) == the kept updates alone."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    skipping, plain = PowerFunctionEMA(model), PowerFunctionEMA(model)
    for s in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        skip = s % 3 == 0
        skipping.update(model, torch.tensor(skip))
        if not skip:
            plain.update(model)
    assert skipping.num_updates.item() == 20
    assert same_weights(skipping, plain)
    with pytest.raises(TypeError):
        plain.update(model, True)  # a Python bool: ~True is -2


def test_state_dict_resumes_bit_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    straight = PowerFunctionEMA(model)

    def steps(emas: list[PowerFunctionEMA], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for s in range(25):
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator))
            for ema in emas:
                ema.update(model, torch.tensor(s % 7 == 0))

    steps([straight], 1)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    resumed = PowerFunctionEMA(torch.nn.Linear(3, 2))
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    steps([straight, resumed], 2)
    assert same_weights(straight, resumed)
    with pytest.raises(ValueError):
        PowerFunctionEMA(model, (0.05,)).load_state_dict(straight.state_dict())


def test_reconstruction_of_a_synthetic_trajectory_matches_the_closed_form():
    """1,000 steps of the synthetic trajectory, 20 snapshots each of sigma_rel 0.05 and 0.10 (every 50 steps).
    Untracked sigma_rel 0.075 and 0.15 at the end, and 0.075 at step 500, come out within 2e-3 of the exact
    average (relative to the weights' norm; measured 3.6e-5, 7.2e-5 and 5.3e-4), while sigma_rel 0.075 and
    0.080 differ by 1.5e-2; the constant weight comes back exactly (the coefficients sum to 1). The tracked 0.05
    at the end comes out as the tracked EMA to float64 rounding (measured 3e-16)."""
    model = Vector(4)
    ema = PowerFunctionEMA(model)
    snapshots = []
    for s in range(1, 1001):
        model.w.data.copy_(synthetic_weights(s))
        ema.update(model)
        if s % snapshot_interval(1000) == 0:
            snapshots += ema.snapshot()
    assert len(snapshots) == 40
    for sigma_rel, t in ((0.075, 1000), (0.15, 1000), (0.075, 500)):
        reconstructed = reconstruct(snapshots, sigma_rel, t, dtype=torch.float64)
        error = relative_error(reconstructed, {"w": exact_average(t, sigma_rel)})
        assert error < 2e-3, (sigma_rel, t, error)
        assert reconstructed["w"][3].item() == pytest.approx(1.0, abs=1e-12)
    assert relative_error({"w": exact_average(1000, 0.080)}, {"w": exact_average(1000, 0.075)}) > 1e-2
    tracked = {"w": ema.modules[0].w.detach()}
    assert relative_error(reconstruct(snapshots, 0.05, dtype=torch.float64), tracked) < 1e-14


def train_toy_regression(
    steps: int, interval: int, *extra: tuple[float, ...]
) -> tuple[PowerFunctionEMA, list[PowerFunctionEMA], list[Snapshot]]:
    """A 1-16-1 MLP fit to sin(3x) by SGD (batch 16, lr 0.05): EMAs of sigma_rel 0.05 and 0.10 with their
    snapshots every `interval` steps, and EMAs of the `extra` sigma_rels updated alongside."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = PowerFunctionEMA(model)
    extra = [PowerFunctionEMA(model, e) for e in extra]
    snapshots = []
    for s in range(1, steps + 1):
        x = torch.rand(16, 1) * 4 - 2
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(3 * x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for e in (ema, *extra):
            e.update(model)
        if s % interval == 0:
            snapshots += ema.snapshot()
    return ema, extra, snapshots


def test_reconstruction_of_a_real_trajectory_matches_the_tracked_emas():
    """300 SGD steps, snapshots every 15 (20 per profile). Measured, relative to the weights' norm:
    * tracked sigma_rel 0.10 at the end from the snapshots: 0 (one snapshot is that EMA, coefficient 1);
    * the same without the last 0.10 snapshot (so from the others): 4.4e-4 (bound 2e-3);
    * untracked 0.075 against an EMA of 0.075 tracked alongside: 7e-6 (bound 1e-4);
    * from float16 snapshots instead of float32: 2.1e-4 (bound 6e-4);
    while the tracked 0.05 and 0.10 differ by 3.8e-2."""
    ema, (direct,), snapshots = train_toy_regression(300, 15, (0.075,))
    tracked = [module.state_dict() for module in ema.modules]
    assert relative_error(reconstruct(snapshots, 0.10), tracked[1]) < 1e-6
    assert relative_error(reconstruct(snapshots[:-1], 0.10), tracked[1]) < 2e-3
    assert relative_error(reconstruct(snapshots, 0.075), direct.modules[0].state_dict()) < 1e-4
    half = [Snapshot(s.t, s.gamma, {k: v.half() for k, v in s.state_dict.items()}) for s in snapshots]
    assert relative_error(reconstruct(half, 0.075), reconstruct(snapshots, 0.075)) < 6e-4
    assert relative_error(tracked[0], tracked[1]) > 1e-2


def test_snapshot_files_round_trip(tmp_path):
    _, _, snapshots = train_toy_regression(30, 10)
    folder = tmp_path / "phema"
    paths = [save_snapshot(s, folder) for s in snapshots]
    assert [p.name for p in paths[:2]] == ["phema-0000010-0.050.safetensors", "phema-0000010-0.100.safetensors"]
    files = list_snapshots(folder)
    assert [(f.path, f.t, f.gamma) for f in files] == [(p, s.t, s.gamma) for p, s in zip(paths, snapshots)]
    loaded = [load_snapshot(f.path) for f in files]
    for stored, original in zip(loaded, snapshots):
        assert (stored.t, stored.gamma) == (original.t, original.gamma)
        for key, value in original.state_dict.items():
            assert torch.equal(stored.state_dict[key], value.half())  # float16 by default
    assert torch.equal(
        load_snapshot(save_snapshot(snapshots[0], tmp_path / "fp32", dtype=None)).state_dict["0.weight"],
        snapshots[0].state_dict["0.weight"],
    )
    from_folder, from_memory = reconstruct_from_folder(folder, 0.075), reconstruct(loaded, 0.075)
    assert all(torch.equal(from_folder[k], from_memory[k]) for k in from_memory)
    assert not list(folder.glob("*.tmp")) and list_snapshots(tmp_path / "absent") == []


def test_snapshot_interval_stores_20_to_40_snapshots_at_round_steps():
    for total in [*range(1, 5000), 12_345, 800_000, 999_999, 1_000_000, 10**8 + 7]:
        interval = snapshot_interval(total)
        count = total // interval
        assert (20 <= count <= 40) if total >= 20 else interval == 1, (total, interval)
        digits = str(interval).rstrip("0")
        assert interval < 10 or digits in ("1", "2", "25", "5"), (total, interval)
    assert snapshot_interval(800_000) == 25_000


# The post-hoc EMA in the tool: tracked by training, kept by resume, reconstructed by --posthoc_ema.

RUN = (
    "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --batch_size 256 --warmup_steps 3 "
    "--sample_every 0 --lr 2e-3 --device cpu --save_model --save_dir out"
)


def test_training_stores_snapshots_and_posthoc_ema_reconstructs_a_tracked_profile(tmp_path):
    """40 steps: snapshot_interval(40) = 2, so 20 snapshots of each profile; the reconstruction of sigma_rel 0.10 at the
    last snapshot is the tracked 0.10 EMA of the checkpoint, up to the float16 storage (measured 1.9e-4 of the norm)."""
    import ddpm_main
    from conftest import run_cli
    from ddpm_checkpoint import load_checkpoint, load_model

    assert run_cli(f"{RUN} --max_steps 40 --run_name P", tmp_path) == 0
    run_dir = tmp_path / "models/P"
    files = list_snapshots(run_dir / "phema")
    assert [f.t for f in files] == sorted(2 * [2 * k for k in range(1, 21)]) and {
        round(f.sigma_rel, 3) for f in files
    } == {0.05, 0.1}
    assert ddpm_main.main(["--posthoc_ema", "0.1,0.15", "--model_path", str(run_dir / "ckpt.pt")]) == 0
    tracked = load_checkpoint(run_dir / "ckpt.pt")["phema"]["modules"][1]
    rebuilt = load_model(run_dir / "posthoc_ema_0.100.safetensors").model.state_dict()
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in tracked.values()))
    error = torch.sqrt(sum(((rebuilt[k].double() - v.double()) ** 2).sum() for k, v in tracked.items())) / norm
    assert error < 5e-4, error
    longer = load_model(run_dir / "posthoc_ema_0.150.safetensors").model.state_dict()
    assert any(not torch.allclose(longer[k], rebuilt[k], atol=1e-4) for k in rebuilt), "another length, other weights"
    assert (
        run_cli(
            f"--inference --model_path {run_dir / 'posthoc_ema_0.150.safetensors'} --num_samples 2 --sampler ddim "
            "--sampling_steps 3 --save_dir inf --device cpu",
            tmp_path,
        )
        == 0
    )
    assert (tmp_path / "inf/samples.npz").is_file()


def test_resume_keeps_the_tracked_profiles_and_snapshots_exactly(tmp_path):
    from conftest import run_cli
    from ddpm_checkpoint import load_checkpoint

    assert run_cli(f"{RUN} --max_steps 24 --phema_every 4 --run_name straight", tmp_path) == 0
    assert run_cli(f"{RUN} --max_steps 12 --phema_every 4 --run_name split", tmp_path) == 0
    assert run_cli(f"{RUN} --max_steps 24 --phema_every 4 --run_name split --resume", tmp_path) == 0
    straight, split = (load_checkpoint(tmp_path / f"models/{name}/ckpt.pt")["phema"] for name in ("straight", "split"))
    assert torch.equal(straight["num_updates"], split["num_updates"]) and straight["num_updates"] == 24
    for a, b in zip(straight["modules"], split["modules"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (tmp_path / "models/straight/phema").iterdir())
    assert len(names) == 12 and names == sorted(p.name for p in (tmp_path / "models/split/phema").iterdir())
    for name in names:  # (the files' bytes may differ: safetensors writes its metadata in no fixed order)
        a, b = (load_snapshot(tmp_path / f"models/{run}/phema" / name) for run in ("straight", "split"))
        assert (a.t, a.gamma) == (b.t, b.gamma) and all(
            torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict
        )


def test_no_snapshots_without_save_model_or_with_phema_every_0(tmp_path, capsys):
    import ddpm_main
    from conftest import run_cli

    assert run_cli(f"{RUN} --max_steps 4 --phema_every 0 --run_name off", tmp_path) == 0
    assert not (tmp_path / "models/off/phema").exists()
    capsys.readouterr()
    assert ddpm_main.main(["--posthoc_ema", "0.1", "--model_path", str(tmp_path / "models/off/ckpt.pt")]) == 2
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    assert ddpm_main.main(["--posthoc_ema", "0.5", "--model_path", str(tmp_path / "models/off/ckpt.pt")]) == 2
