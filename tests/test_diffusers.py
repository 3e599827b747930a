"""diffusers both ways, checked against diffusers itself: the networks give the same outputs (1e-5), DDPMScheduler,
DDIMScheduler, DPMSolverMultistepScheduler (also its SDE variant) and UniPCMultistepScheduler take the same steps as the
tool's samplers, DDPMPipeline / DDIMPipeline
sample the tool's images from an exported folder, and google/ddpm-cifar10-32's configuration imports into a checkpoint
the CLI samples and evaluates.
No weights are downloaded: every model is built from a configuration with random weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GaussianMixtureNoise, sampling, write_cifar10
from conftest import run_cli as run
from ddpm_checkpoint import load_checkpoint, load_model, save_checkpoint
from ddpm_diffusers import unet2d_config
from ddpm_diffusion import Diffusion
from ddpm_model import UNet, count_parameters, preset_config
from ddpm_samplers import AncestralSampler, DDIMSampler, DPMSolverPlusPlus2M, DPMSolverPlusPlus3M

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's unet/config.json and scheduler_config.json, as published (Ho et al.'s CIFAR-10 model).
GOOGLE_DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
GOOGLE_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
TOLERANCE = 1e-5


def unet2d(config: dict):
    return diffusers.UNet2DModel(**{key: value for key, value in config.items() if not key.startswith("_")})


def inputs(size: int, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator), torch.tensor([3, 871][:batch])


def write_hub_folder(folder: Path, config: dict, scheduler: dict, seed: int = 0) -> torch.nn.Module:
    """A folder laid out as google/ddpm-cifar10-32 is (config.json, weights and scheduler_config.json side by side),
    with a randomly initialised UNet2DModel of `config`."""
    torch.manual_seed(seed)
    model = unet2d(config).eval()
    model.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler))
    return model


def random_checkpoint(path: Path, model_config: dict, *, conditional: bool, diffusion: dict, seed: int = 0) -> UNet:
    """A checkpoint of the tool with random weights (perturbed, so that no layer is zero) as EMA weights."""
    torch.manual_seed(seed)
    model = UNet(**model_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_checkpoint(
        {
            "model_config": model.config,
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "diffusion": diffusion,
            "conditional": conditional,
            "train_state": {"step": 7},
            "config": {},
            "data": {
                "dataset": "synthetic",
                "class_names": [f"class{i}" for i in range(model_config.get("num_classes") or 0)],
                "image_size": model_config["image_size"],
                "channels": model_config["in_channels"],
            },
        },
        path,
    )
    return model.eval()


SMALL = dict(
    in_channels=3, image_size=16, base_dim=32, dim_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0
)


# Import: google/ddpm-cifar10-32's configuration


@pytest.fixture(scope="module")
def google_import(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """google/ddpm-cifar10-32's layout with random weights, imported; ./data holds a small fake CIFAR-10 for
    --evaluate."""
    root = tmp_path_factory.mktemp("import")
    theirs = write_hub_folder(root / "ddpm-cifar10-32", GOOGLE_DDPM_CIFAR10_32, GOOGLE_SCHEDULER)
    assert run("--import_diffusers ddpm-cifar10-32 --model_path models/ddpm_cifar10_32/ckpt.pt", root) == 0
    (root / "data").mkdir()
    write_cifar10(root / "data")
    return root, theirs


def test_imported_google_model_gives_diffusers_outputs(google_import):
    root, theirs = google_import
    checkpoint = load_checkpoint(root / "models/ddpm_cifar10_32/ckpt.pt")
    assert checkpoint["model_config"] == UNet(**preset_config("ddpm-ho", 32) | {"dropout": 0.0}).config, (
        "it is the ddpm-ho preset"
    )
    assert checkpoint["diffusion"] == {
        "timesteps": 1000,
        "schedule": "linear",
        "prediction_type": "eps",
        "variance": "fixed_large",
    }
    assert checkpoint["data"]["dataset"] == "cifar10" and checkpoint["conditional"] is False
    ours = load_model(root / "models/ddpm_cifar10_32/ckpt.pt", "cpu").model
    x, t = inputs(32)
    with torch.no_grad():
        expected = theirs(x, t).sample
        error = (ours(x, t) - expected).abs().max().item()
    assert error < TOLERANCE * expected.abs().max().item(), error


def test_imported_google_model_samples_evaluates_and_compares_through_the_cli(google_import):
    root, _ = google_import
    model = "--model_path models/ddpm_cifar10_32/ckpt.pt"
    assert run(f"--inference {model} --sampler ddpm --num_samples 1 --sampling_steps 2 --save_dir inf", root) == 0
    record = json.loads((root / "inf/samples.json").read_text())
    assert record["variance"] == "fixed_large" and record["sampler"] == "ddpm"
    assert (
        run(
            f"--evaluate {model} --fid_num_samples 2 --fid_features random-conv --sampler ddim --sampling_steps 1 "
            "--save_dir ev",
            root,
        )
        == 0
    )
    assert np.isfinite(json.loads((root / "ev/evaluation.json").read_text())["fid"])
    shutil.copy(root / "models/ddpm_cifar10_32/ckpt.pt", root / "models/copy.pt")
    assert (
        run(
            "--compare_checkpoints models/ddpm_cifar10_32/ckpt.pt models/copy.pt --num_samples 1 --sampler ddim "
            "--sampling_steps 1 --save_dir cmp",
            root,
        )
        == 0
    )
    assert (root / "cmp/checkpoint_comparison.png").is_file()


# Export: the presets, conditional and not


def test_ddpm_preset_exports_to_its_diffusers_twin(tmp_path):
    """The `ddpm` preset is UNet2DModel with these settings exactly, and gives its outputs."""
    model_config = dict(in_channels=3, image_size=32, **preset_config("ddpm", 32))
    ours = random_checkpoint(
        tmp_path / "ddpm.pt",
        model_config,
        conditional=False,
        diffusion={"timesteps": 1000, "schedule": "linear", "variance": "fixed_small"},
    )
    config = unet2d_config(ours.config)
    assert (config["block_out_channels"], config["layers_per_block"], config["resnet_time_scale_shift"]) == (
        [128, 256, 256, 256],
        2,
        "scale_shift",
    )
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert (
        config["flip_sin_to_cos"],
        config["freq_shift"],
        config["norm_num_groups"],
        config["attention_head_dim"],
    ) == (False, 1, 32, None)
    assert run(f"--export_diffusers {tmp_path / 'out'} --model_path {tmp_path / 'ddpm.pt'}", tmp_path) == 0
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out/unet").eval()
    assert count_parameters(theirs) == count_parameters(ours) == 38_307_203
    assert (tmp_path / "out/unet/diffusion_pytorch_model.safetensors").is_file() and (
        tmp_path / "out/README.md"
    ).is_file()
    x, t = inputs(32)
    with torch.no_grad():
        expected = ours(x, t)
        error = (theirs(x, t).sample - expected).abs().max().item()
    assert error < TOLERANCE * expected.abs().max().item(), error


@pytest.mark.parametrize("overrides", [dict(), dict(num_heads=2, film=False, norm_eps=1e-6, tf_padding=True)])
def test_conditional_export_gives_the_tools_outputs_for_every_label_and_the_null_label(tmp_path, overrides):
    ours = random_checkpoint(
        tmp_path / "c.pt",
        SMALL | {"num_classes": 3} | overrides,
        conditional=True,
        diffusion={"timesteps": 50, "schedule": "cosine"},
    )
    assert run(f"--export_diffusers {tmp_path / 'out'} --model_path {tmp_path / 'c.pt'}", tmp_path) == 0
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out/unet").eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t, labels = torch.tensor([0, 10, 25, 49]), torch.tensor([0, 1, 2, 3])  # 3: the null label
    with torch.no_grad():
        expected = ours(x, t, labels)
        error = (theirs(x, t, class_labels=labels).sample - expected).abs().max().item()
    assert error < TOLERANCE * expected.abs().max().item(), error
    scheduler = json.loads((tmp_path / "out/scheduler/scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["num_train_timesteps"], scheduler["prediction_type"]) == (
        "squaredcos_cap_v2",
        50,
        "epsilon",
    )
    assert json.loads((tmp_path / "out/ddpm_tool.json").read_text())["null_label"] == 3


@pytest.mark.parametrize(
    "schedule,timesteps,prediction_type", [("sigmoid", 100, "v"), ("linear", 12, "x0")]
)  # 12: betas clipped, as trained_betas
def test_export_then_import_is_the_same_checkpoint(tmp_path, schedule, timesteps, prediction_type):
    ours = random_checkpoint(
        tmp_path / "c.pt",
        SMALL | {"num_classes": 3},
        conditional=True,
        diffusion={
            "timesteps": timesteps,
            "schedule": schedule,
            "prediction_type": prediction_type,
            "variance": "fixed_large",
        },
    )
    assert run(f"--export_diffusers {tmp_path / 'out'} --model_path {tmp_path / 'c.pt'}", tmp_path) == 0
    assert run(f"--import_diffusers {tmp_path / 'out'} --model_path {tmp_path / 'back.pt'}", tmp_path) == 0
    before, after = load_checkpoint(tmp_path / "c.pt"), load_checkpoint(tmp_path / "back.pt")
    for key in ("model_config", "diffusion", "data", "conditional"):
        assert after[key] == before[key], key
    assert all(torch.equal(after["ema"][key], value) for key, value in ours.state_dict().items())


# The samplers against diffusers' schedulers, and diffusers' pipelines on an exported folder


def analytic_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth stand-in for a network: depends on x and t, so that errors in either show."""
    return torch.tanh(x) * (0.5 + t / 2000) + 0.1 * torch.sin(3 * x)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ancestral_chain_matches_ddpm_scheduler_step_for_step(variance, steps):
    """Same x_T, same noise, same eps: every step of the tool's ancestral chain equals DDPMScheduler's, on the full
    chain and on a respaced one (the exported timestep_spacing="linspace" gives the tool's timesteps)."""
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type=variance,
        clip_sample=True,
        timestep_spacing="linspace",
    )
    scheduler.set_timesteps(steps)
    diffusion = Diffusion(1000, "linear", variance=variance)
    relative = (scheduler.alphas_cumprod / diffusion.alphas_cumprod - 1).abs().max().item()
    assert relative < 2e-5, relative  # float32 cumprod (diffusers) against the float64 one rounded to float32 (ours)
    scheduler.alphas_cumprod = diffusion.alphas_cumprod.clone()  # so that what follows compares the steps alone
    sampler = AncestralSampler(diffusion)
    timesteps = sampler.timesteps(steps)
    assert scheduler.timesteps.tolist() == timesteps
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    our_noise, their_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    worst = 0.0
    for i, t in enumerate(timesteps):  # both step from the same x_t, then the chain goes on from ours
        eps = analytic_eps(x, t)
        theirs = scheduler.step(eps, t, x, generator=their_noise).prev_sample
        x = sampler.step(x, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, eps, our_noise)
        worst = max(worst, (x - theirs).abs().max().item())
    assert worst < TOLERANCE, worst


