"""Checkpoints: the one writer and the one reader of the tool's files, the model description, resume."""
from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ddpm_config import RunConfig, UsageError, current_settings, first_line, fixed_settings
from ddpm_data import DataSplits
from ddpm_diffusion import Diffusion
from ddpm_model import network_from_config
from ddpm_outputs import TEMPORARY_SUFFIX, atomic_write
from ddpm_runtime import Runtime, seed_everything, unwrap

if TYPE_CHECKING:
    from ddpm_train import TrainingRun

CHECKPOINT_FORMAT = "ddpm-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Save atomically; the file is tagged with the checkpoint format so load_checkpoint can recognise it."""
    tagged = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(tagged, f))


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a saved checkpoint atomically (cheaper than serialising the same state again), and its weights file."""
    for source_file, target in ((Path(source), Path(path)), (weights_path(source), weights_path(path))):
        if source_file.is_file():
            with open(source_file, "rb") as f:
                atomic_write(target, lambda out: shutil.copyfileobj(f, out))


def weights_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where the sampling weights of a checkpoint go: ckpt.pt -> ckpt.safetensors."""
    return Path(checkpoint_path).with_suffix(".safetensors")


def save_weights(state_dict: dict[str, torch.Tensor], description: dict, path: str | os.PathLike) -> None:
    """The sampling weights alone, as safetensors (no optimizer state: a tenth of a training checkpoint), with what
    --inference needs (load_checkpoint's keys model_config, diffusion, data, conditional, ...) as JSON metadata."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "description": json.dumps(description)}
    atomic_write(path, lambda f: f.write(save(tensors, metadata)))


def _load_weights(path: Path) -> dict:
    """save_weights' file as a checkpoint dict whose weights are its "ema" (and "model")."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise UsageError(f"{path} is not a readable safetensors file ({first_line(error)})") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a weights file written by this tool (no description of the model in it)")
    return {**json.loads(metadata["description"]), "model": weights, "ema": weights}


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (weights_only=True: no code is ever unpickled), or the weights
    file of save_weights (.safetensors)."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if Path(path).suffix == ".safetensors":
        return _load_weights(Path(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch reports both forbidden classes ("Unsupported global", "unsupported GLOBAL os.system", "... was not an
        # allowed global") and garbage bytes ("Unsupported operand") as UnpicklingError
        if not re.search(r"unsupported global|not an allowed global", str(error), re.IGNORECASE):
            raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt)") from error
        raise UsageError(f"{path} holds objects other than tensors and plain values; refusing to load it "
                         f"(only checkpoints written by this tool are accepted)") from error
    except Exception as error:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt)") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint written by this tool")
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what killed checkpoint writers left in a run's folder: `<checkpoint>.tmp` (and `<weights>.safetensors.tmp`), and the
    `<checkpoint>.tmp-<pid>` of earlier versions of the tool whose process is gone. Nothing else is touched."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"*.pt{TEMPORARY_SUFFIX}*"):
        suffix = leftover.name.rsplit(".pt", 1)[1]
        pid = suffix[len(TEMPORARY_SUFFIX) + 1:]
        if suffix == TEMPORARY_SUFFIX or (suffix.startswith(TEMPORARY_SUFFIX + "-") and pid.isdigit() and not _process_alive(int(pid))):
            leftover.unlink(missing_ok=True)
    for leftover in folder.glob(f"*.safetensors{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ModelDescription:
    """What a checkpoint says about its network, its diffusion and its data: all that sampling needs. Training, the
    diffusers import and the weights files write it (`to_dict`, the checkpoint's top-level keys), `load_model` reads
    it back (`from_checkpoint`)."""

    model_config: dict  # the network's keyword arguments (UNet.config or MLPDenoiser.config)
    diffusion: dict  # Diffusion's keyword arguments: timesteps, schedule, prediction_type, variance
    data: dict  # dataset, class_names, image_size (None: points), channels (of points: coordinates)
    conditional: bool

    @classmethod
    def of_run(cls, model: torch.nn.Module, config: RunConfig, data: DataSplits) -> ModelDescription:
        """The description of a training run's network."""
        diffusion = config.diffusion
        return cls(model_config=model.config,
                   diffusion={"timesteps": diffusion.timesteps, "schedule": diffusion.schedule,
                              "prediction_type": diffusion.prediction_type, "variance": diffusion.variance},
                   data={"dataset": config.data.dataset, "class_names": list(data.class_names), "image_size": data.image_size,
                         "channels": data.channels},
                   conditional=config.model.conditional)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, path: str | os.PathLike) -> ModelDescription:
        if "model_config" not in checkpoint or "model" not in checkpoint:
            raise UsageError(f"{path} has no model in it")
        return cls(checkpoint["model_config"], checkpoint["diffusion"], checkpoint["data"], bool(checkpoint["conditional"]))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data["channels"], self.data["image_size"], self.data["image_size"]

    @property
    def points(self) -> bool:
        """A model of 2D points (ddpm_data.POINT_DATASETS): its data has no image size."""
        return self.data["image_size"] is None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of an image model, (D,) of a point model."""
        return (self.data["channels"],) if self.points else self.image_shape

    @property
    def class_names(self) -> list[str]:
        return self.data["class_names"]

    @property
    def num_classes(self) -> Optional[int]:
        """The classes of a conditional model; None for an unconditional one."""
        return len(self.class_names) if self.conditional else None


def build_network(description: ModelDescription) -> torch.nn.Module:
    """The (untrained) network a description stands for."""
    return network_from_config(description.model_config)


@dataclass
class LoadedModel:
    """A checkpoint's network (EMA or raw weights) and diffusion, ready to sample."""

    model: torch.nn.Module  # UNet or MLPDenoiser
    diffusion: Diffusion
    description: ModelDescription
    checkpoint: dict
    path: Path
    use_ema: bool

    @property
    def step(self) -> Optional[int]:
        return self.checkpoint.get("train_state", {}).get("step")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True, compile: bool = False) -> LoadedModel:
    """The network of a checkpoint or weights file, with the EMA weights unless use_ema is false or it has none, and its
    diffusion, on `device` in eval mode; with `compile`, torch.compile'd in place (compiled at the first batch). The one
    place where a file becomes a network: sampling, evaluation, the diffusers export and the scripts all come here."""
    checkpoint = load_checkpoint(path)
    description = ModelDescription.from_checkpoint(checkpoint, path)
    use_ema = use_ema and checkpoint.get("ema") is not None
    model = build_network(description)
    model.load_state_dict(checkpoint["ema"] if use_ema else checkpoint["model"])
    model = model.to(device).eval()
    if compile:
        model.compile()
    diffusion = Diffusion(**description.diffusion).to(device)
    return LoadedModel(model, diffusion, description, checkpoint, Path(path), use_ema)


