"""Data benchmark of an image folder: the decoded cache's first and later starts, its training steps, its memory.

    python scripts/data_benchmark.py                                  # 20,000 JPEGs of 512x384, trained at 32x32
    python scripts/data_benchmark.py --count 500 --out data_bench.json

It writes --count JPEGs (smooth random colours, quality 90) into --workdir (a temporary folder unless given; kept
with --keep, and reused when it already holds them), then measures:
* the first start's decoding into the cache (ddpm_datacache.decoded_images), with 1 process and with every core;
* a later start's time until the data is ready (load_datasets on the built cache) against decoding the folder
  into memory (--no_data_cache), and, in a fresh `ddpm_main.py` process, the time until its first optimizer step;
* the training step (ddpm_data.load_batch, then the --model_size network's loss, backward and AdamW) with batches
  from the mapped cache against batches from in-memory tensors, taking turns, as medians; and load_batch alone;
* under torchrun, 2 CPU ranks that each read every image: each rank's private memory (/proc/self/smaps_rollup,
  Private_Clean + Private_Dirty) gained by the data, against the cache's size; with the cache and in memory.
It prints a table with the targets (first decode >= 1.7x the 1-process rate, a later start >= 20x faster than
decoding, step time within 5%, each rank < 10% of the data privately) and writes every figure to --out (JSON).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the tool's modules live one level up

from ddpm_config import ModelConfig  # noqa: E402
from ddpm_data import epoch_permutation, load_batch, load_datasets, split_order  # noqa: E402
from ddpm_datacache import decoded_images  # noqa: E402
from ddpm_diffusion import Diffusion  # noqa: E402
from ddpm_imagefolder import available_cores, find_images  # noqa: E402
from ddpm_model import PRESETS, network_from_config  # noqa: E402

RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from ddpm_data import load_datasets

def private_kb():
    fields = dict(line.split(":") for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    return sum(int(fields[name].split()[0]) for name in ("Private_Clean", "Private_Dirty"))

dist.init_process_group("gloo")
before = private_kb()
data = load_datasets("folder", {folder!r}, {image_size}, data_cache={cache!r}, use_data_cache={use_cache})
total = 0
for split in (data.train, data.val, data.test):  # every page of the data, as an epoch and the evaluations read them
    for start in range(0, len(split), 4096):
        total += int(split.images[start:start + 4096].sum())
dist.barrier()
figures = {{"rank": dist.get_rank(), "before_kb": before, "after_kb": private_kb(), "checksum": total}}
with open(os.path.join({work!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump(figures, f)
dist.barrier()
dist.destroy_process_group()
"""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="First and later starts, steps and memory of a folder's decoded cache."
    )
    parser.add_argument("--count", type=int, default=20_000, help="JPEGs to write")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--image_size", type=int, default=32, help="the size they are trained at")
    parser.add_argument("--model_size", default="tiny", choices=sorted(PRESETS), help="the network of the timed steps")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps of each kind")
    parser.add_argument("--workdir", default=None, help="where the JPEGs and caches go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's JPEGs and caches")
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    return parser.parse_args(argv)


def write_jpegs(folder: Path, count: int, width: int, height: int) -> None:
    """Smooth random colour fields (bilinear from 16x12 noise), which compress as photographs do."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    rng = np.random.default_rng(0)
    for index in tqdm(range(count), desc="writing JPEGs", unit="img"):
        noise = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        noise.resize((width, height), Image.BILINEAR).save(folder / f"{index:06d}.jpg", quality=90)


def time_first_starts(folder: Path, work: Path, image_size: int) -> dict:
    """The first start's decode into a new cache with 1 process, then with every core: seconds and images/s."""
    result = {"cores": available_cores()}
    for label, workers in (("one", 1), ("all", available_cores())):
        shutil.rmtree(work / f"cache_{label}", ignore_errors=True)
        started = time.perf_counter()
        source = find_images(folder)
        order, _ = split_order(len(source.train.names), False, 0)
        decoded_images(source, image_size, None, order, 0, str(work / f"cache_{label}"), True, workers)
        seconds = time.perf_counter() - started
        result[f"first_start_{label}_s"] = seconds
        result[f"first_start_{label}_images_per_s"] = len(order) / seconds
    result["decode_speedup"] = result["first_start_all_images_per_s"] / result["first_start_one_images_per_s"]
    return result


