"""ddpm_config: the dataclasses are the one home of the defaults (the parser takes them from there), the training
objective of new and resumed runs, the settings a resume must keep (from both stored versions), the training grids'
sampler."""
import json
from dataclasses import fields

import torch

import ddpm_main
from conftest import REPO
from ddpm_config import (CONFIG_VERSION, FIRST_DEFAULTS, FIXED_ON_RESUME, GUIDANCE_SCALE, POINT_GUIDANCE_SCALE, TRAINING_GRID_SAMPLER, TRAINING_GRID_STEPS, DataConfig,
                         DiffusionConfig, ModelConfig, RunConfig, SamplingConfig, TrainConfig, current_settings, fixed_settings,
                         with_objective)
from ddpm_model import preset_config

SECTIONS = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig, "sampling": SamplingConfig}
FLAG_OF = {("model", "preset"): "model_size", ("sampling", "steps"): "sampling_steps", ("train", "use_ema"): "no_ema",
           ("data", "use_data_cache"): "no_data_cache"}  # else the same name


def test_the_parsers_defaults_are_the_dataclasses_defaults():
    """Every field has a flag, and the flag's default is the field's: directly, or (a flag whose default is None,
    "derived") through what ddpm_main makes of it: run_config + with_objective for a new training run,
    sampling_config for --inference."""
    args = ddpm_main.build_parser().parse_args([])
    new_run = with_objective(ddpm_main.run_config(args), None)
    inference = ddpm_main.sampling_config(args)
    resolved_by = {  # where the flag says "derived", what the run is given
        ("data", "hflip"): new_run.data.hflip,  # --hflip / --no_hflip both off: the data set's default
        ("diffusion", "prediction_type"): new_run.diffusion.prediction_type,
        ("diffusion", "snr_gamma"): new_run.diffusion.snr_gamma,
        ("diffusion", "variance"): new_run.diffusion.variance,
        ("sampling", "sampler"): inference.sampler,
    }
    checked = 0
    for section, config_class in SECTIONS.items():
        defaults = config_class()
        for field in fields(config_class):
            if (section, field.name) == ("sampling", "amp"):
                continue  # one --amp for training and sampling: test_inference_gets_the_sampling_dataclass_amp
            flag = FLAG_OF.get((section, field.name), field.name)
            assert hasattr(args, flag), f"{section}.{field.name} has no flag --{flag}"
            value = getattr(args, flag)
            if (section, field.name) in (("train", "use_ema"), ("data", "use_data_cache")):
                value = not value
            if (section, field.name) in resolved_by:
                assert value in (None, False), f"--{flag} is derived, so its default is None"
                value = resolved_by[(section, field.name)]
            assert value == getattr(defaults, field.name), f"--{flag} defaults to {value!r}, {section}.{field.name} to {getattr(defaults, field.name)!r}"
            checked += 1
    assert checked == sum(len(fields(config_class)) for config_class in SECTIONS.values()) - 1, "every field but sampling.amp"
    assert args.hflip is False and args.no_hflip is False


def test_inference_gets_the_sampling_dataclass_amp():
    """The Python example of docs/python.md (SamplingConfig()) samples as --inference does: the same autocast."""
    args = ddpm_main.build_parser().parse_args(["--inference"])
    assert ddpm_main.sampling_config(args).amp == SamplingConfig().amp


def test_run_config_puts_each_flag_into_its_field():
    args = ddpm_main.build_parser().parse_args(
        "--dataset mnist --image_size 28 --no_hflip --model_size small --dim_mults 1,2 --conditional --timesteps 50 --prediction_type x0 "
        "--snr_gamma 0 --lr 1e-3 --no_ema --max_steps 7 --sampler ddim --sampling_steps 9 --guidance_interval 0.5,2 --data_cache c "
        "--no_data_cache".split())
    config = ddpm_main.run_config(args)
    assert (config.data.dataset, config.data.image_size, config.data.hflip) == ("mnist", 28, False)
    assert (config.data.data_cache, config.data.use_data_cache) == ("c", False)
    assert (config.model.preset, config.model.dim_mults, config.model.conditional) == ("small", (1, 2), True)
    assert (config.diffusion.timesteps, config.diffusion.prediction_type, config.diffusion.snr_gamma) == (50, "x0", 0.0)
    assert (config.train.lr, config.train.use_ema, config.train.max_steps) == (1e-3, False, 7)
    assert (config.sampling.sampler, config.sampling.steps, config.sampling.guidance_interval) == ("ddim", 9, (0.5, 2.0))


# The training objective: new runs get DiffusionConfig's, resumed runs keep their own


def config_with(**diffusion) -> RunConfig:
    return RunConfig(diffusion=DiffusionConfig(**{"prediction_type": None, "snr_gamma": None} | diffusion))


def test_a_new_run_gets_the_diffusion_configs_objective():
    chosen = with_objective(config_with(), None).diffusion
    assert (chosen.prediction_type, chosen.snr_gamma) == (DiffusionConfig.prediction_type, DiffusionConfig.snr_gamma) == ("v", 5.0)
    given = with_objective(config_with(prediction_type="eps", snr_gamma=0.0), None).diffusion
    assert (given.prediction_type, given.snr_gamma) == ("eps", 0.0), "given flags win"