def test_respaced_ddim_step_matches_ddim_scheduler():
    """DDIMScheduler steps from t to t - T // N; the tool's DDIM step given those timesteps lands where it does. The
    tool's DDIM takes its direction from the clipped x_0, as DDIMScheduler does with use_clipped_model_output=True."""
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True
    )
    scheduler.set_timesteps(20)
    sampler = DDIMSampler(Diffusion(1000, "linear"), eta=0.0)
    ours = theirs = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps.tolist():
        ours = sampler.step(ours, t, t - 50 if t >= 50 else -1, analytic_eps(ours, t), None)
        theirs = scheduler.step(analytic_eps(theirs, t), t, theirs, eta=0.0, use_clipped_model_output=True).prev_sample
        assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(
    "sampler,steps,lower_order_final",
    [
        (DPMSolverPlusPlus3M, 10, False),
        (DPMSolverPlusPlus3M, 20, True),
        (DPMSolverPlusPlus2M, 10, True),
    ],
)
def test_dpm_solver_samples_the_images_of_dpm_solver_multistep_scheduler(schedule, sampler, steps, lower_order_final):
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order 2 or 3, eps prediction) given the tool's
    log-SNR-spaced timesteps samples the tool's dpm++2m / dpm++3m images from the same start noise with the same
    predictor: first, second, then third order, and the x_0 prediction on the final step (final_sigmas_type="zero").
    Its lower_order_final (second order into t = 0, below 15 steps only) is off at 10 steps and, its default, on at 20,
    where it changes nothing. The predictor is the exact eps of a pixelwise Gaussian mixture (images stay in range;
    no clipping on either side: diffusers has none, thresholding is off). Measured: at most 5.4e-7 apart (float32)."""
    diffusion = Diffusion(1000, schedule)
    predictor = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    ours = sampler(diffusion, clip_denoised=False)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
        solver_order=ours.order,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        prediction_type="epsilon",
        thresholding=False,
        lower_order_final=lower_order_final,
        final_sigmas_type="zero",
    )
    scheduler.alphas_cumprod = (
        diffusion.alphas_cumprod.clone()
    )  # its sigmas from the same alpha_bar: the steps alone are compared
    timesteps = ours.timesteps(steps)
    scheduler.set_timesteps(timesteps=timesteps)
    ours_x = theirs_x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(timesteps):
        t_batch = torch.full((4,), t)
        ours_x = ours.step(
            ours_x, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, predictor(ours_x, t_batch, None)
        )
        theirs_x = scheduler.step(predictor(theirs_x, t_batch, None), t, theirs_x).prev_sample
    assert ours_x.abs().max() < 1 and ours_x.std() > 0.4, "images in range, not collapsed"
    error = (ours_x - theirs_x).abs().max().item()
    assert error < 1e-5, error


def their_sigmas(diffusion: Diffusion, timesteps: list[int]) -> torch.Tensor:
    """diffusers' sigmas (sqrt((1 - alpha_bar) / alpha_bar)) at the tool's timesteps, then 0
    (final_sigmas_type="zero")."""
    alpha_bar = diffusion.alphas_cumprod[timesteps]
    return torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1)])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps,spacing", [(5, None), (10, None), (20, None), (12, "edm")])
def test_unipc_samples_the_images_of_unipc_multistep_scheduler(schedule, steps, spacing):
    """UniPCMultistepScheduler(solver_order=3, predict_x0=True, solver_type="bh2", its defaults otherwise: corrector on
    every step, lower_order_final) given the tool's timesteps and their sigmas samples the tool's unipc images from the
    same start noise with the same predictor (as for DPM-Solver++ above; its set_timesteps takes no list of timesteps,
    so they are set on it). Measured: at most 6.2e-6 apart at 5 steps, 1e-6 from 10, on either spacing (float32)."""
    from ddpm_solvers import UniPC

    diffusion = Diffusion(1000, schedule)
    predictor = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    ours = UniPC(diffusion, clip_denoised=False, spacing=spacing)
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
        solver_order=3,
        predict_x0=True,
        solver_type="bh2",
        prediction_type="epsilon",
        thresholding=False,
        final_sigmas_type="zero",
    )
    timesteps = ours.timesteps(steps)
    scheduler.set_timesteps(steps)
    scheduler.timesteps, scheduler.sigmas = torch.tensor(timesteps), their_sigmas(diffusion, timesteps)
    ours_x = theirs_x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(timesteps):
        t_batch = torch.full((4,), t)
        ours_x = ours.step(
            ours_x, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, predictor(ours_x, t_batch, None)
        )
        theirs_x = scheduler.step(predictor(theirs_x, t_batch, None), t, theirs_x).prev_sample
    assert ours_x.abs().max() < 1.3 and ours_x.std() > 0.4, (
        "images about in range (5 steps overshoot to 1.2), not collapsed"
    )
    error = (ours_x - theirs_x).abs().max().item()
    assert error < 2e-5, error


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_sde_solver_samples_the_images_of_sde_dpm_solver_with_the_same_noise(schedule, steps):
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, midpoint) given the tool's
    log-SNR-spaced timesteps and, at every step, the noise tensor that the tool's dpm++2m-sde draws from its generator
    (passed as variance_noise) samples the tool's images from the same start noise. The final step returns the x_0
    prediction on both sides (final_sigmas_type="zero"). Measured: at most 3e-5 apart (float32 rounding that the
    mixture's sharp modes amplify along a noisy path)."""
    from ddpm_solvers import DPMSolverPlusPlus2MSDE

    diffusion = Diffusion(1000, schedule)
    predictor = GaussianMixtureNoise(diffusion, [-0.5, 0.5], std=0.1)
    ours = DPMSolverPlusPlus2MSDE(diffusion, clip_denoised=False)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
        solver_order=2,
        algorithm_type="sde-dpmsolver++",
        solver_type="midpoint",
        prediction_type="epsilon",
        thresholding=False,
        final_sigmas_type="zero",
    )
    scheduler.alphas_cumprod = diffusion.alphas_cumprod.clone()
    timesteps = ours.timesteps(steps)
    scheduler.set_timesteps(timesteps=timesteps)
    ours_noise, their_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ours_x = theirs_x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(timesteps):
        t_batch = torch.full((4,), t)
        noise = torch.randn(4, 3, 8, 8, generator=their_noise)  # what the tool's step draws from its generator
        ours_x = ours.step(
            ours_x, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, predictor(ours_x, t_batch, None), ours_noise
        )
        theirs_x = scheduler.step(predictor(theirs_x, t_batch, None), t, theirs_x, variance_noise=noise).prev_sample
    assert ours_x.abs().max() < 1 and ours_x.std() > 0.4, "images in range, not collapsed"
    error = (ours_x - theirs_x).abs().max().item()
    assert error < 1e-4, error
    other = DPMSolverPlusPlus2MSDE(diffusion, clip_denoised=False)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(timesteps):
        x = other.step(
            x,
            t,
            timesteps[i + 1] if i + 1 < len(timesteps) else -1,
            predictor(x, torch.full((4,), t), None),
            torch.Generator().manual_seed(2 + i),
        )
    assert (x - theirs_x).abs().max() > 0.1, "other noise, other images: the noise is what was pinned"


