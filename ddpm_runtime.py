"""Processes: the device, torchrun's ranks and their collectives, seeds, autocast, signals."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Runtime:
    """This process's place in a run: its device, and its rank among `world_size` processes (torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    control_group: Any = None  # a gloo group, for small CPU-side agreements that must not wait for the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_on_device(self) -> bool:
        """Whether the training set is moved to the device once (GPUs), rather than each batch."""
        return self.device.type == "cuda"


def setup_runtime(device: str, timeout: timedelta | None = None) -> Runtime:
    """One process, or one of WORLD_SIZE processes started by torchrun: NCCL between GPUs (each process
    on the GPU of its LOCAL_RANK), gloo between CPU processes. `timeout` bounds how long a collective
    waits for the slowest rank (PyTorch's default when None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world_size == 1:
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout or dist.constants.default_pg_timeout))
    # Workers that torchrun --max-restarts starts again share its store with the ones it stopped: keys of their own,
    # per restart, so that no process group reads the addresses of processes that are gone.
    store = dist.PrefixStore(f"restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    return Runtime(device, rank, world_size, dist.new_group(backend="gloo", timeout=timeout))


def shard(count: int, runtime: Runtime) -> range:
    """This rank's contiguous share of range(count); shares differ in size by at most one."""
    return range(count * runtime.rank // runtime.world_size, count * (runtime.rank + 1) // runtime.world_size)


def gather_rows(rows: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Every rank's `rows` (any number, the same trailing shape) concatenated in rank order, on every rank."""
    if runtime.world_size == 1:
        return rows
    local = rows.to(runtime.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=runtime.device) for _ in range(runtime.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=runtime.device))
    sizes = [int(size) for size in sizes]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=runtime.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(runtime.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(rows.device)


def seed_everything(seed: int) -> None:
    """Seed Python's random, NumPy and torch (torch.manual_seed also seeds every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_tf32() -> None:
    """TensorFloat-32 for float32 matmuls on Ampere and later GPUs: several times the float32 rate, with a
    10-bit mantissa that training does not notice (PyTorch notes, "TensorFloat-32 on Ampere"); cuDNN
    convolutions already use it by default."""
    torch.set_float32_matmul_precision("high")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device` (None: full precision); auto is bf16 on GPUs that support it."""
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def maybe_no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def check_replicas_identical(modules: list[torch.nn.Module], runtime: Runtime) -> None:
    """Raise unless every rank holds bit-identical parameters. DDP keeps replicas equal by construction
    (same initial broadcast, same averaged gradients, same optimizer); this catches what would silently
    break that (a rank-dependent code path, a step skipped on one rank only) before it spoils a long run."""
    sums = torch.stack([p.double().sum() for module in modules for p in module.parameters()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        differing = int((low != high).sum())
        raise RuntimeError(
            f"rank {runtime.rank}: {differing} parameter tensors differ across the {runtime.world_size} processes "
            "after training"
        )


EXIT_PREEMPTED = (
    75  # EX_TEMPFAIL of sysexits.h: stopped by SIGTERM or SIGUSR1 with ckpt.pt written; the same command continues
)
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # SIGUSR1: SLURM's advance warning (--signal=USR1@120)


class StopRequest:
    """Turns SIGINT, SIGTERM and SIGUSR1 into a request to stop after the current step (a second one kills), and
    carries rank 0's decision that ckpt.pt is due (its clock, --save_every_minutes) to every rank.

    With several processes all ranks must act after the same step, even when only one got the signal. Their flags
    are summed by an all-reduce on the CPU (runtime.control_group, gloo) that is started at one step and read at the
    next: a stop or a save lands one step later, and the check never waits for the GPU.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.signal_name: Optional[str] = None
        self.previous = {}
        self.flags: Optional[torch.Tensor] = None
        self.pending = None

    def __enter__(self) -> "StopRequest":
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        if self.pending is not None:
            self.pending.wait()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self) -> int:
        """130 for Ctrl-C; EXIT_PREEMPTED for a scheduler's SIGTERM or SIGUSR1, or a signal to another rank."""
        return 130 if self.signal_name == "SIGINT" else EXIT_PREEMPTED

    def poll(self, save_due: bool = False) -> tuple[bool, bool]:
        """(stop, save): whether this process or any rank was asked to stop, and whether ckpt.pt is due by rank 0's
        `save_due`; now for a single process, as of the previous step with several. Every rank calls this once per
        step."""
        asked = self.signal_name is not None
        if self.runtime.world_size == 1:
            return asked, save_due
        agreed = (False, False)
        if self.pending is not None:
            self.pending.wait()
            stop, save = self.flags.tolist()
            agreed = (stop > 0, save > 0)
        self.flags = torch.tensor([float(asked), float(save_due and self.runtime.is_main)])
        self.pending = dist.all_reduce(self.flags, group=self.runtime.control_group, async_op=True)
        return agreed


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


def restore_rng_state(state: dict) -> None:
    """The random states of `rng_state`, back in place."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(runtime: Runtime) -> Optional[list[dict]]:
    """Every rank's random states (each rank draws its own noise and timesteps), on every rank; None for one process."""
    if runtime.world_size == 1:
        return None
    states = [None] * runtime.world_size
    dist.all_gather_object(states, rng_state())
    return states
