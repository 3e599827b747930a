"""ddpm_logging: the step counters kept on the device, the metrics JSON lines, TensorBoard, the loss history."""

import json

import pytest
import torch

from conftest import TINY, run_cli
from ddpm_logging import RunLog, StepCounters, save_history


def test_step_counters_take_what_was_recorded_since_the_last_take_and_restart():
    counters = StepCounters(torch.device("cpu"))
    for loss, skip in ((0.5, False), (0.25, False), (float("nan"), True), (float("inf"), True), (1.0, False)):
        counters.record(torch.tensor(loss), torch.tensor(skip))
    assert counters.take() == (1.75, 3, 2, 2), (
        "(loss sum and count of the applied steps, skipped, longest run of skips)"
    )
    assert counters.take() == (0.0, 0, 0, 0), "the counters restart at each take"
    counters.record(torch.tensor(float("nan")), torch.tensor(True))
    assert counters.take() == (0.0, 0, 1, 1)
    counters.record(torch.tensor(float("nan")), torch.tensor(True))
    assert counters.take() == (0.0, 0, 1, 2), "a run of skips continues across takes"
    counters.record(torch.tensor(2.0), torch.tensor(False))
    assert counters.take() == (2.0, 1, 0, 2), "the run of skips that ended since the last take, counted whole"
    assert counters.take() == (0.0, 0, 0, 0), "and then gone"


@pytest.mark.parametrize("logger", ["jsonl", "tensorboard"])
def test_a_disabled_run_log_writes_nothing(tmp_path, logger):
    """Ranks other than 0 get a disabled RunLog: no metrics file, no TensorBoard folder, whatever --logger says."""
    log = RunLog(tmp_path / "out", "R", logger, enabled=False)
    log.write({"kind": "step", "step": 1, "train_loss": 0.5})
    log.images(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 1)
    log.close()
    assert not (tmp_path / "out").exists()


def test_an_enabled_run_log_appends_one_json_line_per_record(tmp_path):
    log = RunLog(tmp_path / "out", "R", "jsonl", enabled=True)
    log.write({"kind": "step", "step": 1, "train_loss": 0.5})
    log.write({"kind": "epoch", "step": 18, "val_loss": 0.25})
    log.close()
    assert [json.loads(line) for line in (tmp_path / "out/metrics_R.jsonl").read_text().splitlines()] == [
        {"kind": "step", "step": 1, "train_loss": 0.5},
        {"kind": "epoch", "step": 18, "val_loss": 0.25},
    ]
    assert log.path == tmp_path / "out/metrics_R.jsonl" and log.tensorboard is None


def test_save_history_writes_the_json_and_its_plot(tmp_path):
    history = {
        "epochs": [0, 1],
        "steps": [18, 36],
        "train_loss": [0.3, 0.2],
        "val_loss": [0.35, 0.25],
        "test_loss": [0.36, 0.26],
    }
    save_history(history, tmp_path / "out", "R")
    assert json.loads((tmp_path / "out/loss_history_R.json").read_text()) == history
    assert (tmp_path / "out/loss_curve_R.png").read_bytes().startswith(b"\x89PNG")


def test_tensorboard_logger_writes_losses_lr_throughput_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_cli(f"{TINY} --max_steps 2 --logger tensorboard --run_name tb --save_dir out_tb", tmp_path) == 0
    events = EventAccumulator(str(tmp_path / "out_tb/tensorboard/tb"), size_guidance={"images": 0}).Reload()
    assert {"step/train_loss", "step/lr", "step/images_per_s", "epoch/val_loss", "epoch/test_loss"} <= set(
        events.Tags()["scalars"]
    )
    assert [event.step for event in events.Scalars("step/train_loss")] == [1, 2]
    assert events.Tags()["images"] == ["samples"]
    assert (tmp_path / "out_tb/metrics_tb.jsonl").is_file(), "the JSON lines are still written"
