"""ddpm_config: the dataclasses are the one home of the defaults (the parser takes them from there), the training
objective of new and resumed runs, the settings a resume must keep (from both stored versions), the training grids'
sampler."""

import json
from dataclasses import fields

import torch

import ddpm_main
from conftest import REPO
from ddpm_config import (
    CONFIG_SECTIONS,
    CONFIG_VERSION,
    FIRST_DEFAULTS,
    FIXED_ON_RESUME,
    TRAINING_GRID_SAMPLER,
    TRAINING_GRID_STEPS,
    ConfigFlag,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    TrainConfig,
    config_flags,
    current_settings,
    fixed_settings,
    with_objective,
)
from ddpm_model import preset_config

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sampling": SamplingConfig,
}
SHARED_FLAGS = {
    "--amp": [("train", "amp"), ("sampling", "amp")],
    "--variance": [("diffusion", "variance"), ("sampling", "variance")],
}


def test_every_field_has_its_flag_and_every_config_flag_its_field():
    """config_flags reads the flag of every field of every section back from its declaration (ddpm_config.option), and
    build_parser adds each one; only --amp and --variance serve two fields, declared (with help) by the first."""
    assert CONFIG_SECTIONS == SECTIONS
    declared = [(flag.section, flag.name) for flag in config_flags()]
    assert declared == [
        (section, field.name) for section, config_class in SECTIONS.items() for field in fields(config_class)
    ]
    parser = ddpm_main.build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    by_flag = {}
    for flag in config_flags():
        assert flag.flag in known, f"{flag.section}.{flag.name}: {flag.flag} is not a flag of the parser"
        by_flag.setdefault(flag.flag, []).append(flag)
    assert {
        name: [(f.section, f.name) for f in each] for name, each in by_flag.items() if len(each) > 1
    } == SHARED_FLAGS
    for flag, (first, *others) in ((name, by_flag[name]) for name in SHARED_FLAGS):
        assert first.help and not any(other.help for other in others), f"{flag}: its help is declared once"
    assert all(each[0].help for each in by_flag.values()), "every flag has its help"
    assert "--no_hflip" in known and "--no_ema" in known and "--model_size" in known and "--sampling_steps" in known


def test_the_parsers_defaults_are_the_dataclasses_defaults():
    """No flag given: a new training run gets every dataclass's defaults (the training grids their fast sampler), and
    --inference SamplingConfig's."""
    args = ddpm_main.build_parser().parse_args([])
    new_run = with_objective(ddpm_main.run_config(args), None)
    assert new_run == RunConfig(sampling=SamplingConfig.for_training_grids(DiffusionConfig.timesteps))
    assert ddpm_main.sampling_config(args) == SamplingConfig()
    assert ddpm_main.run_config(args).diffusion.prediction_type is None, (
        "not given: left to with_objective (a resumed run's)"
    )
    assert args.hflip is None and args.eta is None and args.sampler is None, "None: not given"


def given_value(flag: ConfigFlag) -> tuple[list[str], object]:
    """Command-line words that give `flag` a value other than its field's default, and the value the field gets."""
    if flag.kind is bool and not flag.nullable:
        return [flag.flag], not flag.default
    if flag.kind is bool:
        return [flag.flag], True
    if flag.choices is not None:
        choice = next(choice for choice in flag.choices if choice != flag.default)
        return [flag.flag, str(choice)], choice
    if flag.kind is int:
        return [flag.flag, str((flag.default or 0) + 7)], (flag.default or 0) + 7
    if flag.kind is float:
        return [flag.flag, str((flag.default or 0) + 0.25)], (flag.default or 0) + 0.25
    if flag.kind == tuple[int, ...]:
        return [flag.flag, "1,2"], (1, 2)
    if flag.kind == tuple[float, float]:
        return [flag.flag, "0.5,2"], (0.5, 2.0)
    return [flag.flag, "given"], "given"


def configs(words: list[str]) -> dict[str, object]:
    """Each section as the flags `words` make it: the training run's, and the sampling of --inference."""
    args = ddpm_main.build_parser().parse_args(words)
    return {**vars(ddpm_main.run_config(args)), "sampling": ddpm_main.sampling_config(args)}


def changed_fields(words: list[str]) -> dict[tuple[str, str], object]:
    before, after = configs([]), configs(words)
    return {
        (section, field.name): getattr(after[section], field.name)
        for section, config_class in SECTIONS.items()
        for field in fields(config_class)
        if getattr(after[section], field.name) != getattr(before[section], field.name)
    }


def test_run_config_sets_each_field_from_its_flag_and_nothing_else():
    """Each flag, given a value other than the default, changes exactly its field (both fields of --amp and --variance)
    to that value; --no_hflip, --no_ema and a --resume without a value included."""
    first_declared = {}
    for each in config_flags():
        first_declared.setdefault(each.flag, each)
    for flag in first_declared.values():
        words, value = given_value(flag)
        targets = SHARED_FLAGS.get(flag.flag, [(flag.section, flag.name)])
        assert changed_fields(words) == dict.fromkeys(targets, value), words
    assert changed_fields(["--no_hflip"]) == {("data", "hflip"): False}
    assert changed_fields(["--resume"]) == {("train", "resume"): "auto"}


