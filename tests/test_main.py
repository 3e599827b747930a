"""ddpm_main, the command line: bad input is one line and touches nothing, every documented command is valid, and
end-to-end runs on CPU (tiny models trained for a few steps on the synthetic data or a folder of PNGs)."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_main
from conftest import REPO, TINY, tree_fingerprint, usage_error, write_grey_folder
from conftest import run_cli as run
from ddpm_checkpoint import load_checkpoint, load_model
from ddpm_config import SamplingConfig, UsageError
from ddpm_kinds import kind_of_model
from ddpm_outputs import to_uint8
from ddpm_runtime import Runtime
from ddpm_sampling import generate_from


class RunsCode:
    """Unpickling this would call os.system; torch.load(weights_only=True) must refuse it, and the tool must say
    that the file is unsafe (not that it is corrupt)."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


@pytest.mark.parametrize(
    "command,message",
    [
        ('--inference --model_path models/C/ckpt.pt --sample_classes "0,10"', "out of range"),
        ('--inference --model_path models/C/ckpt.pt --sample_classes "unicorn"', "unknown class"),
        ('--inference --model_path models/C/ckpt.pt --sample_classes ","', "empty"),
        ('--inference --model_path models/U/ckpt.pt --sample_classes "0"', "unconditional"),
        ("--inference --conditional --model_path models/U/ckpt.pt", "unconditional"),
        ("--inference --model_path models/missing.pt", "not found"),
        ("--inference --model_path truncated.pt", "truncated or corrupt"),
        ("--inference --model_path foreign.pt", "not a checkpoint written by this tool"),
        ("--inference --model_path models/C/ckpt.pt --num_samples 0", "--num_samples must be positive"),
        ("--inference --model_path models/C/ckpt.pt --guidance_scale nan", "finite"),
        ("--inference --model_path models/C/ckpt.pt --guidance_scale inf", "finite"),
        ("--inference --model_path models/C/ckpt.pt --sampling_steps 500", "cannot exceed"),
        (f"{TINY} --batch_size 0", "--batch_size must be positive"),
        (f"{TINY} --epochs 0", "--epochs must be positive"),
        (f"{TINY} --epochs -3", "--epochs must be positive"),
        (f"{TINY} --p_uncond 1.5", "--p_uncond must be between 0 and 1"),
        (f"{TINY} --timesteps 5", "at least 10"),
        (f"{TINY} --run_name U --save_model --save_dir out_U --model_size small", "cannot resume"),
        ("--dataset folder --data_dir empty_dir --model_size tiny", "empty_dir"),
        ("--dataset synthetic --model_size ddpm --image_size 20", "does not fit"),
        (f"{TINY} --save_model --run_name ../../escaped", "--run_name must be a plain name"),
        (f"{TINY} --save_model --run_name a/b", "--run_name must be a plain name"),
        (f"{TINY} --save_model --run_name ..", "--run_name must be a plain name"),
        ("--inference --model_path unsafe.pt", "refusing to load it"),
    ],
)
def test_bad_input_gives_one_line_and_touches_nothing(trained_workspace, capsys, command, message):
    (trained_workspace / "truncated.pt").write_bytes((trained_workspace / "models/C/ckpt.pt").read_bytes()[:2000])
    torch.save({"weights": torch.zeros(2)}, trained_workspace / "foreign.pt")
    torch.save({"format": "ddpm-checkpoint", "payload": RunsCode()}, trained_workspace / "unsafe.pt")
    (trained_workspace / "empty_dir").mkdir(exist_ok=True)
    before = tree_fingerprint(trained_workspace)
    capsys.readouterr()
    assert run(command, trained_workspace) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("error: ")
    assert tree_fingerprint(trained_workspace) == before


@pytest.mark.parametrize(
    "command,message",
    [
        ("--inference --eta 0.5", "--eta works with --sampler ddim; dpm++3m, the sampler of this run, ignores it"),
        (
            "--inference --sampler dpm++3m --eta 0",
            "--eta works with --sampler ddim; dpm++3m, the sampler of this run, ignores it",
        ),
        ("--eta 0.5", "--eta works with --sampler ddim; dpm++2m, the sampler of this run, ignores it"),
        (
            "--inference --sampler ddpm --timestep_spacing edm",
            "--timestep_spacing works with --sampler ddim or dpm++2m or dpm++3m or unipc or ipndm "
            "or dpm++2m-sde; ddpm, the sampler of this run, ignores it",
        ),
        (
            "--inference --sampler unipc --sampling_steps 1",
            "--sampling_steps 1 needs --timestep_spacing time; unipc spaces its steps by logsnr, which needs at "
            "least 2",
        ),
        (
            "--inference --sampling_preset best --sampler ddim --guidance_scale 2",
            "--sampling_preset best chooses the sampler, steps, guidance scale and guide model itself; drop "
            "--sampler, --guidance_scale",
        ),
        (
            "--inference --sampling_preset best --sampling_steps 20 --guide_model g.pt",
            "--sampling_preset best chooses the sampler, steps, guidance scale and guide model itself; drop "
            "--sampling_steps, --guide_model",
        ),
    ],
)
def test_flags_that_would_be_ignored_are_refused(command, message):
    """--eta or --timestep_spacing with a sampler that does not take it (the default ddpm of --inference, the training
    grids' dpm++2m), a single step on a spacing that needs two, and
    --sampling_preset with the settings it chooses itself: refused in one line, not silently dropped."""
    args = ddpm_main.build_parser().parse_args(shlex.split(command))
    assert usage_error(ddpm_main.validate_args, args) == message
    for accepted in (
        ["--inference", "--sampler", "ddim", "--eta", "0.5"],
        ["--inference", "--sampler", "ipndm", "--timestep_spacing", "edm"],
        ["--inference", "--sampler", "unipc", "--timestep_spacing", "time", "--sampling_steps", "1"],
    ):
        ddpm_main.validate_args(ddpm_main.build_parser().parse_args(accepted))


