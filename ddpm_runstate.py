"""Where a training run is and where it is going, in plain values: its position (TrainState, as a checkpoint restores
it), the steps it plans from there, the share of an epoch its losses may cost, and the global batch a resumed run
keeps. The training loop (ddpm_train) decides with these; nothing here touches a network or a file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ddpm_config import RunConfig, TrainConfig, UsageError
from ddpm_runtime import Runtime

if TYPE_CHECKING:
    from ddpm_kinds import SampleKind

EVAL_BUDGET = 0.05  # the per-epoch validation and test losses take at most this share of an epoch's training time
MIN_EVAL_EXAMPLES = 32  # ... but are never taken on fewer examples per split than this (or the whole split)


def empty_history() -> dict:
    """The loss history: one entry per epoch (`epochs` counts from 0; a last epoch cut short by --max_steps has its
    entry too, at its step), with the mean training loss of the epoch and the validation and test losses on the fixed
    subsets (`eval_examples`), and the kind's figures (ddpm_kinds); `full` lists the losses on the whole splits, at the
    end and at --eval_every; `quality`, where the run records a quality curve, its points (ddpm_quality)."""
    return {
        "epochs": [],
        "steps": [],
        "train_loss": [],
        "val_loss": [],
        "test_loss": [],
        "lr": [],
        "eval_examples": [],
        "full": [],
    }


@dataclass
class TrainState:
    """Where a run is, in plain values, so that it can be saved and restored exactly."""

    step: int = 0
    epoch: int = 0  # epochs completed
    epoch_position: int = 0  # examples of the current epoch already used
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    nonfinite_skipped: int = 0
    best_val_loss: float = math.inf
    history: dict = field(default_factory=empty_history)
    progression: list = field(default_factory=list)  # (label, samples) rows of the progression picture
    quality_due: Optional[int] = (
        None  # images seen at which the next point of the quality curve is due (None: the first)
    )
    best_quality: float = math.inf  # the lowest figure of the quality curve so far (best_fid.pt)


def restored_state(checkpoint: Optional[dict]) -> TrainState:
    """The checkpoint's TrainState (a fresh one without a checkpoint). What the saved run wrote only because it ended
    there (the entry of an epoch it cut short, its losses on the full splits) is dropped: the resumed run writes it
    again when it gets there, so a resumed history equals a straight run's."""
    if checkpoint is None:
        return TrainState()
    state = TrainState(**copy.deepcopy(checkpoint["train_state"]))  # the checkpoint dict stays as it was read
    history = empty_history() | state.history
    for key in ("eval_examples",):  # what a checkpoint of an earlier version did not record per entry
        history[key] = history[key] or [None] * len(history["epochs"])
    if state.epoch_position > 0 and history["steps"] and history["steps"][-1] == state.step:
        for key, values in history.items():
            if key not in ("full", "quality"):
                values.pop()
    history["full"] = [entry for entry in history["full"] if not (entry["step"] == state.step and entry["at"] == "end")]
    state.history = history
    return state


def steps_to_go(epochs: int, state: TrainState, steps_per_epoch: int, examples_per_step: int) -> int:
    """Optimizer steps left until `epochs` are done, from the position in the data order. Counted afresh
    because a run resumed with another number of processes takes steps of another size than it saved."""
    if state.epoch >= epochs:
        return 0
    rest_of_epoch = (steps_per_epoch * examples_per_step - state.epoch_position) // examples_per_step
    return rest_of_epoch + (epochs - state.epoch - 1) * steps_per_epoch


def evaluation_subset_size(epoch_examples: int) -> int:
    """Examples per split of the per-epoch validation and test losses: a forward pass costs about a third of a
    training step per image, so 2 splits x n examples stay within EVAL_BUDGET of an epoch when n = 1.5 x budget x
    epoch; at least MIN_EVAL_EXAMPLES (capped at the split's size where it is used)."""
    return max(MIN_EVAL_EXAMPLES, math.floor(3 * EVAL_BUDGET * epoch_examples / 2))


def plan_steps(
    train: TrainConfig, examples: int, kind: SampleKind, runtime: Runtime, state: TrainState
) -> tuple[int, int, int]:
    """(examples per optimizer step, steps per epoch, the step the run ends at) for a run that is at `state`."""
    examples_per_step = train.batch_size * runtime.world_size * train.grad_accum
    steps_per_epoch = examples // examples_per_step
    if steps_per_epoch == 0:
        raise UsageError(
            f"the training set has {examples} {kind.noun}, fewer than one optimizer step needs "
            f"(--batch_size {train.batch_size} x --grad_accum {train.grad_accum} x {runtime.world_size} processes)"
        )
    total_steps = train.max_steps or state.step + steps_to_go(train.epochs, state, steps_per_epoch, examples_per_step)
    return examples_per_step, steps_per_epoch, total_steps


def keep_global_batch(config: RunConfig, checkpoint: dict, runtime: Runtime, path: Path) -> RunConfig:
    """A resumed run keeps the global batch it was saved with (--batch_size x --grad_accum x processes) whatever the
    number of processes now, so that its learning rate, schedule and EMA (all counted in optimizer steps) mean what
    they meant: --grad_accum is derived to make up the difference, and said; refused in one line where it cannot."""
    train, saved_world_size = config.train, saved_processes(checkpoint)
    saved_config = checkpoint["config"].get(
        "train", checkpoint["config"]
    )  # version 2, or the first version's flat flags
    saved = checkpoint.get("runtime", {}).get("global_batch") or (
        saved_config.get("batch_size", train.batch_size) * saved_config.get("grad_accum", 1) * saved_world_size
    )
    per_micro_batch = train.batch_size * runtime.world_size
    if saved == per_micro_batch * train.grad_accum:
        return config
    if saved % per_micro_batch:
        raise UsageError(
            f"cannot continue {path} with {runtime.world_size} processes of --batch_size {train.batch_size}: its "
            f"global batch of {saved} is not a multiple of {per_micro_batch} (choose a --batch_size that divides it)"
        )
    if runtime.is_main:
        print(
            f"global batch {saved} kept: --grad_accum {saved // per_micro_batch} with {runtime.world_size} processes "
            f"of --batch_size {train.batch_size} (the run was saved by {saved_world_size})"
        )
    return replace(config, train=replace(train, grad_accum=saved // per_micro_batch))


def saved_processes(checkpoint: dict) -> int:
    """The number of processes that saved a checkpoint (checkpoints of the first version: in their flat config)."""
    return checkpoint.get("runtime", {}).get("world_size", checkpoint["config"].get("world_size", 1))