def test_the_training_grids_take_the_sampling_flags():
    config = ddpm_main.run_config(
        ddpm_main.build_parser().parse_args("--sampler ddim --eta 0.5 --guidance_interval 0.5,80".split())
    )
    assert (config.sampling.sampler, config.sampling.steps, config.sampling.eta, config.sampling.guidance_interval) == (
        "ddim",
        None,
        0.5,
        (0.5, 80.0),
    ), "a chosen sampler keeps its own default steps"
    grids = ddpm_main.run_config(ddpm_main.build_parser().parse_args(["--sampling_steps", "9"])).sampling
    assert (grids.sampler, grids.steps) == (TRAINING_GRID_SAMPLER, 9)


# The training objective: new runs get DiffusionConfig's, resumed runs keep their own


def config_with(**diffusion) -> RunConfig:
    return RunConfig(diffusion=DiffusionConfig(**{"prediction_type": None, "snr_gamma": None} | diffusion))


def test_a_new_run_gets_the_diffusion_configs_objective():
    chosen = with_objective(config_with(), None).diffusion
    assert (
        (chosen.prediction_type, chosen.snr_gamma)
        == (DiffusionConfig.prediction_type, DiffusionConfig.snr_gamma)
        == ("v", 5.0)
    )
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
    assert (
        (kept.prediction_type, kept.snr_gamma)
        == (FIRST_DEFAULTS["prediction_type"], FIRST_DEFAULTS["snr_gamma"])
        == ("eps", 0.0)
    )


# What a resume must keep


def test_fixed_settings_of_a_version_2_config_by_flag_name():
    config = RunConfig(
        data=DataConfig(dataset="mnist", image_size=28),
        model=ModelConfig(preset="tiny", dim_mults=(1, 2)),
        diffusion=DiffusionConfig(timesteps=30, schedule="cosine"),
    )
    saved = json.loads(json.dumps(config.to_dict()))  # as any reader may hand it back: tuples as lists
    settings = fixed_settings(saved)
    assert set(settings) == set(FIXED_ON_RESUME)
    assert settings["dataset"] == "mnist" and settings["model_size"] == "tiny" and settings["timesteps"] == 30
    assert settings["dim_mults"] == (1, 2), "lists back to tuples, so they compare with a new run's"
    assert settings == current_settings(config), "a run resumed with its own flags passes"
    del saved["data"]["val_fraction"]
    assert fixed_settings(saved)["val_fraction"] == FIRST_DEFAULTS["val_fraction"], (
        "a setting added later: what it meant then"
    )


def test_fixed_settings_of_the_first_version_flat_flags():
    saved = torch.load(REPO / "tests/data/checkpoint_v1_tiny.pt", weights_only=True)["config"]
    settings = fixed_settings(saved)
    assert (
        settings["dataset"],
        settings["image_size"],
        settings["model_size"],
        settings["base_dim"],
        settings["conditional"],
    ) == ("synthetic", 8, "tiny", 8, True)
    assert settings["prediction_type"] == "eps" and settings["val_fraction"] == 0.1, "not stored then: FIRST_DEFAULTS"
    assert set(settings) <= set(FIXED_ON_RESUME)
    flat = {"dataset": "cifar10", "timesteps": 1000}
    assert fixed_settings(flat) == {
        "dataset": "cifar10",
        "timesteps": 1000,
        "prediction_type": "eps",
        "val_fraction": 0.1,
        "mlp_width": 128,
        "mlp_depth": 3,
    }, "what was not stored and has no first default is not compared"


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
    assert (chosen.sampler, chosen.steps, chosen.guidance_scale) == ("ddpm", None, 2.0), (
        "a chosen sampler keeps its own default steps"
    )
    assert chosen.resolved_steps(1000) == 1000 and SamplingConfig(sampler="ddim").resolved_steps(1000) == 50
    assert grids.resolved_steps(1000) == 20


# The stored form and the model's keyword arguments


def test_to_dict_is_versioned_and_plain():
    stored = RunConfig().to_dict()
    assert stored["version"] == CONFIG_VERSION == 2 and set(stored) == {"version", *SECTIONS}
    assert stored["train"]["lr"] == TrainConfig.lr and stored["sampling"]["sampler"] == SamplingConfig.sampler


def test_model_config_lays_its_overrides_over_the_preset():
    assert ModelConfig(preset="small").unet_kwargs(16) == preset_config("small", 16)
    kwargs = ModelConfig(
        preset="small", base_dim=8, dim_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0
    ).unet_kwargs(16)
    assert kwargs == preset_config("small", 16) | {
        "base_dim": 8,
        "dim_mults": (1, 2),
        "num_res_blocks": 1,
        "attn_resolutions": (8,),
        "dropout": 0.0,
    }, "an override of 0.0 still overrides"