@pytest.fixture(scope="module")
def exported_ddpm_shaped(tmp_path_factory) -> tuple[Path, UNet]:
    """The `ddpm` preset's layout (4 levels, 1-2-2-2, 2 blocks, attention one level down, scale-shift) at a quarter of
    its widths and 16x16, with 21 timesteps (the fewest whose linear betas stay below 0.999) and fixed_large: small
    enough to sample whole chains on a CPU."""
    root = tmp_path_factory.mktemp("pipelines")
    model_config = dict(in_channels=3, image_size=16, **preset_config("ddpm", 16) | {"base_dim": 32, "dropout": 0.0})
    ours = random_checkpoint(
        root / "ckpt.pt",
        model_config,
        conditional=False,
        diffusion={"timesteps": 21, "schedule": "linear", "variance": "fixed_large"},
    )
    assert run(f"--export_diffusers {root / 'out'} --model_path {root / 'ckpt.pt'}", root) == 0
    return root / "out", ours


def test_ddim_pipeline_samples_the_tools_ddim_images(exported_ddpm_shaped):
    """diffusers' DDIMPipeline on the exported folder (DDIMScheduler from its scheduler config): the same images as
    the tool's DDIM from the same start noise, within 1e-4. Over all T steps, where both run on the same timesteps
    (DDIMScheduler steps to t - T // N whatever its spacing), with the direction from the clipped x_0."""
    folder, ours = exported_ddpm_shaped
    pipeline = diffusers.DDIMPipeline.from_pretrained(folder)
    pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        batch_size=2,
        generator=torch.Generator().manual_seed(5),
        eta=0.0,
        num_inference_steps=21,
        use_clipped_model_output=True,
        output_type="np",
    ).images
    diffusion = Diffusion(21, "linear", variance="fixed_large")
    with torch.no_grad():
        images = diffusion.sample(
            ours, (2, 3, 16, 16), sampling(sampler="ddim", steps=21), generator=torch.Generator().manual_seed(5)
        )
    error = np.abs((images.permute(0, 2, 3, 1).numpy() + 1) / 2 - theirs).max()
    assert error < 1e-4, error


