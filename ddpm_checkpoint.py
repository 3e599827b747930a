"""Checkpoints: the one writer and the one reader of the tool's files, the model description, the objects of a training
checkpoint (CheckpointIO), the checkpoint a resumed run starts from, one process per run folder."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ddpm_config import RunConfig, UsageError, current_settings, first_line, fixed_settings
from ddpm_data import DataSplits
from ddpm_diffusion import Diffusion
from ddpm_model import network_from_config
from ddpm_outputs import TEMPORARY_SUFFIX, atomic_write

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
        raise UsageError(
            f"{path} holds objects other than tensors and plain values; refusing to load it "
            f"(only checkpoints written by this tool are accepted)"
        ) from error
    except Exception as error:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt)") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint written by this tool")
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what killed checkpoint writers left in a run's folder: `<checkpoint>.tmp` (and
    `<weights>.safetensors.tmp`), and the `<checkpoint>.tmp-<pid>` of earlier versions of the tool whose process is
    gone. Nothing else is touched."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"*.pt{TEMPORARY_SUFFIX}*"):
        suffix = leftover.name.rsplit(".pt", 1)[1]
        pid = suffix[len(TEMPORARY_SUFFIX) + 1 :]
        if suffix == TEMPORARY_SUFFIX or (
            suffix.startswith(TEMPORARY_SUFFIX + "-") and pid.isdigit() and not _process_alive(int(pid))
        ):
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
        return cls(
            model_config=model.config,
            diffusion={
                "timesteps": diffusion.timesteps,
                "schedule": diffusion.schedule,
                "prediction_type": diffusion.prediction_type,
                "variance": diffusion.variance,
            },
            data={
                "dataset": config.data.dataset,
                "class_names": list(data.class_names),
                "image_size": data.image_size,
                "channels": data.channels,
            },
            conditional=config.model.conditional,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, path: str | os.PathLike) -> ModelDescription:
        if "model_config" not in checkpoint or "model" not in checkpoint:
            raise UsageError(f"{path} has no model in it")
        return cls(
            checkpoint["model_config"], checkpoint["diffusion"], checkpoint["data"], bool(checkpoint["conditional"])
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.data["channels"], self.data["image_size"], self.data["image_size"]

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


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True, compile: bool = False
) -> LoadedModel:
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
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.run_dir / LOCK_NAME, "a+")
        except OSError as error:
            raise UsageError(f"cannot use the run folder {self.run_dir}: {error.strerror or error}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            raise UsageError(
                f"{self.run_dir} is being trained by another process{f' (pid {holder})' if holder else ''}: "
                f"wait for it to end, or choose another --run_name"
            ) from None
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
            raise UsageError(
                f"cannot resume {path}: it was trained with --{flag} {saved}, not {now[flag]} "
                f"(flags that define the model, data or diffusion must stay the same)"
            )


def load_resume_checkpoint(config: RunConfig, rename_damaged: bool = True) -> Optional[tuple[Path, dict]]:
    """The checkpoint a training command continues from, checked against the configuration, or None for a new run.

    One command line serves the whole life of a run (as EDM2's and k-diffusion's): with --save_model (or a bare
    --resume) it continues the run folder's latest state when there is one (`latest_checkpoint`) and starts the run
    when there is none; a bare --resume insists on continuing, --resume PATH continues that checkpoint."""
    train = config.train
    run_dir = Path(train.models_dir) / train.run_name
    if train.resume not in (None, "auto"):
        path, checkpoint = Path(train.resume), load_checkpoint(train.resume)
    elif train.save_model or train.resume == "auto":
        found = latest_checkpoint(run_dir, rename_damaged)
        if found is None and train.resume == "auto":
            raise UsageError(
                f"--resume: no checkpoint in {run_dir}/ to continue (check --run_name and --models_dir; "
                f"without --resume the same command starts the run)"
            )
        if found is None:
            return None
        path, checkpoint = found
    else:
        return None
    if "train_state" not in checkpoint:
        raise UsageError(f"cannot resume {path}: it holds weights only, not a training state")
    check_resume_compatible(checkpoint["config"], config, path)
    return path, checkpoint


def latest_checkpoint(run_dir: Path, rename_damaged: bool = True) -> Optional[tuple[Path, dict]]:
    """The run folder's ckpt.pt, or where it cannot be read (a full disk, a copy cut short) the newest readable
    snapshot ckpt_epochNNNN.pt, said in one line with the damaged file renamed to ckpt.pt.damaged (never deleted;
    `rename_damaged` is false on the ranks that do not hold the run folder); None when the folder has neither.
    Refused in one line when nothing in it can be read."""
    last = run_dir / "ckpt.pt"
    snapshots = sorted(run_dir.glob("ckpt_epoch*.pt"), reverse=True)
    if not last.exists() and not snapshots:
        return None
    damaged = None
    for path in ([last] if last.exists() else []) + snapshots:
        try:
            checkpoint = load_checkpoint(path)
        except UsageError as error:
            damaged = damaged or (path, error)
            continue
        if damaged is not None and damaged[0] == last and rename_damaged:
            kept = _free_name(last.with_name(last.name + ".damaged"))
            last.rename(kept)
            print(
                f"{last} cannot be read ({damaged[1]}); continuing from {path}, the newest readable snapshot; the "
                f"damaged file is kept as {kept}",
                file=sys.stderr,
            )
        return path, checkpoint
    raise UsageError(f"no readable checkpoint in {run_dir}/: {damaged[1]}")


def _free_name(path: Path) -> Path:
    """`path`, or path.1, path.2, ... where it is taken."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def prune_snapshots(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` per-epoch snapshots (ckpt.pt and best.pt are separate and always kept)."""
    for old in sorted(run_dir.glob("ckpt_epoch*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
        weights_path(old).unlink(missing_ok=True)


class CheckpointIO:
    """The objects a training checkpoint holds, by name (the example is EDM2's CheckpointIO): their state dicts go into
    one file, with the model's description and whatever plain values the caller adds, and come back out of it. It
    knows the objects, not the loop: what to restore, and what a resumed run does differently, is the loop's."""

    def __init__(self, **objects: Any):
        self.objects = objects  # name -> an object with state_dict() and load_state_dict(), or None (saved as None)

    def save(self, path: Path, description: ModelDescription, values: dict) -> None:
        """`path` (save_checkpoint) with every object's state dict, the description and `values`."""
        states = {name: None if item is None else item.state_dict() for name, item in self.objects.items()}
        save_checkpoint(description.to_dict() | states | values, path)

    def load(self, checkpoint: dict) -> None:
        """Load every object whose state the checkpoint holds (an object it has no state for is left as it is)."""
        for name, item in self.objects.items():
            if item is not None and checkpoint.get(name) is not None:
                item.load_state_dict(checkpoint[name])
