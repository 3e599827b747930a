"""ddpm_sweep: --evaluate --sweep over EMA length x guidance kind x scale x solver, resumable, and the preset it
writes."""

import json

import numpy as np
import pytest

import ddpm_main
import ddpm_sweep
from conftest import run_cli
from ddpm_sweep import Cell, cells_of, parse_samplers, sweep_metric

pytest.importorskip("torch_fidelity")
TRAIN = (
    "--dataset synthetic --image_size 8 --model_size tiny --timesteps 20 --batch_size 128 --warmup_steps 3 --lr 2e-3 "
    "--conditional --max_steps 40 --sample_every 0 --save_model --run_name S --save_dir out --device cpu"
)
SWEEP = (
    "--evaluate --sweep --model_path models/S/ckpt.pt --fid_features random-conv --fid_num_samples 20 --batch_size 20 "
    "--device cpu --sweep_ema 0.1 --guide_model models/S/posthoc_ema_0.050.safetensors --guidance_sweep 1,2 "
    "--sweep_samplers dpm++3m:3 --no_judge --save_dir sweep"
)


def test_the_sweep_evaluates_every_cell_once_ranks_them_and_inference_uses_the_best(tmp_path, capsys):
    assert run_cli(TRAIN, tmp_path) == 0
    assert ddpm_main.main(["--posthoc_ema", "0.05", "--model_path", str(tmp_path / "models/S/ckpt.pt")]) == 0
    assert run_cli(SWEEP, tmp_path) == 0
    report = json.loads((tmp_path / "sweep/sweep.json").read_text())
    cells = report["cells"]
    assert len(cells) == 2 * 2 * 2, "EMA (own, 0.1) x guidance (cfg, auto) x w (1, 2), with dpm++3m 3 steps"
    assert {(c["ema"], c["guidance"]) for c in cells} == {
        ("ema", "cfg"),
        ("ema", "auto"),
        ("0.100", "cfg"),
        ("0.100", "auto"),
    }
    assert report["metric"] == "fid" and all(np.isfinite(c["value"]) for c in cells)
    best = report["best"]
    assert best["value"] == min(c["value"] for c in cells)
    assert json.loads((tmp_path / "models/S/sampling_best.json").read_text()) == best
    assert (tmp_path / "sweep/sweep.png").stat().st_size > 0 and "| EMA | guidance |" in (
        tmp_path / "sweep/sweep.md"
    ).read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep/cells").glob("*/evaluation.json")}
    assert len(stamps) == 8
    assert run_cli(SWEEP, tmp_path) == 0, "again: every cell is on disk"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "finished cells are not recomputed"
    capsys.readouterr()
    assert (
        run_cli(
            "--inference --model_path models/S/ckpt.pt --sampling_preset best --num_samples 4 --save_dir inf "
            "--device cpu",
            tmp_path,
        )
        == 0
    )
    record = json.loads((tmp_path / "inf/samples.json").read_text())
    assert (record["sampler"], record["sampling_steps"], record["guidance_scale"]) == (
        best["sampler"],
        best["steps"],
        best["guidance_scale"],
    )
    assert record["model_path"] == best["weights"] and record["guide_model"] == best["guide_model"]
    capsys.readouterr()
    assert (
        run_cli(
            "--inference --model_path models/S/ckpt.pt --sampling_preset best --eta 0.5 --save_dir inf_eta "
            "--device cpu",
            tmp_path,
        )
        == 2
    ), "the preset's dpm++3m takes no --eta"
    assert (
        capsys.readouterr().err.strip()
        == "error: --eta works with --sampler ddim; dpm++3m, the sampler of this run, ignores it"
    )
    assert not (tmp_path / "inf_eta").exists()


def test_cells_samplers_and_the_metric():
    assert parse_samplers("dpm++2m:20, ddpm:1000") == [("dpm++2m", 20), ("ddpm", 1000)]
    assert [c.name for c in cells_of(["ema"], ["none"], [1, 2], [("ddim", 5)])] == ["ema-ema_none_w1_ddim-5"], (
        "no scale axis unguided"
    )
    assert Cell("0.100", "auto", 2.0, "ddim", 5).line == "EMA 0.100, auto, ddim 5"
    assert sweep_metric("random-conv") == ("fid", "random-conv")
    assert sweep_metric("random-conv", judged=True) == ("judge", "random-conv"), (
        "without the Inception weights, the judge ranks"
    )


@pytest.mark.parametrize(
    "command,fragments",
    [
        ("--evaluate --sweep --sweep_samplers ddim:0", ("--sweep_samplers expects SAMPLER:STEPS", "got 'ddim:0'")),
        ("--evaluate --sweep --sweep_samplers heun:5", ("--sweep_samplers expects SAMPLER:STEPS", "got 'heun:5'")),
        ("--inference --sweep_ema 0.1", ("--sweep_ema and --sweep_samplers work together with --evaluate",)),
        ("--evaluate --sampling_preset best", ("--sampling_preset is for --inference",)),
        (
            "--inference --sampling_preset best --model_path models/none/ckpt.pt",
            ("--sampling_preset best needs models/none/sampling_best.json", "run --evaluate --sweep"),
        ),
    ],
)
def test_bad_sweep_flags_are_one_line_naming_the_flag(tmp_path, capsys, command, fragments):
    """Refused with exit code 2 in one line that names the flag and, for a bad value, the value itself (a refusal
    for another reason, such as the missing --model_path, would not)."""
    assert run_cli(command, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(fragment in err for fragment in fragments), err


def test_without_the_inception_weights_the_sweep_ranks_by_the_judge(
    digits_workspace, digits_judge, monkeypatch, capsys
):
    root = digits_workspace.parent
    assert (
        run_cli(
            "--dataset folder --data_dir digits --image_size 16 --model_size tiny --timesteps 20 --batch_size 16 "
            "--warmup_steps 1 --max_steps 3 --sample_every 0 --conditional --save_model --run_name D --save_dir out_D",
            root,
        )
        == 0
    )
    monkeypatch.setattr(ddpm_sweep, "inception_weights_path", lambda: root / "no_inception_weights.pth")
    capsys.readouterr()
    assert (
        run_cli(
            "--evaluate --sweep --model_path models/D/ckpt.pt --data_dir digits --fid_num_samples 20 --batch_size 20 "
            "--guidance_sweep 1,3 --sweep_samplers ddim:2 --save_dir sweep",
            root,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        f"sweep: ranking by the judge's Frechet distance (its test accuracy {digits_judge[1].test_accuracy:.3f})"
        in printed
    )
    report = json.loads((root / "sweep/sweep.json").read_text())
    assert report["metric"] == "judge" and len(report["cells"]) == 2
    for cell in report["cells"]:
        results = json.loads((root / "sweep/cells" / cell["name"] / "evaluation.json").read_text())
        assert (
            cell["value"] == cell["judge_distance"] == results["judge"]["distance"]
            and cell["judge_floor"] == results["judge"]["floor"]
        )
    assert report["best"]["value"] == min(cell["value"] for cell in report["cells"])
    table = (root / "sweep/sweep.md").read_text()
    assert "| judge distance | class consistency | judge class accuracy | judge distance (floor) |" in table
    assert f"(the ceiling of its class accuracy): {digits_judge[1].test_accuracy:.3f}" in table