def test_ddpm_pipeline_samples_the_tools_ancestral_images(exported_ddpm_shaped):
    """DDPMPipeline.from_pretrained on the exported folder, respaced to 7 of 21 steps, fixed_large, with the same seed:
    the tool's ancestral images (the same start noise and step noise, drawn in the same order)."""
    folder, ours = exported_ddpm_shaped
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=7, output_type="np"
    ).images
    with torch.no_grad():
        images = Diffusion(21, "linear", variance="fixed_large").sample(
            ours, (2, 3, 16, 16), sampling(sampler="ddpm", steps=7), generator=torch.Generator().manual_seed(3)
        )
    error = np.abs((images.permute(0, 2, 3, 1).numpy() + 1) / 2 - theirs).max()
    assert error < 1e-4, error


# What cannot be converted: one line, exit code 2, nothing written


def write_folder(folder: Path, config: dict, weights: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")


SMALL_UNET2D = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "attention_head_dim": None,
}


@pytest.mark.parametrize(
    "setup,command,message",
    [
        (lambda d: None, "--import_diffusers missing --model_path m.pt", "diffusers folder not found"),
        (lambda d: (d / "empty").mkdir(), "--import_diffusers empty --model_path m.pt", "no config.json"),
        (
            lambda d: write_folder(d / "vae", {"_class_name": "AutoencoderKL"}),
            "--import_diffusers vae --model_path m.pt",
            "not a UNet2DModel",
        ),
        (
            lambda d: write_folder(d / "nw", SMALL_UNET2D, weights=False),
            "--import_diffusers nw --model_path m.pt",
            "no weights in",
        ),
        (
            lambda d: write_folder(d / "flip", SMALL_UNET2D | {"flip_sin_to_cos": True}),
            "--import_diffusers flip --model_path m.pt",
            "flip_sin_to_cos=True is not supported",
        ),
        (
            lambda d: write_folder(d / "learned", SMALL_UNET2D | {"out_channels": 6}),
            "--import_diffusers learned --model_path m.pt",
            "learned variances",
        ),
        (
            lambda d: write_folder(d / "cond", SMALL_UNET2D | {"num_class_embeds": 10}),
            "--import_diffusers cond --model_path m.pt",
            "null label",
        ),
        (
            lambda d: write_folder(d / "bad", SMALL_UNET2D),
            "--import_diffusers bad --model_path m.pt",
            "not a readable weights file",
        ),
    ],
)
def test_bad_import_gives_one_line(tmp_path, capsys, setup, command, message):
    setup(tmp_path)
    assert run(command, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(base_dim=16, dim_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,)),
            "multiple of 32",
        ),  # the tiny preset's widths
        (dict(num_heads=2, attn_resolutions=(16, 8)), "multi-head attention needs one width"),
    ],
)
def test_unexportable_models_are_refused_in_one_line(tmp_path, capsys, overrides, message):
    random_checkpoint(
        tmp_path / "c.pt", SMALL | overrides, conditional=False, diffusion={"timesteps": 20, "schedule": "linear"}
    )
    assert run(f"--export_diffusers {tmp_path / 'out'} --model_path {tmp_path / 'c.pt'}", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
