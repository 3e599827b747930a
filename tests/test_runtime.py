"""ddpm_runtime in one process: seeds, the runtime of a single process, shares of the work, autocast, signals.
Several processes (gather_rows, check_replicas_identical, a signal to one rank) are in test_distributed.py."""

import random
import signal

import numpy as np
import pytest
import torch

from ddpm_runtime import (
    Runtime,
    StopRequest,
    autocast_dtype,
    gather_rows,
    maybe_no_sync,
    seed_everything,
    setup_runtime,
    shard,
    unwrap,
)


def test_seed_everything_reproduces_torch_numpy_and_python():
    def draw():
        return torch.randn(3).tolist(), np.random.rand(3).tolist(), random.random()

    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first


def test_without_torchrun_the_runtime_is_one_main_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runtime = setup_runtime("cpu")
    assert (runtime.device, runtime.rank, runtime.world_size) == (torch.device("cpu"), 0, 1)
    assert runtime.is_main and not runtime.data_on_device, "the CPU keeps the data where it is"
    assert not Runtime(torch.device("cpu"), rank=1, world_size=2).is_main


@pytest.mark.parametrize("count,world_size", [(10, 1), (10, 3), (3, 4), (0, 2), (7, 7)])
def test_shard_gives_each_rank_a_contiguous_share_differing_by_at_most_one(count, world_size):
    shares = [shard(count, Runtime(torch.device("cpu"), rank, world_size)) for rank in range(world_size)]
    assert [index for share in shares for index in share] == list(range(count)), "in rank order, each index once"
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_process_gathers_its_own_rows_and_plain_modules_need_no_unwrapping():
    rows = torch.arange(6).view(3, 2)
    assert gather_rows(rows, Runtime(torch.device("cpu"))) is rows
    module = torch.nn.Linear(2, 2)
    assert unwrap(module) is module
    with maybe_no_sync(module, sync=False):  # a no-op context outside DistributedDataParallel
        pass


def test_autocast_dtype_of_each_amp_setting():
    cpu = torch.device("cpu")
    assert autocast_dtype("none", cpu) is None and autocast_dtype("auto", cpu) is None, (
        "auto: full precision on the CPU"
    )
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp16", cpu) == torch.float16


@pytest.mark.parametrize("name, status", [("SIGTERM", 75), ("SIGUSR1", 75), ("SIGINT", 130)])
def test_a_signal_becomes_a_stop_request_and_the_handlers_are_restored(name, status):
    """SIGUSR1 (SLURM's advance warning) stops like SIGTERM, with the status a job script requeues on."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with StopRequest(Runtime(torch.device("cpu"))) as stop:
        assert stop.poll() == (False, False) and stop.poll(save_due=True) == (False, True)
        signal.raise_signal(getattr(signal, name))  # handled: the process goes on, and stops after its step
        assert stop.poll() == (True, False) and stop.signal_name == name and stop.exit_status == status
    assert {sig: signal.getsignal(sig) for sig in before} == before