def time_later_starts(folder: Path, work: Path, image_size: int) -> dict:
    """load_datasets on the built cache (median of 3) against decoding the folder into memory on every core."""
    cached = []
    for _ in range(3):
        started = time.perf_counter()
        load_datasets("folder", folder, image_size, data_cache=str(work / "cache_all"))
        cached.append(time.perf_counter() - started)
    started = time.perf_counter()
    load_datasets("folder", folder, image_size, use_data_cache=False)
    decoding = time.perf_counter() - started
    return {
        "later_start_s": statistics.median(cached),
        "decode_in_memory_s": decoding,
        "later_start_speedup": decoding / statistics.median(cached),
    }


def time_to_first_step(folder: Path, work: Path, image_size: int, batch_size: int, cached: bool) -> float:
    """Seconds from starting `ddpm_main.py` until its metrics file holds its first optimizer step."""
    out = work / f"first_step_{'cached' if cached else 'memory'}"
    shutil.rmtree(out, ignore_errors=True)
    cache = f"--data_cache {work / 'cache_all'}" if cached else "--no_data_cache"
    command = (
        f"--dataset folder --data_dir {folder} --image_size {image_size} --model_size tiny --batch_size {batch_size} "
        f"--max_steps 100 --log_interval 1 --sample_every 0 --device cpu --run_name B --save_dir {out} {cache}"
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "ddpm_main.py"), *command.split()],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics_B.jsonl"
    try:
        while not (metrics.exists() and '"step"' in metrics.read_text()):
            if process.poll() is not None:
                raise RuntimeError(f"ddpm_main.py ended ({process.returncode}) before a step: {command}")
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def time_steps(folder: Path, work: Path, image_size: int, model_size: str, batch_size: int, steps: int) -> dict:
    """Training steps and load_batch alone, from the mapped cache and from an in-memory copy, taking turns."""
    torch.manual_seed(0)
    data = load_datasets("folder", folder, image_size, data_cache=str(work / "cache_all"))
    sources = {
        "cache": (data.train.images, data.train.labels),
        "memory": (data.train.images.clone(), data.train.labels.clone()),
    }
    model = network_from_config(ModelConfig(preset=model_size).network_config(data.sample_shape, None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = Diffusion(1000, prediction_type="v")
    order = epoch_permutation(len(data.train), 0, 0)
    batches = [order[(i * batch_size) % (len(order) - batch_size) :][:batch_size] for i in range(2 * steps + 2)]
    cpu = torch.device("cpu")

    def step(kind: str, indices: torch.Tensor) -> float:
        started = time.perf_counter()
        x0, _ = load_batch(*sources[kind], indices, True, cpu)
        loss = diffusion.p_losses(model, x0, torch.randint(0, 1000, (len(x0),)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    times = {"cache": [], "memory": []}
    for i, indices in enumerate(batches):
        for kind in ("cache", "memory") if i % 2 else ("memory", "cache"):
            elapsed = step(kind, indices)
            if i >= 2:  # warm-up
                times[kind].append(elapsed)
    loads = {kind: [] for kind in sources}
    for i in range(200):
        indices = order[(i * batch_size) % (len(order) - batch_size) :][:batch_size]
        for kind in sources:
            started = time.perf_counter()
            load_batch(*sources[kind], indices, True, cpu)
            loads[kind].append(time.perf_counter() - started)
    result = {f"step_{kind}_s": statistics.median(values) for kind, values in times.items()}
    result.update({f"load_batch_{kind}_ms": 1000 * statistics.median(values) for kind, values in loads.items()})
    result["step_ratio"] = result["step_cache_s"] / result["step_memory_s"]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_memory(folder: Path, work: Path, image_size: int, cached: bool) -> list[dict]:
    """Each of 2 torchrun ranks' private memory before and after loading and reading every image."""
    script = work / "rank_memory.py"
    script.write_text(
        RANK_SCRIPT.format(
            repo=str(REPO),
            folder=str(folder),
            image_size=image_size,
            cache=str(work / "cache_all"),
            use_cache=cached,
            work=str(work),
        )
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
    ]
    result = subprocess.run(
        command, cwd=work, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed: {result.stderr[-2000:]}")
    return [json.loads((work / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def report(figures: dict) -> None:
    data_mb = figures["cache_mb"]
    gains = {
        kind: [(r["after_kb"] - r["before_kb"]) / 1024 for r in figures[f"ranks_{kind}"]]
        for kind in ("cached", "memory")
    }
    rows = [
        (
            "first start, 1 process",
            f"{figures['first_start_one_s']:.2f} s",
            f"{figures['first_start_one_images_per_s']:.0f} images/s",
            "",
        ),
        (
            f"first start, {figures['cores']} cores",
            f"{figures['first_start_all_s']:.2f} s",
            f"{figures['first_start_all_images_per_s']:.0f} images/s",
            f"{figures['decode_speedup']:.2f}x (target >= 1.7x)",
        ),
        (
            "later start: data ready",
            f"{figures['later_start_s']:.3f} s",
            f"decoding into memory: {figures['decode_in_memory_s']:.2f} s",
            f"{figures['later_start_speedup']:.0f}x faster (target >= 20x)",
        ),
        (
            "later start: first optimizer step",
            f"{figures['first_step_cached_s']:.2f} s",
            f"--no_data_cache: {figures['first_step_memory_s']:.2f} s",
            "a new ddpm_main.py process",
        ),
        (
            "training step",
            f"cache {1000 * figures['step_cache_s']:.1f} ms",
            f"memory {1000 * figures['step_memory_s']:.1f} ms",
            f"{figures['step_ratio']:.3f}x (target within 5%)",
        ),
        (
            "load_batch alone",
            f"cache {figures['load_batch_cache_ms']:.2f} ms",
            f"memory {figures['load_batch_memory_ms']:.2f} ms",
            "",
        ),
        (
            "private memory per rank, cache",
            " / ".join(f"{gain:.1f} MB" for gain in gains["cached"]),
            f"data {data_mb:.1f} MB",
            " / ".join(f"{100 * gain / data_mb:.1f}%" for gain in gains["cached"]) + " (target < 10%)",
        ),
        (
            "private memory per rank, in memory",
            " / ".join(f"{gain:.1f} MB" for gain in gains["memory"]),
            f"data {data_mb:.1f} MB",
            " / ".join(f"{100 * gain / data_mb:.1f}%" for gain in gains["memory"]),
        ),
    ]
    print("| measure | figure | against | ratio |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ddpm_data_benchmark_"))
    folder = work / "jpegs"
    try:
        write_jpegs(folder, args.count, args.width, args.height)
        figures = {"count": args.count, "width": args.width, "height": args.height, "image_size": args.image_size}
        figures.update(time_first_starts(folder, work, args.image_size))
        figures["cache_mb"] = sum(path.stat().st_size for path in (work / "cache_all").glob("*.npy")) / 2**20
        figures.update(time_later_starts(folder, work, args.image_size))
        for cached in (True, False):
            figures[f"first_step_{'cached' if cached else 'memory'}_s"] = time_to_first_step(
                folder, work, args.image_size, args.batch_size, cached
            )
        figures.update(time_steps(folder, work, args.image_size, args.model_size, args.batch_size, args.steps))
        figures["ranks_cached"] = rank_memory(folder, work, args.image_size, True)
        figures["ranks_memory"] = rank_memory(folder, work, args.image_size, False)
        report(figures)
        if args.out:
            Path(args.out).write_text(json.dumps(figures, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
