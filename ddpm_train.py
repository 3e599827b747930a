"""The training loop, top to bottom: build a run, restore it, step through epochs, evaluate, save, finish.

    train(config, data, runtime, resume) -> build_run -> restore_run -> run_epoch (train_step per optimizer step)
    -> end_epoch (losses, samples, pictures, checkpoints) -> finish_training

The loop owns its state (TrainingRun, and its position TrainState of ddpm_runstate: no module below reads them) and
passes plain values to the modules below it: the optimizers, LR schedule and EMA (ddpm_optim), the data order
(ddpm_data), the files of a checkpoint (ddpm_checkpoint.CheckpointIO), the metrics log and the start-up lines
(ddpm_logging), the sampling path (ddpm_sampling) and what differs between images and points (ddpm_kinds), processes and
signals (ddpm_runtime). Everything a run needs to continue bit-identically (weights, EMA, optimizer, LR schedule, grad
scaler, position in the data order, loss history, random states) goes into its checkpoint (`save_run_checkpoint`); what
a resumed run does differently is decided here (`restore_run`, with ddpm_runstate's `restored_state` and
`keep_global_batch`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ddpm_checkpoint import (
    CheckpointIO,
    ModelDescription,
    copy_checkpoint,
    prune_snapshots,
    remove_stale_temporaries,
    save_weights,
    weights_path,
)
from ddpm_config import SAVE_EVERY_MINUTES, RunConfig, SamplingConfig, UsageError
from ddpm_data import DataSplits, epoch_batches, load_batch
from ddpm_diffusion import Diffusion, drop_labels
from ddpm_evaluate import evaluation_loss
from ddpm_kinds import SampleKind, kind_of_data
from ddpm_logging import RunLog, StepCounters, log_step, print_run_summary, report_epoch
from ddpm_model import count_parameters, network_from_config
from ddpm_optim import (
    EMA,
    apply_update,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    derived_warmup,
)
from ddpm_phema import (
    PowerFunctionEMA,
    save_snapshot,
    snapshot_folder,
    snapshot_interval,
)
from ddpm_quality import QualityCurve, build_quality_curve, report_point
from ddpm_runstate import (
    TrainState,
    evaluation_subset_size,
    keep_global_batch,
    plan_steps,
    restored_state,
    saved_processes,
)
from ddpm_runtime import (
    Runtime,
    StopRequest,
    autocast_dtype,
    check_replicas_identical,
    gather_rng_states,
    maybe_no_sync,
    restore_rng_state,
    rng_state,
    seed_everything,
    unwrap,
)
from ddpm_sampling import every_class_samples

EVAL_SEEDS = {"val": 1_000_003, "test": 2_000_003}  # fixed across runs, so loss curves compare
MAX_NONFINITE_STEPS = 20  # this many non-finite losses in a row stop the run


@dataclass
class TrainingRun:
    """What a run is made of: built by build_run, loaded by restore_run, advanced by the phases of train."""

    config: RunConfig  # as asked: None where a setting is derived (the start-up lines say which)
    data: DataSplits
    kind: SampleKind  # images or points (ddpm_kinds)
    sampling: SamplingConfig  # the training samples' settings, every default resolved
    description: ModelDescription  # of the network, as its checkpoints describe it
    runtime: Runtime
    model: (
        torch.nn.Module
    )  # the UNet or the MLP; wrapped in DistributedDataParallel under torchrun, compiled in place with --compile
    diffusion: Diffusion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 only: loss scaling; a no-op otherwise
    ema: Optional[EMA]
    phema: Optional[PowerFunctionEMA]  # the post-hoc EMA's tracked profiles, with --save_model (ddpm_phema)
    phema_every: int  # steps between its snapshots in <run folder>/phema/ (0: none)
    amp_dtype: Optional[torch.dtype]  # --amp on this device
    state: TrainState
    counters: StepCounters
    log: RunLog
    steps_per_epoch: int
    examples_per_step: int  # batch_size x grad_accum x processes
    total_steps: int  # --max_steps, or what --epochs leaves from where the run is
    warmup_steps: int  # --warmup_steps, or derived from total_steps
    eval_examples: int  # per split, of the per-epoch validation and test losses (evaluation_subset_size)
    sample_count: int  # samples of the training pictures (and of the points' figure): --num_samples or the kind's
    quality: Optional[QualityCurve]  # the sample quality curve (ddpm_quality), where the run records one
    quality_note: str  # the start-up line about it
    train_images: torch.Tensor  # on the GPU where the runtime keeps data on the device
    train_labels: torch.Tensor
    start_step: int = 0  # the step this process started at (the curve's seconds per trained image)
    save_every_seconds: float = 0.0  # --save_every_minutes (0: off)
    last_saved: float = field(default_factory=time.monotonic)  # when ckpt.pt was last written (or the run started)
    started: float = field(default_factory=time.perf_counter)  # this process's start, for the time split
    seconds_in_steps: float = 0.0  # of that, the time spent in optimizer steps

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.models_dir) / self.config.train.run_name

    @property
    def last_path(self) -> Path:
        return self.run_dir / "ckpt.pt"

    @property
    def epoch_examples(self) -> int:
        return self.steps_per_epoch * self.examples_per_step

    def eval_model(self) -> torch.nn.Module:
        """The weights that validation, test and the training samples use: the EMA unless --no_ema (or no EMA)."""
        if self.ema is not None and self.config.train.use_ema:
            return self.ema.module
        return unwrap(self.model)

    def checkpoint_overdue(self) -> bool:
        """Whether --save_every_minutes have passed since ckpt.pt was last written (rank 0's clock decides)."""
        return self.save_every_seconds > 0 and time.monotonic() - self.last_saved >= self.save_every_seconds

    def checkpoint_io(self) -> CheckpointIO:
        """The objects of the run's checkpoints, by the names the checkpoint files give them."""
        return CheckpointIO(
            model=unwrap(self.model),
            ema=None if self.ema is None else self.ema.module,
            phema=self.phema,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            scaler=self.scaler,
        )


def train(
    config: RunConfig, data: DataSplits, runtime: Runtime, resume: Optional[tuple[Path, dict]] = None
) -> Optional[Path]:
    """Train as `config` says, from scratch or from `resume` (see ddpm_checkpoint.load_resume_checkpoint); return the
    path of the last checkpoint (None without --save_model). A resumed run that already reached its end says so and
    returns without writing anything."""
    resume_path, checkpoint = resume if resume is not None else (None, None)
    kind, state = kind_of_data(config.data.dataset, data), restored_state(checkpoint)
    if checkpoint is not None:
        config = keep_global_batch(config, checkpoint, runtime, resume_path)
        if state.step >= plan_steps(config.train, len(data.train), kind, runtime, state)[2]:
            if runtime.is_main:
                print(f"{resume_path} is complete at step {state.step} (--max_steps / --epochs): nothing to do")
            return resume_path
    run = build_run(config, data, kind, runtime, state)
    if checkpoint is not None:
        restore_run(run, checkpoint)
    if runtime.is_main:
        remove_stale_temporaries(run.run_dir)
    if runtime.world_size > 1:
        run.model = DistributedDataParallel(
            run.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if (
        config.train.compile
    ):  # in place, so state_dict keys stay the plain model's; after DDP, so graphs overlap its all-reduce
        run.model.compile()
    if runtime.is_main:
        announce(run, resume_path)
    run.model.train()
    with StopRequest(runtime) as stop:
        while run.state.step < run.total_steps:
            run_epoch(run, stop)
            end_epoch(run)
    return finish_training(run)


def build_run(
    config: RunConfig, data: DataSplits, kind: SampleKind, runtime: Runtime, state: TrainState
) -> TrainingRun:
    """The model, EMA, optimizer, LR schedule and the run's counters, for a run that is at `state`."""
    train = config.train
    examples_per_step, steps_per_epoch, total_steps = plan_steps(train, len(data.train), kind, runtime, state)
    warmup_steps = train.warmup_steps if train.warmup_steps is not None else derived_warmup(total_steps)
    num_classes = data.num_classes if config.model.conditional else None
    model = build_network(config, data.sample_shape, num_classes, runtime)
    optimizer = build_optimizer(train, model)
    amp_dtype = autocast_dtype(train.amp, runtime.device)
    on_device = runtime.data_on_device
    phema_every = (
        (snapshot_interval(total_steps) if train.phema_every is None else train.phema_every) if train.save_model else 0
    )
    sampling = kind.sampling_settings(config.sampling, config.diffusion.timesteps)
    planned_images, continues = total_steps * examples_per_step, state.quality_due is not None
    quality, quality_note = build_quality_curve(config, kind, runtime, sampling, num_classes, planned_images, continues)
    minutes = SAVE_EVERY_MINUTES if train.save_every_minutes is None else train.save_every_minutes
    diffusion = config.diffusion
    return TrainingRun(
        config=config,
        data=data,
        kind=kind,
        sampling=sampling,
        description=ModelDescription.of_run(model, config, data),
        runtime=runtime,
        model=model,
        diffusion=Diffusion(
            diffusion.timesteps,
            diffusion.schedule,
            diffusion.prediction_type,
            diffusion.snr_gamma,
            variance=diffusion.variance,
        ).to(runtime.device),
        optimizer=optimizer,
        scheduler=build_lr_scheduler(optimizer, warmup_steps, total_steps, train.lr_schedule),
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=amp_dtype == torch.float16),
        ema=build_ema(model, train.ema_decay),
        phema=PowerFunctionEMA(model) if phema_every else None,
        phema_every=phema_every,
        amp_dtype=amp_dtype,
        state=state,
        counters=StepCounters(runtime.device),
        log=RunLog(Path(train.save_dir), train.run_name, train.logger, enabled=runtime.is_main),
        steps_per_epoch=steps_per_epoch,
        examples_per_step=examples_per_step,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        eval_examples=evaluation_subset_size(steps_per_epoch * examples_per_step),
        sample_count=kind.training_count(train.num_samples, num_classes),
        quality=quality,
        quality_note=quality_note,
        train_images=data.train.images.to(runtime.device) if on_device else data.train.images,
        train_labels=data.train.labels.to(runtime.device) if on_device else data.train.labels,
        start_step=state.step,
        save_every_seconds=60 * minutes if train.save_model else 0.0,
    )


def build_network(
    config: RunConfig, sample_shape: tuple[int, ...], num_classes: Optional[int], runtime: Runtime
) -> nn.Module:
    """The network, on the device: the same initial weights (and so EMA) on every rank; then each rank its own noise."""
    seed_everything(config.train.seed)
    model = network_from_config(config.model.network_config(sample_shape, num_classes)).to(runtime.device)
    seed_everything(config.train.seed + runtime.rank)
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def restore_run(run: TrainingRun, checkpoint: dict) -> None:
    """Weights, EMA, optimizer, LR schedule, grad scaler and random states from a checkpoint, and what a resumed run
    decides: a post-hoc EMA only where the saved run tracked one from step 0; the learning rate of this command (--lr);
    the random streams continued when the number of processes is the one that saved, started afresh per rank
    otherwise."""
    if run.phema is not None and checkpoint.get("phema") is None:
        run.phema = None
    run.checkpoint_io().load(checkpoint)
    if run.ema is not None and checkpoint["ema"] is not None:
        run.ema.num_updates.fill_(checkpoint["ema_num_updates"])
    lr = run.config.train.lr
    for group in run.optimizer.param_groups:
        group["initial_lr"] = lr
    run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
    runtime = run.runtime
    if runtime.world_size == saved_processes(checkpoint):
        restore_rng_state(checkpoint["rng"] if runtime.world_size == 1 else checkpoint["rng_per_rank"][runtime.rank])
    else:
        seed_everything((run.config.train.seed + runtime.rank + 7_919 * run.state.step) % 2**32)


def save_run_checkpoint(run: TrainingRun, path: Path) -> None:
    """Every rank calls this (the random states are gathered), after the step counters were read into the state; rank 0
    writes the checkpoint and, next to it, the sampling weights alone (the EMA, or the raw weights without one) as
    safetensors (ddpm_checkpoint.weights_path)."""
    run.last_saved = time.monotonic()
    rng_per_rank = gather_rng_states(run.runtime)
    if not run.runtime.is_main:
        return
    run.checkpoint_io().save(
        path,
        run.description,
        {
            "ema_num_updates": int(run.ema.num_updates) if run.ema is not None else 0,
            "train_state": asdict(run.state),
            "config": run.config.to_dict(),
            "runtime": {"world_size": run.runtime.world_size, "global_batch": run.examples_per_step},
            "rng": rng_state(),
            "rng_per_rank": rng_per_rank,
        },
    )
    sampling_model = run.ema.module if run.ema is not None else unwrap(run.model)
    save_weights(
        sampling_model.state_dict(),
        run.description.to_dict()
        | {"train_state": {"step": run.state.step}, "weights": "ema" if run.ema is not None else "raw"},
        weights_path(path),
    )


def announce(run: TrainingRun, resume_path: Optional[Path]) -> None:
    """The start-up lines (ddpm_logging.print_run_summary), and where a resumed run continues."""
    data = run.data
    print_run_summary(
        run.config,
        run.sampling,
        run.kind,
        parameters=count_parameters(unwrap(run.model)),
        num_classes=data.num_classes,
        split_sizes=(len(data.train), len(data.val), len(data.test)),
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        warmup_steps=run.warmup_steps,
        ema=run.ema,
        phema=None if run.phema is None else (run.phema.sigma_rels, run.phema_every),
        hflip=data.train.hflip,
        eval_examples=run.eval_examples,
        sample_count=run.sample_count,
    )
    train = run.config.train
    if run.save_every_seconds:
        source = "derived" if train.save_every_minutes is None else "--save_every_minutes"
        print(
            f"ckpt.pt refreshed at every epoch's end and every {run.save_every_seconds / 60:g} minutes of training "
            f"({source})"
        )
    print(run.quality_note)
    if resume_path is not None:
        print(f"continuing {resume_path} at step {run.state.step} (epoch {run.state.epoch + 1})")
    elif train.save_model:
        print(f"new run: no checkpoint in {run.run_dir}/ yet (the same command continues the run once it has one)")


@dataclass
class EpochData:
    """Where train_step takes its micro-batches from: the rest of this epoch's order and the training set."""

    batches: Iterator[tuple[int, torch.Tensor]]
    images: torch.Tensor
    labels: torch.Tensor
    hflip: bool


def run_epoch(run: TrainingRun, stop: StopRequest) -> None:
    """The step loop, over the rest of the current epoch (or up to the last step): a step, the EMA, the LR
    schedule, and at intervals the logged figures (--log_interval) and ckpt.pt (--save_every_steps, and on every rank
    after the same step once rank 0 finds --save_every_minutes passed); a signal stops it after a step."""
    train, state, runtime = run.config.train, run.state, run.runtime
    order = epoch_batches(
        len(run.data.train),
        train.batch_size,
        runtime,
        train.seed,
        state.epoch,
        state.epoch_position,
        run.train_images.device,
    )
    epoch = EpochData(order, run.train_images, run.train_labels, run.data.train.hflip)
    remaining = min((run.epoch_examples - state.epoch_position) // run.examples_per_step, run.total_steps - state.step)
    bar = tqdm(
        total=remaining, desc=f"epoch {state.epoch + 1}", disable=not runtime.is_main, dynamic_ncols=True, leave=False
    )
    loop_start, saving = time.perf_counter(), 0.0
    window_start, window_steps = loop_start, 0
    for _ in range(remaining):
        loss, grad_norm, skip = train_step(run, epoch)
        if run.ema is not None:
            run.ema.update(unwrap(run.model), skip)
        if run.phema is not None:
            run.phema.update(unwrap(run.model), skip)
        run.counters.record(loss, skip)
        run.scheduler.step()
        state.step += 1
        window_steps += 1
        bar.update(1)
        if state.step % train.log_interval == 0:
            read_counters(run)
            images_per_s = window_steps * run.examples_per_step / (time.perf_counter() - window_start)
            log_step(
                run.log,
                bar,
                step=state.step,
                epoch=state.epoch + 1,
                loss=loss,
                lr=run.scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                skip=skip,
                images_per_s=images_per_s,
                device=runtime.device,
                nonfinite_skipped=state.nonfinite_skipped,
            )
            window_start, window_steps = time.perf_counter(), 0
        stop_now, save_now = stop.poll(save_due=run.checkpoint_overdue())
        saving += save_within_epoch(run, save_now)
        if stop_now:
            bar.close()
            stop_after_signal(run, stop)
    bar.close()
    read_counters(run)
    run.seconds_in_steps += time.perf_counter() - loop_start - saving


def save_within_epoch(run: TrainingRun, save_now: bool) -> float:
    """The saves a step may be due for: a post-hoc EMA snapshot every --phema_every steps (rank 0), and ckpt.pt every
    --save_every_steps or when `save_now` (--save_every_minutes, agreed by every rank); returns their seconds."""
    train, state, started = run.config.train, run.state, time.perf_counter()
    if run.phema is not None and state.step % run.phema_every == 0 and run.runtime.is_main:
        for snapshot in run.phema.snapshot():
            save_snapshot(snapshot, snapshot_folder(run.run_dir))
    if train.save_model and (save_now or (train.save_every_steps and state.step % train.save_every_steps == 0)):
        read_counters(run)
        save_run_checkpoint(run, run.last_path)
    return time.perf_counter() - started


def train_step(run: TrainingRun, epoch: EpochData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over --grad_accum micro-batches, queued on the device without waiting for it.

    Returns (mean loss, grad norm, skip). `skip` is a bool tensor, true when the loss or the gradients were
    not finite (including fp16 gradients that overflowed, for which GradScaler lowers its scale); the
    optimizer then leaves the weights and its own state exactly as they were (ddpm_optim.apply_update).
    """
    train, runtime, model = run.config.train, run.runtime, run.model
    null_label = unwrap(model).null_label
    loss = torch.zeros((), device=runtime.device)
    run.optimizer.zero_grad(set_to_none=True)
    for micro in range(train.grad_accum):
        run.state.epoch_position, indices = next(epoch.batches)
        x0, labels = load_batch(epoch.images, epoch.labels, indices, epoch.hflip, runtime.device)
        if train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = drop_labels(labels, train.p_uncond, null_label) if null_label is not None else None
        t = torch.randint(0, run.diffusion.num_timesteps, (x0.shape[0],), device=runtime.device)
        last_micro = micro == train.grad_accum - 1
        with (
            maybe_no_sync(model, last_micro),
            torch.autocast(runtime.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None),
        ):
            micro_loss = run.diffusion.p_losses(model, x0, t, labels, loss_type=run.config.diffusion.loss_type)
        run.scaler.scale(micro_loss / train.grad_accum).backward()
        loss += micro_loss.detach().float() / train.grad_accum
    if runtime.world_size > 1:
        dist.all_reduce(loss)
        loss /= runtime.world_size
    grad_norm, skip = apply_update(model, run.optimizer, run.scaler, loss, train.grad_clip)
    return loss, grad_norm, skip


def read_counters(run: TrainingRun) -> None:
    """Bring the on-device step figures into the state (a host sync); stop a run whose steps keep failing."""
    state = run.state
    loss_sum, loss_count, skipped, longest = run.counters.take()
    state.epoch_loss_sum += loss_sum
    state.epoch_loss_count += loss_count
    state.nonfinite_skipped += skipped
    if skipped and run.runtime.is_main:
        tqdm.write(
            f"step {state.step}: {skipped} step(s) skipped since the last report, for a non-finite loss or "
            f"gradient ({state.nonfinite_skipped} so far)"
        )
    if longest >= MAX_NONFINITE_STEPS:
        raise UsageError(
            f"{longest} non-finite losses in a row by step {state.step}: stopping; "
            f"the last checkpoint is kept (try a lower --lr, or --amp bf16/none)"
        )


def end_epoch(run: TrainingRun) -> None:
    """After the step loop: the training samples where the kind takes a figure of them every epoch (points) or a picture
    is due (every --sample_every epochs and at the end), drawn once; the history entry with the epoch's losses and
    those figures; the pictures; then, with --save_model, ckpt.pt, best.pt (lowest validation loss) and every
    --save_every epochs a kept snapshot."""
    train, state, kind = run.config.train, run.state, run.kind
    epoch_done = run.epoch_examples - state.epoch_position < run.examples_per_step
    final = state.step >= run.total_steps
    if not (epoch_done or final):  # stopped inside an epoch to save (--save_every_steps needs no entry)
        return
    full_at = "end" if final else "every" if train.eval_every and (state.epoch + 1) % train.eval_every == 0 else None
    picture = train.sample_every > 0 and (final or (state.epoch + 1) % train.sample_every == 0)
    samples, labels = training_samples(run) if picture or kind.figures_every_epoch else (None, None)
    entry, full = epoch_losses(run, epoch_done, full_at)
    entry |= kind.epoch_figures(samples, labels) if samples is not None else {}
    for key, value in entry.items():
        state.history.setdefault(key, []).append(value)
    if full is not None:
        state.history["full"].append(full)
    is_best = entry["val_loss"] < state.best_val_loss  # never for NaN: no validation split (--val_fraction 0)
    if is_best:  # recorded before the checkpoint is written, so that a resumed run compares against the true best
        state.best_val_loss = entry["val_loss"]
    best_quality = record_quality(run, final)
    if run.runtime.is_main:
        total = time.perf_counter() - run.started
        report_epoch(
            run.log,
            entry,
            full,
            kind.epoch_text(entry),
            state.history,
            Path(train.save_dir),
            train.run_name,
            seconds_total=total,
            seconds_in_steps=run.seconds_in_steps,
            device=run.runtime.device,
        )
    if picture and run.runtime.is_main:
        kind.save_training_pictures(
            samples,
            labels,
            state.progression,
            title=f"epoch {state.epoch + 1}, step {state.step}",
            epoch=state.epoch + 1,
            step=state.step,
            save_dir=Path(train.save_dir),
            run_name=train.run_name,
            diffusion=run.diffusion,
            log=run.log,
        )
    if epoch_done:  # advance before saving, so a checkpoint taken here resumes at the next epoch
        state.epoch += 1
        state.epoch_position = 0
    if train.save_model:
        save_epoch_checkpoints(run, is_best, best_quality, epoch_done)


def epoch_losses(run: TrainingRun, epoch_done: bool, full_at: Optional[str]) -> tuple[dict, Optional[dict]]:
    """This epoch's history entry: the mean training loss since its start, the validation and test losses on the fixed
    subsets; and, where `full_at` says so ("end" or "every"), the record of the losses on the whole splits (else
    None)."""
    state = run.state
    subset = {split: split_loss(run, split, run.eval_examples) for split in ("val", "test")}
    train_loss = state.epoch_loss_sum / state.epoch_loss_count if state.epoch_loss_count else math.nan
    if epoch_done:  # a last partial epoch's entry is replaced on resume, so its steps count again then
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
    entry = {
        "epochs": state.epoch,
        "steps": state.step,
        "train_loss": train_loss,
        "val_loss": subset["val"],
        "test_loss": subset["test"],
        "lr": run.scheduler.get_last_lr()[0],
        "eval_examples": run.eval_examples,
    }
    if full_at is None:
        return entry, None
    full = {split: split_loss(run, split, None) for split in ("val", "test")}
    return entry, {
        "epoch": state.epoch,
        "step": state.step,
        "at": full_at,
        "val_loss": full["val"],
        "test_loss": full["test"],
    }


def split_loss(run: TrainingRun, split: str, count: Optional[int]) -> float:
    """The loss of the evaluation weights on the first `count` examples (all: None) of a split, with fixed timesteps
    and noise per example (`evaluation_loss`)."""
    return evaluation_loss(
        run.eval_model(),
        run.diffusion,
        getattr(run.data, split),
        run.runtime,
        seed=EVAL_SEEDS[split],
        batch_size=run.config.train.batch_size,
        loss_type=run.config.diffusion.loss_type,
        count=count,
    )


def record_quality(run: TrainingRun, final: bool) -> bool:
    """A point of the quality curve where one is due (and at the end), in the history (with when the next is due) and,
    on rank 0, reported (ddpm_quality); returns whether its figure is the best so far."""
    state, curve = run.state, run.quality
    images_seen = state.step * run.examples_per_step
    if curve is None or not curve.due(images_seen, state.quality_due, final):
        return False
    trained = (state.step - run.start_step) * run.examples_per_step
    point, state.quality_due = curve.record(
        run.eval_model(),
        run.diffusion,
        run.runtime,
        images_seen=images_seen,
        step=state.step,
        seconds_per_image=run.seconds_in_steps / trained if trained else 0.0,
        epoch_examples=run.epoch_examples,
    )
    state.history.setdefault("quality", []).append(point)
    best = point["value"] < state.best_quality
    if best:
        state.best_quality = point["value"]
    if run.runtime.is_main:
        report_point(
            point, state.history["quality"], run.log, Path(run.config.train.save_dir), run.config.train.run_name
        )
    return best


def training_samples(run: TrainingRun) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The run's training samples (run.sample_count, every class in turn) from the fixed noise, through the sampling
    path of --inference with the run's seed (any number of processes gives the same samples)."""
    num_classes = run.data.num_classes if run.config.model.conditional else None
    train = run.config.train
    return every_class_samples(
        run.eval_model(),
        run.diffusion,
        run.kind,
        run.sample_count,
        num_classes,
        run.sampling,
        train.seed,
        train.batch_size,
        run.runtime,
        desc="samples",
    )


def save_epoch_checkpoints(run: TrainingRun, is_best: bool, best_quality: bool, epoch_done: bool) -> None:
    """ckpt.pt; on rank 0 its copies best.pt (lowest validation loss), best_fid.pt (best point of the quality curve)
    and, every --save_every epochs, ckpt_epochNNNN.pt."""
    train, state = run.config.train, run.state
    save_run_checkpoint(run, run.last_path)
    if run.runtime.is_main and is_best:
        copy_checkpoint(run.last_path, run.run_dir / "best.pt")
    if run.runtime.is_main and best_quality:
        copy_checkpoint(run.last_path, run.run_dir / "best_fid.pt")
    if run.runtime.is_main and epoch_done and state.epoch % train.save_every == 0:
        copy_checkpoint(run.last_path, run.run_dir / f"ckpt_epoch{state.epoch:04d}.pt")
        prune_snapshots(run.run_dir, train.keep_checkpoints)


def stop_after_signal(run: TrainingRun, stop: StopRequest) -> None:
    """Ctrl-C, SIGTERM or SIGUSR1 (to any rank): write ckpt.pt and exit with 130 (Ctrl-C) or EXIT_PREEMPTED (75), which
    a job script can test to requeue the same command (docs/scale.md)."""
    read_counters(run)
    save_run_checkpoint(run, run.last_path)
    if run.runtime.world_size > 1:  # no rank exits (and makes torchrun stop the others) before rank 0 has written
        dist.barrier(group=run.runtime.control_group)
    if run.runtime.is_main:
        reason = f"{stop.signal_name} received" if stop.signal_name else "another process was signalled"
        print(
            f"{reason}: stopped after step {run.state.step}; checkpoint saved to {run.last_path}; "
            f"the same command continues the run",
            file=sys.stderr,
        )
    raise SystemExit(stop.exit_status)


def finish_training(run: TrainingRun) -> Optional[Path]:
    """The run's time split; under torchrun, the check that every rank holds the same weights."""
    train = run.config.train
    if run.runtime.is_main:
        total = time.perf_counter() - run.started
        print(
            f"time: {run.seconds_in_steps:.0f} s in optimizer steps, {total - run.seconds_in_steps:.0f} s outside them "
            f"({(total - run.seconds_in_steps) / total:.0%}: data, evaluation, grids, checkpoints)"
        )
        if run.quality is not None and run.seconds_in_steps:
            print(
                f"quality curve: {run.quality.seconds:.0f} s, {run.quality.seconds / run.seconds_in_steps:.1%} of the "
                "time in optimizer steps"
            )
        run.log.write(
            {
                "kind": "end",
                "step": run.state.step,
                "seconds_in_steps": round(run.seconds_in_steps, 3),
                "seconds_outside_steps": round(total - run.seconds_in_steps, 3),
            }
        )
        if train.save_model:
            print(f"checkpoint: {run.last_path}")
    run.log.close()
    if run.runtime.world_size > 1:
        check_replicas_identical([unwrap(run.model)] + ([run.ema.module] if run.ema is not None else []), run.runtime)
    return run.last_path if train.save_model else None
