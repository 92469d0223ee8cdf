"""One run, top to bottom: train one composed configuration and record it (`ablate.train` is the command).

Read top to bottom: find the run folder (one that records another run is refused: exit 2, nothing
touched), validate the operator, see what the folder holds (a completed run is not trained again; a
checkpoint is resumed, metrics.jsonl restored from it), check what can be checked before training
(batch, disk, data), take the run folder's lock, build model and recipe, train epoch by epoch
(metrics line, then checkpoint), and record `results.json`. Everything random in epoch e is seeded
from (seed, e), so a run resumed at epoch e replays it exactly on the CPU. Under DDP only rank 0
writes (see ablate/distributed.py). Exit codes: 0 completed, 1 failed, 2 bad input (nothing
trained; what to change is printed), 3 diverged, 4 another job holds the run folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import random
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import ablate  # noqa: F401  (registers the operator options)
from ablate.config import check_train_config, spec_from_cfg
from ablate.data import DataError, build_data
from ablate.distributed import (
    Dist,
    average_scalar,
    init_distributed,
    pooled_batchnorms,
    processor,
    share_error_type,
    sync_batchnorm,
)
from ablate.errors import EXIT_CODES, Interrupted, raise_if_stopping, signals_deferred
from ablate.ops.fast import routes
from ablate.recipe import build_recipe, check_recipe
from ablate.runs import check_processes, derived_settings, describe_run, provenance, run_folder, run_identity
from ablate.tasks import Task, task_of
from ablate.tasks.classification import Classification
from ablate.tracking import CheckpointError, RunLocked, RunStore, WandbMirror, scrub
from ablate.tracking.identity import IdentityConflict, effective_precision
from ablate.tracking.wandb_logger import resolve_mode, summary_of

__all__ = ["train", "train_one_epoch", "Diverged", "print_results"]

log = logging.getLogger("ablate.train")

# rank 0's decisions fail alike on every rank
share_error_type(DataError, CheckpointError, RunLocked, IdentityConflict)




def _epochs_kept(done: int) -> str:
    return ("no epoch was finished" if done == 0 else "epoch 1 is checkpointed" if done == 1
            else f"epochs 1-{done} are checkpointed")


class Diverged(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss is {loss} at step {step}")
        self.step, self.loss = step, loss


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _measured(task: Task) -> list[str]:
    """The metrics columns of an epoch's row: val_<metric> for each, then test_<metric>."""
    return [f"{split}_{m}" for split in ("val", "test") for m in task.metrics]


def _wandb_row(row: dict[str, Any]) -> dict[str, Any]:
    """An epoch's row of metrics.jsonl as W&B logs it: the measured values, the epoch counted from 1
    (who timed the epoch is the run's summary's `processor`)."""
    return {k: v for k, v in row.items() if k not in ("epoch", "processor", "first_of_process")
            and v is not None} | {"epoch": row["epoch"] + 1}