def test_a_resumed_version_2_run_keeps_its_own_objective():
    saved = RunConfig(diffusion=DiffusionConfig(prediction_type="x0", snr_gamma=1.5)).to_dict()
    kept = with_objective(config_with(), saved).diffusion
    assert (kept.prediction_type, kept.snr_gamma) == ("x0", 1.5)
    del saved["diffusion"]["snr_gamma"]  # a version-2 checkpoint from before min-SNR weighting
    assert with_objective(config_with(), saved).diffusion.snr_gamma == FIRST_DEFAULTS["snr_gamma"] == 0.0
    assert with_objective(config_with(snr_gamma=2.0), saved).diffusion.snr_gamma == 2.0


def test_a_resumed_version_1_run_trained_ho_et_als_objective():
    """Version 1 stored the flat flags and trained eps prediction with L_simple (FIRST_DEFAULTS), whatever it says."""
    saved = torch.load(REPO / "tests/data/checkpoint_v1_tiny.pt", weights_only=True)["config"]
    assert "version" not in saved
    kept = with_objective(config_with(), saved).diffusion
    assert (kept.prediction_type, kept.snr_gamma) == (FIRST_DEFAULTS["prediction_type"], FIRST_DEFAULTS["snr_gamma"]) == ("eps", 0.0)


# What a resume must keep


def test_fixed_settings_of_a_version_2_config_by_flag_name():
    config = RunConfig(data=DataConfig(dataset="mnist", image_size=28), model=ModelConfig(preset="tiny", dim_mults=(1, 2)),
                       diffusion=DiffusionConfig(timesteps=30, schedule="cosine"))
    saved = json.loads(json.dumps(config.to_dict()))  # as any reader may hand it back: tuples as lists
    settings = fixed_settings(saved)
    assert set(settings) == set(FIXED_ON_RESUME)
    assert settings["dataset"] == "mnist" and settings["model_size"] == "tiny" and settings["timesteps"] == 30
    assert settings["dim_mults"] == (1, 2), "lists back to tuples, so they compare with a new run's"
    assert settings == current_settings(config), "a run resumed with its own flags passes"
    del saved["data"]["val_fraction"]
    assert fixed_settings(saved)["val_fraction"] == FIRST_DEFAULTS["val_fraction"], "a setting added later: what it meant then"


def test_fixed_settings_of_the_first_version_flat_flags():
    saved = torch.load(REPO / "tests/data/checkpoint_v1_tiny.pt", weights_only=True)["config"]
    settings = fixed_settings(saved)
    assert (settings["dataset"], settings["image_size"], settings["model_size"], settings["base_dim"], settings["conditional"]) == \
        ("synthetic", 8, "tiny", 8, True)
    assert settings["prediction_type"] == "eps" and settings["val_fraction"] == 0.1, "not stored then: FIRST_DEFAULTS"
    assert set(settings) <= set(FIXED_ON_RESUME)
    flat = {"dataset": "cifar10", "timesteps": 1000}
    assert fixed_settings(flat) == {"dataset": "cifar10", "timesteps": 1000, "prediction_type": "eps", "val_fraction": 0.1,
                                    "mlp_width": 128, "mlp_depth": 3}, \
        "what was not stored and has no first default is not compared"


def test_current_settings_leave_an_objective_not_given_to_the_resumed_run():
    settings = current_settings(config_with())
    assert "prediction_type" not in settings, "None: the resumed run's own"
    assert current_settings(config_with(prediction_type="v"))["prediction_type"] == "v"
    assert settings["image_size"] is None, "other settings are compared even when None"


# Sampling


def test_training_grids_sample_fast_unless_told_otherwise():
    grids = SamplingConfig.for_training_grids(1000)
    assert (grids.sampler, grids.steps) == (TRAINING_GRID_SAMPLER, TRAINING_GRID_STEPS) == ("dpm++2m", 20)
    assert SamplingConfig.for_training_grids(12).steps == 12, "never more steps than timesteps"
    assert SamplingConfig.for_training_grids(1000, steps=7).steps == 7
    chosen = SamplingConfig.for_training_grids(1000, sampler="ddpm", guidance_scale=2.0)
    assert (chosen.sampler, chosen.steps, chosen.guidance_scale) == ("ddpm", None, 2.0), "a chosen sampler keeps its own default steps"
    assert chosen.resolved_steps(1000) == 1000 and SamplingConfig(sampler="ddim").resolved_steps(1000) == 50
    assert grids.resolved_steps(1000) == 20


def test_the_guidance_scale_is_derived_from_the_kind_of_samples_unless_given():
    derived = SamplingConfig()
    assert derived.guidance_scale is None
    assert derived.derived(points=False).guidance_scale == GUIDANCE_SCALE == 1.5
    assert derived.derived(points=True).guidance_scale == POINT_GUIDANCE_SCALE == 1.0
    given = SamplingConfig(guidance_scale=2.5)
    assert given.derived(points=True) is given and given.derived(points=False).guidance_scale == 2.5


# The stored form and the model's keyword arguments


def test_to_dict_is_versioned_and_plain():
    stored = RunConfig().to_dict()
    assert stored["version"] == CONFIG_VERSION == 2 and set(stored) == {"version", *SECTIONS}
    assert stored["train"]["lr"] == TrainConfig.lr and stored["sampling"]["sampler"] == SamplingConfig.sampler


def test_model_config_lays_its_overrides_over_the_preset():
    assert ModelConfig(preset="small").unet_kwargs(16) == preset_config("small", 16)
    kwargs = ModelConfig(preset="small", base_dim=8, dim_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0).unet_kwargs(16)
    assert kwargs == preset_config("small", 16) | {"base_dim": 8, "dim_mults": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
                                                   "dropout": 0.0}, "an override of 0.0 still overrides"
