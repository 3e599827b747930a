"""ddpm_sampling: the one path from a checkpoint to images (generate), --inference end to end on the shared tiny runs,
the classes to sample, and autoguidance's guide model."""

import json

import numpy as np
import pytest
import torch

import ddpm_sampling
from conftest import REPO
from conftest import run_cli as run
from ddpm_checkpoint import load_checkpoint, load_model
from ddpm_config import SamplingConfig, UsageError
from ddpm_kinds import kind_of_model
from ddpm_outputs import to_uint8
from ddpm_runtime import Runtime
from ddpm_sampling import NOISE_SEED_STRIDE, every_class_in_turn, parse_sample_classes

NAMES = ["airplane", "Automobile", "bird"]


def test_sample_classes_by_index_or_name_repeated_in_order_to_the_number_of_samples():
    assert parse_sample_classes("0,2", NAMES, 5) == [0, 2, 0, 2, 0]
    assert parse_sample_classes(" bird , automobile,AIRPLANE", NAMES, 4) == [2, 1, 0, 2], (
        "names in any case, spaces ignored"
    )
    assert parse_sample_classes("2,,1", NAMES, 2) == [2, 1], "empty parts are skipped"
    assert parse_sample_classes("0,1,2", NAMES, 2) == [0, 1], "cut to the number of samples"


@pytest.mark.parametrize(
    "text,message",
    [
        ("3", "class 3 is out of range: this model has classes 0-2"),
        ("-1", "class -1 is out of range"),
        ("0,unicorn", "unknown class 'unicorn'; this model's classes are: airplane, Automobile, bird"),
    ],
)
def test_a_class_out_of_range_or_unknown_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message):
        parse_sample_classes(text, NAMES, 4)