def rng_state() -> dict:
    """Every random state a step draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def empty_history() -> dict:
    """The loss history: one entry per epoch (`epochs` counts from 0; a last epoch cut short by --max_steps has its
    entry too, at its step), with the mean training loss of the epoch and the validation and test losses on the fixed
    subsets (`eval_examples`); `full` lists the losses on the whole splits, at the end and at --eval_every."""
    return {"epochs": [], "steps": [], "train_loss": [], "val_loss": [], "test_loss": [], "lr": [], "eval_examples": [], "full": []}


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
    progression: list = field(default_factory=list)  # (label, uint8 images) rows of the progression image


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
            if key != "full":
                values.pop()
    history["full"] = [entry for entry in history["full"] if not (entry["step"] == state.step and entry["at"] == "end")]
    state.history = history
    return state


def gather_rng_states(runtime: Runtime) -> Optional[list[dict]]:
    """Every rank's random states (each rank draws its own noise and timesteps), so that a run resumed
    with as many processes continues every rank's stream exactly; None for a single process."""
    if runtime.world_size == 1:
        return None
    states = [None] * runtime.world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


LOCK_NAME = ".lock"


class RunLock:
    """One process per run folder: an exclusive OS lock (flock) on <run folder>/.lock, held while the run trains. The
    kernel releases it when the process ends, however it ends, so a crash leaves nothing to clean up; the file itself
    stays (it holds the last holder's pid) and is harmless. A second process, the same command started twice or a
    re-queued job whose first copy still runs, is refused in one line before it reads or writes anything."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.file: Optional[Any] = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            raise UsageError(f"{self.run_dir} is being trained by another process{f' (pid {holder})' if holder else ''}: "
                             f"wait for it to end, or choose another --run_name") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock


def check_resume_compatible(saved_config: dict, config: RunConfig, path: Path) -> None:
    """Settings that define the model, the data or the diffusion must be those the checkpoint was trained with."""
    now = current_settings(config)
    for flag, saved in fixed_settings(saved_config).items():
        if flag in now and saved != now[flag]:
            raise UsageError(f"cannot resume {path}: it was trained with --{flag} {saved}, not {now[flag]} "
                             f"(flags that define the model, data or diffusion must stay the same)")


def load_resume_checkpoint(config: RunConfig) -> Optional[tuple[Path, dict]]:
    """The checkpoint --resume names (default: the run's ckpt.pt), checked against the configuration; None
    without --resume. A new run refuses to overwrite an existing run's checkpoint."""
    train = config.train
    last_path = Path(train.models_dir) / train.run_name / "ckpt.pt"
    if train.resume is None:
        if last_path.exists() and train.save_model:
            raise UsageError(f"{last_path} exists: pass --resume to continue that run, or choose another --run_name")
        return None
    path = last_path if train.resume == "auto" else Path(train.resume)
    checkpoint = load_checkpoint(path)
    if "train_state" not in checkpoint:
        raise UsageError(f"cannot resume {path}: it holds weights only, not a training state")
    check_resume_compatible(checkpoint["config"], config, path)
    return path, checkpoint


def prune_snapshots(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` per-epoch snapshots (ckpt.pt and best.pt are separate and always kept)."""
    for old in sorted(run_dir.glob("ckpt_epoch*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
        weights_path(old).unlink(missing_ok=True)


def restore_run(run: TrainingRun, checkpoint: dict) -> None:
    """Load weights, EMA, optimizer, LR schedule, grad scaler and random states from a checkpoint. The
    learning rate may change on resume (--lr); the random streams continue when the number of processes is
    the one that saved, and start afresh per rank otherwise."""
    run.model.load_state_dict(checkpoint["model"])
    if run.ema is not None and checkpoint["ema"] is not None:
        run.ema.module.load_state_dict(checkpoint["ema"])
        run.ema.num_updates.fill_(checkpoint["ema_num_updates"])
    if run.phema is not None and checkpoint.get("phema") is not None:
        run.phema.load_state_dict(checkpoint["phema"])
    elif run.phema is not None:  # its profiles would start here, not at step 0: a post-hoc EMA only of runs that tracked it
        run.phema = None
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    lr = run.config.train.lr
    for group in run.optimizer.param_groups:
        group["initial_lr"] = lr
    run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
    runtime = run.runtime
    saved_world_size = checkpoint.get("runtime", {}).get("world_size", checkpoint["config"].get("world_size", 1))
    if runtime.world_size == saved_world_size:
        restore_rng_state(checkpoint["rng"] if runtime.world_size == 1 else checkpoint["rng_per_rank"][runtime.rank])
    else:
        seed_everything((run.config.train.seed + runtime.rank + 7_919 * run.state.step) % 2**32)


def checkpoint_state(run: TrainingRun) -> dict:
    """Everything a resumed run needs, with the model's description (ddpm_checkpoint.ModelDescription)."""
    model = unwrap(run.model)
    return {
        **ModelDescription.of_run(model, run.config, run.data).to_dict(),
        "model": model.state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "ema_num_updates": int(run.ema.num_updates) if run.ema is not None else 0,
        "phema": run.phema.state_dict() if run.phema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "train_state": asdict(run.state),
        "config": run.config.to_dict(),
        "runtime": {"world_size": run.runtime.world_size},
        "rng": rng_state(),
    }


def save_run_checkpoint(run: TrainingRun, path: Path) -> None:
    """Every rank calls this (the random states are gathered), after the step counters were read into the state; rank 0 writes the checkpoint and, next to it, the
    sampling weights alone (the EMA, or the raw weights without one) as safetensors (weights_path)."""
    rng_per_rank = gather_rng_states(run.runtime)
    if run.runtime.is_main:
        save_checkpoint(checkpoint_state(run) | {"rng_per_rank": rng_per_rank}, path)
        model = run.ema.module if run.ema is not None else unwrap(run.model)
        description = ModelDescription.of_run(unwrap(run.model), run.config, run.data).to_dict() | {
            "train_state": {"step": run.state.step}, "weights": "ema" if run.ema is not None else "raw"}
        save_weights(model.state_dict(), description, weights_path(path))