def _wandb_id(text: str) -> str:
    """A W&B run id: 16 hex digits of the sha256 of `text`."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shown(row: dict[str, Any], split: str, task: Task) -> str:
    """"74.10/98.50": the split's metrics of an epoch's row, "-" where not measured."""
    values = [row[f"{split}_{m}"] for m in task.metrics]
    return "-" if any(v is None for v in values) else "/".join(f"{v:.2f}" for v in values)


# -- the machine --------------------------------------------------------------------------------
# CPU features (/proc/cpuinfo flags) that execute bf16 arithmetic natively: x86's AVX512-BF16 and AMX,
# Arm's BF16 extension. Without them oneDNN emulates bf16 in fp32 and autocast only adds conversions.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def autocast(device: torch.device, precision: str):
    """The autocast context of a run: fp32 on the CPU by default (bf16 where a CPU has it would make
    a run's numbers depend on which CPU ran it), bf16 on a GPU; `bf16` on a CPU only where the CPU
    computes in bf16."""
    precision = effective_precision(device.type, precision)
    if precision == "fp32":
        return contextlib.nullcontext
    if precision != "bf16":
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32; got {precision!r}")
    if device.type == "cpu" and not cpu_has_bf16():
        raise ValueError("trainer.precision=bf16 needs a CPU with bf16 instructions (flags "
                         f"{', '.join(BF16_CPU_FLAGS[:2])}; this one has neither, so bf16 would be emulated "
                         "and slower): use trainer.precision=fp32 here.")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def reset_process_state(seed: int) -> None:
    """Start a job from a clean process state: launchers (joblib, basic) run many jobs per process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # compiled graphs of the previous job's model


def seed_epoch(seed: int, epoch: int) -> None:
    """Every random draw of epoch `epoch` (augmentation, mixup, drop path) follows from here."""
    s = (seed * 1_000_003 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- one epoch ----------------------------------------------------------------------------------
class LossTally:
    """The epoch's summed loss, kept where the loss is. On a GPU, reading a loss (`.item()`) waits for
    the step to finish, so the CPU cannot queue the next step meanwhile: a micro model's step is
    shorter than its launches, and a read per step left the GPU idle through most of it. Losses are
    read every `every` steps instead (at once on the CPU, where reading costs nothing), and a
    non-finite one is still reported at its own step."""

    def __init__(self, device: torch.device, every: int = 25):
        self.every = 1 if device.type == "cpu" else every
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss, samples)
        self.total, self.samples, self.last = 0.0, 0, float("nan")

    def add(self, step: int, loss: torch.Tensor, samples: int) -> None:
        self.pending.append((step, loss.detach(), samples))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Read the pending losses (one transfer); raises Diverged at the first non-finite one."""
        if not self.pending:
            return
        values = torch.stack([loss.float() for _, loss, _ in self.pending]).tolist()
        for (step, _, samples), value in zip(self.pending, values):
            if not math.isfinite(value):
                self.pending = []
                raise Diverged(step, value)
            self.total += value * samples
            self.samples += samples
            self.last = value
        self.pending = []


def train_one_epoch(model, loader, recipe, amp, cfg, epoch: int, step: int, dist: Dist | None = None,
                    task: Task | None = None) -> dict[str, float]:
    """One epoch. Under DDP the loss shown, summed and checked for NaN is the global batch's (the
    mean over ranks), so every rank sees the same numbers and a divergence stops every rank."""
    dist, task = dist or Dist(), task or Classification()
    model.train()
    clip = cfg.optim.clip_grad
    tally, start = None, time.perf_counter()
    lr = recipe.optimizer.param_groups[0]["lr"]
    # None: tqdm draws only where stderr is a terminal. Redirected to a file (nohup, SLURM's output
    # file) every refresh would be one more carriage-return frame in the log; the epoch's line says it.
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}", leave=False,
               disable=True if cfg.trainer.quiet or not dist.is_main else None, dynamic_ncols=True,
               file=sys.stderr)
    try:
        for images, targets in loader:
            raise_if_stopping()  # a Ctrl-C that a loader's worker shutdown or start swallowed
            tally = tally or LossTally(images.device)
            loss = task.loss(model, images, targets, recipe, amp)
            recipe.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            recipe.optimizer.step()
            lr = recipe.optimizer.param_groups[0]["lr"]  # the rate this step took, before the next's
            # the global batch's loss, read later; a non-finite one stops the run at its step
            tally.add(step, average_scalar(dist, loss), len(images) * dist.world_size)
            step += 1
            recipe.scheduler.step_update(step)
            if recipe.ema is not None:
                recipe.ema.update(model, step=step)
            bar.update()
            if not tally.pending:
                bar.set_postfix(loss=f"{tally.last:.3f}", refresh=False)
        if tally is not None:
            tally.flush()
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    total, samples = (tally.total, tally.samples) if tally is not None else (0.0, 0)
    return {"step": step, "train_loss": total / max(samples, 1), "train_seconds": seconds,
            "samples_per_s": samples / seconds if seconds else 0.0, "lr": lr}


def train_speed(history: list[dict[str, Any]], processor: str) -> float | None:
    """A run's training samples/s, as the record states it beside its `processor`: the mean over the
    epochs that processor trained (a resumed run's earlier epochs may come from another machine),
    leaving out the first epoch of each process, which pays its warm-up (caches, kernels, compiling),
    where other epochs remain. Rows of earlier code name no processor and no first epoch: they count
    as this processor's, and the run's first epoch is the one left out, as that code did."""
    rows = [row for row in history if row.get("processor", processor) == processor]
    warm = [row for row in rows if not row.get("first_of_process", row is history[0])]
    chosen = warm or rows
    return float(np.mean([row["samples_per_s"] for row in chosen])) if chosen else None


@torch.no_grad()
def inference_throughput(model, loader, amp, batches: int, task: Task | None = None) -> float | None:
    """Images per second of the model in eval mode over up to `batches` test batches. The first
    batch runs once untimed (allocators, kernels), then again timed, so one batch suffices."""
    model.eval()
    task = task or Classification()
    images_seen, start, images = 0, None, None

    def sync():
        if images is not None and images.is_cuda:
            torch.cuda.synchronize()

    for i, (images, _) in enumerate(loader):
        if i == 0:
            with amp():
                task.infer(model, images)
            sync()
            start = time.perf_counter()
        with amp():
            task.infer(model, images)
        images_seen += images.shape[0]
        if i + 1 >= batches:
            break
    if start is None:
        return None
    sync()
    return images_seen / (time.perf_counter() - start)


# -- before training ----------------------------------------------------------------------------
def check_batchnorm_batch(model: torch.nn.Module, cfg: DictConfig, dist: Dist) -> None:
    """BatchNorm over globally pooled features (the dynamic weight predictors) sees one value per
    channel per sample: a step of one sample cannot be normalised. Under DDP with synchronised BN the
    global batch counts, so one sample per GPU works; one process with a batch of one is an error."""
    synced = dist.world_size if dist.enabled and cfg.trainer.sync_bn else 1
    if cfg.data.batch_size * synced >= 2:
        return
    pooled = pooled_batchnorms(model, cfg.data.in_chans, cfg.data.img_size)
    if pooled:
        fix = ("set trainer.sync_bn=true" if dist.enabled else
               "train on several processes (torchrun ... trainer=ddp: BatchNorm synchronised over them)")
        raise ValueError(f"data.batch_size={cfg.data.batch_size} gives BatchNorm a single sample per step, "
                         f"but {len(pooled)} BatchNorm layers normalise globally pooled features (one value "
                         f"per channel per sample, e.g. {pooled[0]}: {_pooled_role(pooled[0])}), which "
                         f"needs at least 2. Raise data.batch_size to 2 or more, or {fix}.")


def _pooled_role(name: str) -> str:
    """What a BatchNorm over pooled features is, by where it sits: in a backbone's mixer, a dynamic
    weight predictor; elsewhere (UPerNet's 1x1 pyramid pooling, ...) a layer after a global pooling."""
    return "a dynamic weight predictor" if ".mixer." in f".{name}." else "a layer after a global pooling"


def checkpoint_bytes(model: torch.nn.Module, cfg: DictConfig) -> int:
    """The disk a run needs: a checkpoint (weights, two AdamW moments, an EMA copy) three times over
    (checkpoint.pt, checkpoint.prev.pt and the one being written), plus room for the records."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 3 * weights * (3 + bool(cfg.optim.ema)) + 4 * 2**20


def _finished_record(store: RunStore, world_size: int) -> dict[str, Any] | None:
    record = store.read_results() if store.finished() else None
    if record is not None:
        check_processes(store.folder, record, world_size)
    return record


def _open_run(store: RunStore, identity: dict[str, Any], resume: bool, world_size: int,
              precision: str) -> tuple[str, Any]:
    """Rank 0: create the folder, take its lock, and read what the run resumes from. Returns
    ("finished", record) when another job finished it meanwhile, else ("ok", checkpoint or None).
    `precision`: what this job computes in (trainer.precision=auto is bf16 on a GPU, fp32 on a CPU)."""
    store.create()
    store.lock()
    try:
        # checked again under the lock: another experiment's job may have claimed the folder since
        store.check_identity(identity)
        record = _finished_record(store, world_size)
        if record is not None:
            return "finished", record
        checkpoint = store.load_checkpoint() if resume else None
        if checkpoint is not None and checkpoint.get("world_size", 1) != world_size:
            raise CheckpointError(
                f"the checkpoint in {store.folder} was trained by {checkpoint.get('world_size', 1)} "
                f"process(es), this job has {world_size}: the global batch (and so the learning rate) "
                "would change mid-run. Resume with the same number of processes, or set "
                "trainer.resume=never to start over.")
        trained_in = (checkpoint or {}).get("precision_used", precision)  # (older checkpoints: unknown)
        if trained_in != precision:
            raise CheckpointError(
                f"the checkpoint in {store.folder} was trained in {trained_in}, this job computes in "
                f"{precision} (trainer.precision=auto is bf16 on a GPU, fp32 on a CPU): the run would "
                f"change precision mid-run. Resume it on the kind of device it started on "
                f"(trainer.device={'cuda' if trained_in == 'bf16' else 'cpu'}), or set trainer.resume=never "
                "to start over.")
        return "ok", checkpoint
    except BaseException:
        store.unlock()
        raise


def _outcome_decided(dist: Dist) -> None:
    """Under DDP a rank that failed, or learnt that another did, has its outcome: torchrun stops every
    rank with SIGTERM once one ends non-zero, and that stop must not turn the failure being recorded
    into "interrupted, the same command resumes" (exit 143, no record). `train` restores the handler."""
    if dist.enabled and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -- the run ------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and record one run; returns its results (status completed, failed or diverged).

    Raises InvalidOperatorError, DataError, ValueError, OSError (unwritable or full results disk),
    CheckpointError, RunLocked or IdentityConflict for what must be fixed first: all of these come
    before the run is recorded, so no record is touched. Once training starts, every failure is
    recorded instead.
    """
    t = cfg.trainer
    check_train_config(cfg)  # every field in its range (ablate/schema.py), before anything is built
    if cfg.logger.name == "wandb":
        resolve_mode(cfg.logger.mode)  # WANDB_MODE too: a mode W&B lacks, before the run folder is made
    store = RunStore(run_folder(cfg))
    # then: a folder that holds another experiment is neither trained, resumed nor reported as this
    # run (every rank reads; only rank 0's folder has files)
    store.check_identity(run_identity(cfg))
    check_recipe(cfg.optim, cfg.schedule)  # bad settings fail before a run folder exists
    reset_process_state(t.seed)  # the initial weights; nothing left over from an earlier job
    if t.threads:
        torch.set_num_threads(t.threads)
    task = task_of(cfg)
    model = task.build_model(cfg)
    dist = init_distributed(t.distributed, t.device, t.backend, t.dist_timeout_min)
    on_stop = signal.getsignal(signal.SIGTERM)  # _outcome_decided ignores it; the next job must not
    try:
        return _train(cfg, model, dist, store, task)
    finally:
        store.unlock()
        dist.close()
        if on_stop is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_stop)


def _train(cfg: DictConfig, model, dist: Dist, store: RunStore, task: Task) -> dict[str, Any]:
    t = cfg.trainer
    spec = spec_from_cfg(cfg)
    done = dist.decide(_finished_record, store, dist.world_size)
    if done is not None:
        log.info("run already %s: %s (test %s %s); nothing to do. Delete the folder or change the "
                 "config to train again.", done["status"], store.folder, task.primary,
                 _percent(done.get(f"final_test_{task.primary}")))
        return done

    # what can fail is checked before anything is written: batch, disk, device, data
    device = dist.device(t.device)
    amp = autocast(device, t.precision)
    check_batchnorm_batch(model, cfg, dist)
    dist.decide(store.preflight, checkpoint_bytes(model, cfg))
    try:
        data = build_data(cfg.data, device, seed=t.seed, rank=dist.rank, world_size=dist.world_size)
    except OSError as err:  # e.g. PIL's UnidentifiedImageError: a damaged image file
        raise DataError(f"the data cannot be read: {err}. Replace or delete the damaged file, or set "
                        "data.root= to another copy of the data set.") from err
    started_from = task.start_from(model, cfg)  # a downstream backbone's pretraining: now the data are there

    identity = scrub(run_identity(cfg))
    precision, on = effective_precision(device.type, t.precision), processor(device)
    state, checkpoint = dist.decide(_open_run, store, identity, t.resume == "auto", dist.world_size,
                                    precision)
    if state == "finished":
        log.info("run finished by another job meanwhile: %s", store.folder)
        return checkpoint
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    container = scrub({**resolved, **derived_settings(cfg)})  # config.yaml: what the run's identity reads
    if dist.is_main:
        store.write_config(OmegaConf.to_yaml(OmegaConf.create(container)))

    channels_last = device.type == "cuda" if t.channels_last is None else t.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and t.sync_bn:
        model = sync_batchnorm(model, device)
    global_batch = cfg.data.batch_size * dist.world_size
    recipe = build_recipe(model, cfg.optim, cfg.schedule, cfg.data.num_classes, global_batch, len(data.train))

    start_epoch, step, best, history, elapsed = 0, 0, None, [], 0.0
    # a run started from scratch gets a W&B run of its own: one that replaces a deleted or restarted
    # run of this folder must not resume that run's W&B history
    wandb_id = _wandb_id(f"{store.folder.resolve()}@{time.time_ns()}")
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        recipe.optimizer.load_state_dict(checkpoint["optimizer"])
        if recipe.ema is not None and checkpoint.get("ema") is not None:
            recipe.ema.load_state_dict(checkpoint["ema"])
        start_epoch, step, best = checkpoint["epoch"], checkpoint["step"], checkpoint["best"]
        # the W&B run this run started (checkpoints written before they kept it: the folder's old id)
        wandb_id = checkpoint.get("wandb_id") or _wandb_id(str(store.folder.resolve()))
        elapsed = checkpoint["elapsed_s"]
        history = checkpoint.get("history")  # None in checkpoints written before they carried it
        recipe.scheduler.step_update(step)
        if start_epoch < cfg.schedule.epochs:
            log.info("resuming %s at epoch %d/%d", store.folder, start_epoch + 1, cfg.schedule.epochs)
        else:  # stopped after its last epoch, before its record
            log.info("resuming %s: its %d epochs are checkpointed, the record is written", store.folder,
                     start_epoch)
    del checkpoint
    if dist.is_main:
        history = store.resume_metrics(start_epoch, history)
    history = dist.broadcast(history)

    forward = model
    if dist.enabled:
        # buffers are not broadcast each step: synchronised BN keeps them equal on every rank (torch
        # 2.14 renamed the flag and warns at the old name; earlier releases know only the old one)
        flag = ("forward_sync_buffers" if "forward_sync_buffers"
                in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **{flag: False})
    routes.forget_used()  # the record names this run's routes, not an earlier run's of this process
    if t.compile:  # true or a mode of torch.compile
        if task.name == "classification":  # a GPU's depth-wise routes timed eagerly, then traced
            batch = (cfg.data.batch_size, cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size)
            routes.prepare(model, batch, device, channels_last, amp)
        # static shapes: a batch size of its own (the last eval batch) compiles once more, where
        # dynamic shapes would trace every size symbolically (and inductor fails on some of them)
        forward = torch.compile(forward, mode=None if t.compile is True else t.compile, dynamic=False)
    # evaluation needs no gradient sync: the plain module (or its EMA); under DDP no collective runs
    # in it, so rank 0 alone can time inference
    evaluated = (lambda: recipe.ema.module if recipe.ema is not None  # noqa: E731
                 else (model if dist.enabled else forward))

    about = describe_run(cfg, store.folder)
    wandb_run = WandbMirror(
        folder=store.folder, project=cfg.logger.project, entity=cfg.logger.entity,
        name=store.folder.name, group=about["sweep"], job_type=about["preset"],
        tags=scrub([*container["logger"]["tags"], about["preset"], about["model"], about["data"]]),
        config={**container, **{f"axes/{k}": v for k, v in spec.axes.items()}},
        mode=cfg.logger.mode if cfg.logger.name == "wandb" and dist.is_main else "disabled",
        init_timeout=cfg.logger.init_timeout,
        run_id=wandb_id,
    )

    # a resume: the epochs trained before it, those the W&B run lacks (WandbMirror.replay)
    wandb_run.replay([(_wandb_row(row), row["step"]) for row in history if "step" in row])
    params = sum(p.numel() for p in model.parameters())
    results: dict[str, Any] = {
        "status": "running", **about, "task": task.name, **started_from,
        "stage_channels_per_group": list(model.stage_channels_per_group),
        "img_size": cfg.data.img_size, "num_classes": cfg.data.num_classes,
        "params": params, "params_m": params / 1e6, "gmac": model.macs() / 1e9,
        "epochs": cfg.schedule.epochs,
        "batch_size": cfg.data.batch_size, "world_size": dist.world_size, "global_batch_size": global_batch,
        "lr": recipe.lr, "device": str(device), "processor": on, "precision_used": precision,
        "train_size": data.train_size, "val_size": data.val_size, "test_size": data.test_size,
        **provenance(),
    }
    run_start = time.perf_counter() - elapsed
    checkpointed = start_epoch  # epochs whose checkpoint is on disk
    try:
        for epoch in range(start_epoch, cfg.schedule.epochs):
            seed_epoch(t.seed, epoch)
            data.train.set_epoch(epoch)
            stats = train_one_epoch(forward, data.train, recipe, amp, cfg, epoch, step, dist, task)
            step = stats["step"]
            val = task.evaluate(evaluated(), data.val, amp, dist)
            last = epoch == cfg.schedule.epochs - 1
            test = (task.evaluate(evaluated(), data.test, amp, dist) if t.test_every_epoch or last
                    else dict.fromkeys(task.metrics))  # not measured: null in the row
            row = {"epoch": epoch, "step": step, "train_loss": stats["train_loss"],
                   **{f"val_{m}": val[m] for m in task.metrics},
                   **{f"test_{m}": test[m] for m in task.metrics},
                   "lr": stats["lr"], "samples_per_s": stats["samples_per_s"],
                   # who timed it: a resumed run's epochs may come from another machine, and its
                   # first epoch here pays this process's warm-up (caches, kernels, compiling)
                   "processor": on, "first_of_process": epoch == start_epoch,
                   "elapsed_s": time.perf_counter() - run_start}
            # the best epoch by the task's validation metric (without a validation split: the latest)
            primary = f"val_{task.primary}"
            now_best = (best if best is not None and row[primary] <= best[primary]
                        else {k: row[k] for k in ("epoch", *_measured(task))})
            # the row, its checkpoint and the count of checkpointed epochs together: Ctrl-C waits for
            # all three (a signal held during the writes arrives as the block ends, and the message it
            # prints must count the checkpoint just written). The epoch joins the record's history only
            # once its checkpoint is saved: a save that fails (a full disk) leaves a record of the
            # epochs a resume starts from, not one more.
            with signals_deferred():
                if dist.is_main:
                    store.append_metrics(row)
                    store.save_checkpoint({
                        "model": model.state_dict(), "optimizer": recipe.optimizer.state_dict(),
                        "ema": recipe.ema.state_dict() if recipe.ema is not None else None,
                        "epoch": epoch + 1, "step": step, "best": now_best, "elapsed_s": row["elapsed_s"],
                        "world_size": dist.world_size, "identity": identity, "wandb_id": wandb_id,
                        "precision_used": precision,
                        # the rows of metrics.jsonl so far: a resume restores the file from them
                        "history": [*history, row]})
                history.append(row)
                best = now_best
                checkpointed = epoch + 1
            wandb_run.log(_wandb_row(row), step=step)
            log.info("epoch %d/%d  loss %.4f  val %s  test %s  lr %.2e  %.0f img/s  %.0f s",
                     epoch + 1, cfg.schedule.epochs, row["train_loss"], _shown(row, "val", task),
                     _shown(row, "test", task), row["lr"], row["samples_per_s"], row["elapsed_s"])
        results["status"] = "completed"
        if routes.used():  # on a GPU: the path each depth-wise shape took (ablate/ops/fast/routes.py)
            results["fast_paths"] = routes.used()
        results["inference_samples_per_s"] = inference_throughput(
            evaluated(), data.test, amp, t.inference_batches, task) if dist.is_main else None
    except Diverged as err:
        results.update(status="diverged", diverged_step=err.step,
                       error=f"diverged: {err}; the checkpoint of the last finished epoch is kept. "
                             "Lower optim.lr or set optim.clip_grad.")
        log.error("run %s", results["error"])
    except Interrupted as stop:  # Ctrl-C or SIGTERM: the checkpoint of the last finished epoch stays
        failed = dist.first_failure()  # torchrun's SIGTERM after another rank failed: that failure
        if failed is not None:
            _outcome_decided(dist)
        else:
            wandb_run.finish(exit_code=stop.code)
            name = signal.Signals(stop.signum).name
            where = (f"at epoch {checkpointed + 1} of {cfg.schedule.epochs} by {name}"
                     if checkpointed < cfg.schedule.epochs else  # only the record was missing
                     f"by {name} after its last epoch, before its record was written")
            raise stop.saying(f"interrupted {where}; {_epochs_kept(checkpointed)} in {store.folder}: the "
                              "same command resumes") from None
        results.update(status="failed", error=failed[0], traceback=failed[1])
        log.error("run failed: %s", results["error"])
    except (torch.OutOfMemoryError, MemoryError) as err:
        _outcome_decided(dist)
        error = (f"out of memory ({type(err).__name__}): lower data.batch_size (now {cfg.data.batch_size}), "
                 "use a smaller model, or on a GPU trainer.precision=bf16.")
        error, _ = dist.fail(error)  # under DDP: the rank that failed first is the cause
        results.update(status="failed", error=error)
        log.error(results["error"])
    except Exception as err:  # noqa: BLE001  recorded, not lost: a sweep goes on
        # under DDP the others' collectives then fail ("connection closed"): the record names the
        # rank that failed first, and its error
        _outcome_decided(dist)
        error, trace = dist.fail(f"{type(err).__name__}: {err}", traceback.format_exc(limit=8))
        results.update(status="failed", error=error, traceback=trace)
        log.error("run failed: %s", results["error"])

    results.update({
        "epochs_done": len(history),
        "wall_time_s": history[-1]["elapsed_s"] if history else time.perf_counter() - run_start,
        "train_samples_per_s": train_speed(history, on),
        "peak_memory_mb": peak_memory_mb(device),
        # when the record was made (UTC): orders the code versions of an experiment's seeds
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{f"best_{k}": v for k, v in (best or {}).items()},
        **{f"final_{k}": history[-1][k] for k in _measured(task) if history},
    })
    if dist.is_main:
        store.write_results(results)
    if results["status"] != "failed":  # every rank is here (a failed one may be gone): the others
        dist.barrier()  # return once the record is written, which a sweep on each rank (torchrun) reads
    dist.stop_watching()  # settled: rank 0 may now end, and the store in its process with it
    wandb_run.summary(summary_of(scrub(results)))
    wandb_run.finish(exit_code=EXIT_CODES.get(results["status"], 1))
    if not t.quiet and dist.is_main:
        print_results(results, store.folder, task)
    return results


def print_results(results: dict[str, Any], folder: Path, task: Task | None = None) -> None:
    task = task or Classification()
    rows = [("status", results["status"]), ("operator", results["operator"]),
            ("model / data", f"{results['model']} / {results['data']}"),
            ("params / GMAC", f"{results['params_m']:.3f}M / {results['gmac']:.4f}")]
    r = results
    shown = task.metrics[:2] if task.name == "classification" else (task.primary,)
    names = " / ".join(m.replace("top", "top-") for m in shown)
    if all(r.get(f"final_test_{m}") is not None for m in shown):  # null: the test split was not evaluated
        rows.append((f"test {names}", " / ".join(f"{r[f'final_test_{m}']:.2f}" for m in shown)))
    if r.get(f"best_val_{task.primary}") is not None:
        rows.append((f"best val {task.primary.replace('top', 'top-')} (epoch)",
                     f"{r[f'best_val_{task.primary}']:.2f} ({r['best_epoch'] + 1})"))
    rows += [("wall time", f"{results['wall_time_s']:.0f} s"),
             ("train / inference img/s", f"{results.get('train_samples_per_s') or 0:.0f} / "
                                         f"{results.get('inference_samples_per_s') or 0:.0f}"),
             ("results", str(folder / "results.json"))]
    if "error" in results:
        rows.append(("error", results["error"]))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