def test_a_real_process_reports_bad_input_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "ddpm_main.py"), "--inference", "--model_path", "nowhere.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: checkpoint not found: nowhere.pt"


def documented_commands(page) -> list[str]:
    """The flags of each `python ddpm_main.py ...` (and `torchrun ... ddpm_main.py ...`) line of a page, a line
    continued over lines ending in a backslash read as one, a trailing ` &` left out."""
    commands = []
    for line in page.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if re.match(r"(python3? |torchrun .*?)ddpm_main\.py( |$)", line):
            commands.append(line.split("ddpm_main.py", 1)[1].removesuffix(" &"))  # a job script's background line
    return commands


def test_readme_commands_parse():
    """Every `python ddpm_main.py ...` line of README.md and docs/*.md, read as they are now, uses flags the parser
    knows with values validate_args accepts (what the tool checks before it touches a file)."""
    parser = ddpm_main.build_parser()
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = {page.name: documented_commands(page) for page in pages}
    assert len(commands["README.md"]) >= 5
    for page, lines in commands.items():
        for command in lines:
            where = f"{page}: ddpm_main.py{command}"
            try:
                args = parser.parse_args(shlex.split(command, comments=True))
            except SystemExit:
                pytest.fail(f"{where}: the parser refuses it (see its message above)")
            try:
                ddpm_main.validate_args(args)
            except UsageError as error:
                pytest.fail(f"{where}: {error}")


def assert_ho_algorithm_2(loaded, trajectory: list[torch.Tensor]) -> None:
    """Every step of an ancestral chain (x_T, ..., x_0, as Diffusion.sample's trajectory) is Ho et al.'s Algorithm 2
    for the loaded network, worked out here in float64: x_{t-1} = mu + sigma_t z with mu from the clipped x_0
    prediction (eq. 6-7; from v, x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v, Salimans & Ho 2022) and
    sigma_t^2 the posterior variance (fixed_small) or beta_t (fixed_large). The residuals z
    of the noisy steps must be standard normal (mean within 0.1, std within 10%: 1,536 values a step, standard
    error 0.02), and the last step must land on mu exactly."""
    alpha_bar, prediction_type = loaded.diffusion.alphas_cumprod.double(), loaded.diffusion.prediction_type
    assert (alpha_bar > 0).all() and (alpha_bar < 1).all() and (alpha_bar.diff() < 0).all(), alpha_bar
    num_timesteps = len(alpha_bar)
    assert len(trajectory) == num_timesteps + 1
    for t in range(num_timesteps):  # step t takes trajectory[T - 1 - t] = x_t to the next one, x_{t-1}
        x_t, x_prev = trajectory[num_timesteps - 1 - t].double(), trajectory[num_timesteps - t].double()
        with torch.no_grad():
            out = loaded.model(x_t.float(), torch.full((len(x_t),), t)).double()
        signal, noise = alpha_bar[t].sqrt(), (1 - alpha_bar[t]).sqrt()
        x0 = {"eps": (x_t - noise * out) / signal, "v": signal * x_t - noise * out, "x0": out}[prediction_type].clamp(
            -1, 1
        )
        ab_prev = alpha_bar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - alpha_bar[t] / ab_prev
        mu = (
            beta * ab_prev.sqrt() / (1 - alpha_bar[t]) * x0
            + (1 - ab_prev) * (1 - beta).sqrt() / (1 - alpha_bar[t]) * x_t
        )
        if t == 0:
            torch.testing.assert_close(x_prev, mu, atol=1e-5, rtol=0)
            continue
        variance = beta if loaded.diffusion.variance == "fixed_large" else beta * (1 - ab_prev) / (1 - alpha_bar[t])
        z = (x_prev - mu) / variance.sqrt()
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1, (t, z.mean().item(), z.std().item())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_shortest_chain_trains_and_samples_ho_et_al_algorithm_2(tmp_path, schedule):
    """At T = 10 every schedule trains with finite losses, and --inference writes the images of the library path
    (load_model, then ddpm_sampling.generate with the same seed), whose chain is Ho et al.'s Algorithm 2 step by step
    for the trained network (assert_ho_algorithm_2): pure noise, a NaN clipped away or a chain that skips the network
    fails."""
    args = (
        "--dataset synthetic --image_size 16 --model_size tiny --batch_size 8 --warmup_steps 1 --num_samples 2 "
        "--sample_every 1"
    )
    assert (
        run(f"{args} --timesteps 10 --schedule {schedule} --max_steps 2 --save_model --run_name N --lr 0.003", tmp_path)
        == 0
    )
    history = json.loads((tmp_path / "outputs/loss_history_N.json").read_text())
    assert np.isfinite(history["train_loss"] + history["val_loss"] + history["test_loss"]).all()
    assert (
        run(
            "--inference --sampler ddpm --model_path models/N/ckpt.pt --num_samples 2 --seed 3 --save_dir inf", tmp_path
        )
        == 0
    )
    images = torch.from_numpy(np.load(tmp_path / "inf/samples.npz")["images"])
    loaded = load_model(tmp_path / "models/N/ckpt.pt", "cpu")
    assert loaded.description.diffusion["schedule"] == schedule and loaded.diffusion.num_timesteps == 10
    kind = kind_of_model(loaded.description)
    settings = kind.sampling_settings(SamplingConfig(sampler="ddpm"), loaded.diffusion.num_timesteps)
    assert torch.equal(images, generate_from(loaded, kind, 2, None, settings, 3, 2, Runtime(torch.device("cpu"))))
    trajectory = []
    drawn = loaded.diffusion.sample(
        loaded.model, (2, 3, 16, 16), settings, generator=torch.Generator().manual_seed(3), trajectory=trajectory
    )
    assert torch.equal(images, to_uint8(drawn))
    assert_ho_algorithm_2(loaded, trajectory)