def test_without_classes_every_class_comes_in_turn():
    assert every_class_in_turn(3, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert every_class_in_turn(None, 7) is None, "an unconditional model takes no labels"


@pytest.mark.parametrize("batch_size,world_sizes", [(2, (2, 3, 4)), (5, (2,)), (3, (2,))])
def test_generate_gives_the_same_images_for_any_share_of_the_batches(
    trained_runs, monkeypatch, batch_size, world_sizes
):
    """Batch b draws its noise from seed + b * NOISE_SEED_STRIDE, so however the batches are shared out over the ranks
    (contiguous shares in rank order, a rank may get none), each rank samples exactly the rows a single process samples
    for its batches; the first batch is Diffusion.sample with a generator seeded with the seed."""
    loaded = load_model(trained_runs / "models/C/ckpt.pt", "cpu")
    settings = SamplingConfig(sampler="ddim", steps=3, guidance_scale=2.0)
    labels = ddpm_sampling.every_class_in_turn(len(loaded.description.class_names), 5)
    generate = lambda rank, world_size: ddpm_sampling.generate_from(  # noqa: E731
        loaded,
        kind_of_model(loaded.description),
        5,
        labels,
        settings,
        seed=5,
        batch_size=batch_size,
        runtime=Runtime(torch.device("cpu"), rank, world_size),
    )
    everything = generate(0, 1)
    assert everything.shape == (5, 16, 16, 3) and everything.dtype == torch.uint8
    first = loaded.diffusion.sample(
        loaded.model,
        (min(batch_size, 5), 3, 16, 16),
        settings,
        labels=labels[:batch_size],
        null_label=loaded.model.null_label,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(everything[:batch_size], to_uint8(first))
    monkeypatch.setattr(ddpm_sampling, "gather_rows", lambda rows, runtime: rows)  # each rank's own share, not gathered
    if batch_size == 2:  # 3 batches of 2, 2, 1 on 2 ranks: rank 0 samples batch 0, rank 1 batches 1 and 2 (samples 2-4)
        assert torch.equal(generate(0, 2), everything[:2])
        assert torch.equal(generate(1, 2), everything[2:])
    for world_size in world_sizes:
        shares = [generate(rank, world_size) for rank in range(world_size)]
        assert torch.equal(torch.cat(shares), everything), world_size
    assert NOISE_SEED_STRIDE > 1_000_000, "seeds of neighbouring runs' batches do not collide"


# --inference on the shared tiny runs


def test_inference_unconditional_writes_grid_pngs_and_npz(trained_workspace):
    assert (
        run(
            "--inference --model_path models/U/ckpt.pt --num_samples 5 --save_dir inf_U --sampler ddim "
            "--sampling_steps 5",
            trained_workspace,
        )
        == 0
    )
    out = trained_workspace / "inf_U"
    assert (out / "grid.png").exists()
    assert len(list((out / "samples").glob("*.png"))) == 5
    npz = np.load(out / "samples.npz")
    assert npz["images"].dtype == np.uint8 and npz["images"].shape == (5, 16, 16, 3)
    assert npz["labels"].tolist() == [-1] * 5


def test_inference_repeats_classes_in_order_and_accepts_names(trained_workspace):
    assert (
        run(
            '--inference --conditional --model_path models/C/ckpt.pt --num_samples 5 --sample_classes "0,1,2" '
            "--save_dir inf_C --sampling_steps 5 --sampler ddim",
            trained_workspace,
        )
        == 0
    )
    assert np.load(trained_workspace / "inf_C/samples.npz")["labels"].tolist() == [0, 1, 2, 0, 1]
    names = load_checkpoint(trained_workspace / "models/C/ckpt.pt")["data"]["class_names"]
    assert (
        run(
            f'--inference --model_path models/C/ckpt.pt --num_samples 2 --sample_classes "{names[3]},{names[7]}" '
            "--save_dir inf_names --sampling_steps 5",
            trained_workspace,
        )
        == 0
    )
    assert np.load(trained_workspace / "inf_names/samples.npz")["labels"].tolist() == [3, 7]


def test_conditional_inference_without_classes_cycles_through_all(trained_workspace):
    assert (
        run(
            "--inference --model_path models/C/ckpt.pt --num_samples 12 --save_dir inf_all --sampling_steps 3 "
            "--sampler ddim",
            trained_workspace,
        )
        == 0
    )
    assert np.load(trained_workspace / "inf_all/samples.npz")["labels"].tolist() == list(range(10)) + [0, 1]


def test_same_seed_same_images_other_seed_other_images(trained_workspace):
    common = "--inference --model_path models/C/ckpt.pt --num_samples 3 --guidance_scale 2 --sampling_steps 5"
    assert run(f"{common} --seed 1 --save_dir s1", trained_workspace) == 0
    assert run(f"{common} --seed 1 --save_dir s1b", trained_workspace) == 0
    assert run(f"{common} --seed 2 --save_dir s2", trained_workspace) == 0
    first, again, other = (np.load(trained_workspace / name / "samples.npz")["images"] for name in ("s1", "s1b", "s2"))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_readme_python_example_samples_what_inference_writes(trained_workspace, capsys):
    """The Python block of docs/python.md, run on the conditional workspace model, gives the pixels of --inference."""
    readme = (REPO / "docs/python.md").read_text()
    block = (
        readme.split("```python\n", 1)[1]
        .split("```", 1)[0]
        .replace("models/synthetic_tiny/ckpt.pt", str(trained_workspace / "models/C/ckpt.pt"))
    )
    namespace = {}
    exec(block, namespace)
    assert (
        run(
            "--inference --model_path models/C/ckpt.pt --num_samples 8 --batch_size 8 --sampler dpm++2m "
            "--sampling_steps 20 --guidance_scale 3 --save_dir readme_inf --device cpu",
            trained_workspace,
        )
        == 0
    )
    assert np.array_equal(namespace["images"].numpy(), np.load(trained_workspace / "readme_inf/samples.npz")["images"])


# Autoguidance: --guide_model


def test_an_unconditional_model_is_autoguided_through_the_cli_and_a_mismatched_guide_is_refused(
    trained_workspace, capsys
):
    """The shared runs: U, unconditional, guided by itself (w = 1) and by its EMA weights file (w = 3, raw weights); C,
    conditional, refused as U's guide."""
    sample = "--inference --model_path models/U/ckpt.pt --num_samples 3 --sampler ddim --sampling_steps 4 --device cpu"
    assert run(f"{sample} --save_dir plain", trained_workspace) == 0
    assert run(f"{sample} --save_dir auto --guide_model models/U/ckpt.pt --guidance_scale 1", trained_workspace) == 0
    plain, auto = (np.load(trained_workspace / f"{name}/samples.npz")["arr_0"] for name in ("plain", "auto"))
    assert np.array_equal(plain, auto), "w = 1: the main model alone"
    assert (
        run(
            f"{sample} --save_dir pushed --guide_model models/U/ckpt.safetensors --guidance_scale 3 --no_ema",
            trained_workspace,
        )
        == 0
    )
    pushed = np.load(trained_workspace / "pushed/samples.npz")["arr_0"]
    record = json.loads((trained_workspace / "pushed/samples.json").read_text())
    assert record["guidance"] == "autoguidance" and record["guidance_scale"] == 3
    assert not np.array_equal(plain, pushed), "raw weights guided by the EMA: other images"
    capsys.readouterr()
    assert run(f"{sample} --save_dir refused --guide_model models/C/ckpt.pt", trained_workspace) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not match" in error and "classes" in error
    assert not (trained_workspace / "refused").exists()
