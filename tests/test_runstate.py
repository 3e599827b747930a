"""ddpm_runstate: where a run is (as a checkpoint restores it), the steps it plans, the global batch a resumed run
keeps."""

import pytest
import torch

from ddpm_config import RunConfig, TrainConfig, UsageError
from ddpm_runstate import MIN_EVAL_EXAMPLES, evaluation_subset_size, keep_global_batch, restored_state
from ddpm_runtime import Runtime


def test_the_evaluation_subset_follows_the_run():
    assert (
        evaluation_subset_size(45_000) == 3375
    )  # CIFAR-10: 2 x 3,375 forward passes ~ 5% of an epoch's 45,000 steps' work
    assert evaluation_subset_size(1344) == 100  # the benchmark's digits
    assert evaluation_subset_size(64) == MIN_EVAL_EXAMPLES


def test_restored_state_drops_what_the_saved_run_wrote_only_because_it_ended_there():
    """A run stopped mid-epoch at step 5 wrote an entry for its partial epoch and the whole-split losses at its end; the
    resumed run writes both again when it gets there, so they go. The entry of a finished epoch and a whole-split loss
    taken at --eval_every stay."""

    def saved(step: int, epoch_position: int, entries: int, full: list[dict]) -> dict:
        history = {
            "epochs": [0, 1][:entries],
            "steps": [3, 5][:entries],
            "train_loss": [0.5, 0.4][:entries],
            "val_loss": [0.6, 0.5][:entries],
            "test_loss": [0.7, 0.6][:entries],
            "lr": [1e-3, 1e-3][:entries],
            "eval_examples": [32, 32][:entries],
            "full": full,
        }
        return {"train_state": {"step": step, "epoch": 1, "epoch_position": epoch_position, "history": history}}

    every, end_3, end_5 = (
        {"step": step, "at": at, "val_loss": 0.5} for step, at in ((3, "every"), (3, "end"), (5, "end"))
    )
    state = restored_state(saved(5, 32, 2, [every, end_5]))
    assert (state.step, state.epoch, state.epoch_position) == (5, 1, 32)
    assert state.history["epochs"] == [0] and state.history["steps"] == [3] and state.history["val_loss"] == [0.6]
    assert state.history["full"] == [every]
    at_epoch_end = restored_state(saved(3, 0, 1, [every, end_3]))
    assert at_epoch_end.history["epochs"] == [0] and at_epoch_end.history["train_loss"] == [0.5], (
        "a finished epoch's entry stays"
    )
    assert at_epoch_end.history["full"] == [every]
    assert restored_state(None).step == 0 and restored_state(None).history["epochs"] == []


def saved_run(batch_size: int, grad_accum: int, world_size: int, recorded: bool = True) -> dict:
    runtime = {"world_size": world_size} | ({"global_batch": batch_size * grad_accum * world_size} if recorded else {})
    return {
        "config": RunConfig(train=TrainConfig(batch_size=batch_size, grad_accum=grad_accum)).to_dict(),
        "runtime": runtime,
    }


def test_a_resumed_run_keeps_its_global_batch_with_another_number_of_processes(capsys):
    """Saved by 2 processes of 16: 1 process of 16 accumulates 2 micro-batches, 4 processes of 8 one; the count of an
    earlier checkpoint without the recorded global batch comes from its configuration."""
    config = RunConfig(train=TrainConfig(batch_size=16))
    one = keep_global_batch(config, saved_run(16, 1, 2), Runtime(torch.device("cpu")), "ckpt.pt")
    assert one.train.grad_accum == 2 and "global batch 32 kept: --grad_accum 2" in capsys.readouterr().out
    four = keep_global_batch(
        RunConfig(train=TrainConfig(batch_size=8)),
        saved_run(16, 1, 2, recorded=False),
        Runtime(torch.device("cpu"), 0, 4),
        "ckpt.pt",
    )
    assert four.train.grad_accum == 1
    same = keep_global_batch(config, saved_run(16, 1, 1), Runtime(torch.device("cpu")), "ckpt.pt")
    assert same is config and capsys.readouterr().out == ""


def test_a_global_batch_that_cannot_be_divided_is_refused_in_one_line():
    with pytest.raises(UsageError, match="its global batch of 48 is not a multiple of 32"):
        keep_global_batch(
            RunConfig(train=TrainConfig(batch_size=16)),
            saved_run(16, 3, 1),
            Runtime(torch.device("cpu"), 0, 2),
            "ckpt.pt",
        )