def test_a_grey_folder_trains_a_one_channel_model_that_writes_grey_pngs(tmp_path, capsys):
    write_grey_folder(tmp_path / "grey", "split")
    assert (
        run(
            "--dataset folder --data_dir grey --image_size 8 --model_size tiny --timesteps 20 --batch_size 4 "
            "--max_steps 2 --conditional --save_model --run_name G --save_dir out_G",
            tmp_path,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "7 train / 1 val / 4 test images of 1x8x8" in out and "random flips: off" in out
    checkpoint = load_checkpoint(tmp_path / "models/G/ckpt.pt")
    assert checkpoint["data"]["channels"] == 1 and checkpoint["model_config"]["in_channels"] == 1
    assert (
        run(
            "--inference --model_path models/G/ckpt.pt --num_samples 2 --sampler ddim --sampling_steps 3 "
            "--save_dir inf_G",
            tmp_path,
        )
        == 0
    )
    from PIL import Image

    with Image.open(tmp_path / "inf_G/samples/00000.png") as image:
        assert image.mode == "L" and image.size == (8, 8)
    assert np.load(tmp_path / "inf_G/samples.npz")["images"].shape == (2, 8, 8, 1)
    assert (
        run(
            "--dataset folder --data_dir grey --image_size 8 --model_size tiny --timesteps 20 --batch_size 4 "
            "--max_steps 3 --conditional --save_model --run_name G --save_dir out_G --resume --channels 3",
            tmp_path,
        )
        == 2
    )
    assert "add --channels 1" in capsys.readouterr().err


def test_guidance_sweep_script_makes_one_labelled_image(trained_workspace):
    """The script runs the interpreter named by PYTHON, here the one running the tests; a `python` first on PATH
    that is not it (as from a virtual environment that is not activated) must not be used."""
    script = REPO / "scripts/guidance_sweep.sh"
    decoy = trained_workspace / "decoy_bin"
    decoy.mkdir(exist_ok=True)
    (decoy / "python").write_text("#!/bin/sh\necho 'the decoy python ran' >&2\nexit 97\n")
    (decoy / "python").chmod(0o755)
    env = {
        **os.environ,
        "NUM_SAMPLES": "3",
        "PYTHON": sys.executable,
        "PATH": f"{decoy}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [
            "bash",
            str(script),
            "models/C/ckpt.pt",
            "2",
            "0 3",
            "sweep",
            "--sampler",
            "ddim",
            "--sampling_steps",
            "3",
            "--no_ema",
        ],
        cwd=trained_workspace,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    with Image.open(trained_workspace / "sweep/guidance_sweep.png") as image:
        assert image.height == 2 * 64 and image.width > 3 * 64, "16-pixel images shown 4x: at least 64 px wide"
    unguided = np.load(trained_workspace / "sweep/scale_0/samples.npz")
    guided = np.load(trained_workspace / "sweep/scale_3/samples.npz")
    assert unguided["labels"].tolist() == guided["labels"].tolist() == [2, 2, 2]
    assert not np.array_equal(unguided["images"], guided["images"])
