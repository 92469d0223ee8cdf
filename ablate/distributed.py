"""One run over several processes: torchrun + DistributedDataParallel (nccl on GPUs, gloo on CPUs).

    torchrun --nproc_per_node 4 -m ablate.train trainer=ddp ...              # 4 GPUs of one machine
    torchrun --nproc_per_node 2 -m ablate.train trainer=ddp trainer.device=cpu ...   # CPU, gloo

What the training loop needs to know is here: which rank this process is (`Dist`), how ranks agree
on a value or an error, and BatchNorm synchronised across ranks. The rules the loop follows:
- every rank builds the same model from the same seed and sees its share of every batch
  (`build_data(..., rank=, world_size=)`); `data.batch_size` is per process;
- only rank 0 writes the results store, checkpoints and W&B; a decision that reads the store
  (finished? which checkpoint?) is made by rank 0 and broadcast, so the ranks never disagree;
- metrics are all-reduced, so every rank holds the same numbers;
- a rank that fails tells the process group's store before it leaves (`fail`): the ranks waiting on it
  then fail only with "connection closed" (or torchrun stops them with SIGTERM), and rank 0 records
  the error of the rank that failed first, not that symptom; under nccl, which does not see a peer
  leave, each rank watches the store for that and aborts its communicators (`Dist.watch_peers`).
Under SLURM without torchrun (one task per GPU, e.g. submitit's tasks_per_node), the SLURM variables
stand in for torchrun's (submitit_local's tasks likewise).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ablate.errors import ConfigError

__all__ = ["DEVICE_ENV", "Dist", "CpuSyncBatchNorm", "checked_device", "processor", "init_distributed",
           "sync_batchnorm", "pooled_batchnorms", "quiet_size_one_stride_warnings"]

log = logging.getLogger(__name__)

_GROUPS = itertools.count()  # process groups this process has joined: every rank joins the same ones

# Errors a rank-0 decision may raise, re-raised with the same type on every rank.
_SHARED_ERRORS: dict[str, type[Exception]] = {}


def share_error_type(*types: type[Exception]) -> None:
    for t in types:
        _SHARED_ERRORS[t.__name__] = t


share_error_type(ValueError, OSError, RuntimeError)


DEVICE_ENV = "ABLATE_DEVICE"


def checked_device(name: str, key: str) -> torch.device:
    """The device `name` on this machine, or a ConfigError naming the setting `key`: not cpu or cuda,
    a CUDA device where PyTorch sees no GPU, or an index past the GPUs there are.

    "auto" is $ABLATE_DEVICE where it is set (cpu, cuda, cuda:<index>), else a GPU where there is
    one: one variable pins every command's default device on a machine (a GPU machine reproducing
    CPU numbers; the test suite, whose CPU tests must test the CPU on any machine)."""
    if name == "auto":
        pinned = os.environ.get(DEVICE_ENV, "").strip()
        if pinned and pinned != "auto":
            try:
                return checked_device(pinned, DEVICE_ENV)
            except ConfigError as err:
                auto = f"{key} auto" if key.startswith("-") else f"{key}=auto"
                raise ConfigError(f"{err} ({auto} reads {DEVICE_ENV}: set it to a device of this "
                                  "machine, or unset it)") from None
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setting = f"{key} {name}" if key.startswith("-") else f"{key}={name}"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting}: ablate runs on cpu, cuda or cuda:<index>")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}, but PyTorch sees no CUDA GPU on this machine; use cpu")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{setting}, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
    return device


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Hardware") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def processor(device: torch.device) -> str:
    """What a run's speed was measured on: the GPU's name ("NVIDIA H200"), or the CPU's model, the
    instruction set PyTorch's kernels use on it and the threads it ran with ("AMD EPYC, AVX2, 2
    threads"). Throughputs are comparable only between runs on the same processor (analysis); the
    instruction set also changes float rounding in oneDNN's and the native kernels, and so a CPU
    run's trained numbers, within their seeds' spread."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    threads = torch.get_num_threads()
    return (f"{_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{threads} thread{'s' if threads != 1 else ''}")


@dataclass
class Dist:
    """This process's place in the run. `world_size == 1`: one process, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    run_key: str = ""  # this process group's keys in the store (a store outlives jobs and restarts)
    failed: bool = False  # this rank has told the others it failed (`fail`)
    lost_peer: bool = False  # `watch_peers` saw another rank fail, or the store go, first
    _watching: threading.Event | None = field(default=None, repr=False)  # set: stop watching the peers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, name: str) -> torch.device:
        """The device of this rank: `auto` / `cuda` become cuda:<local rank> under torchrun. A GPU
        named by index would be every rank's (NCCL refuses two ranks on one GPU): a ConfigError."""
        device = checked_device(name, "trainer.device")
        if device.type == "cuda" and self.enabled:
            if device.index is not None:
                raise ConfigError(
                    f"trainer.device={name} puts every one of the {self.world_size} processes on GPU "
                    f"{device.index}: set trainer.device=cuda (each process takes the GPU of its local rank) "
                    "and choose the GPUs with CUDA_VISIBLE_DEVICES")
            _check_local_gpu(self.local_rank)
        if device.type == "cuda" and device.index is None:  # set_device needs an index
            device = torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    # -- agreeing ---------------------------------------------------------------------------------
    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled; for decisions and small states)."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, fn, *args, **kwargs) -> Any:
        """Run `fn` on rank 0 only and give its result to every rank; an error it raises is raised on
        every rank, with its type and message, so no rank waits for a peer that gave up."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except Exception as err:  # noqa: BLE001  re-raised below, on every rank
                if not self.enabled:
                    raise
                outcome = ("error", type(err).__name__, str(err))
        outcome = self.broadcast(outcome)
        if outcome[0] == "ok":
            return outcome[1]
        raise _SHARED_ERRORS.get(outcome[1], RuntimeError)(outcome[2])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (counts and loss sums stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank (pickled: detections)."""
        if not self.enabled:
            return list(items)
        parts: list = [None] * self.world_size
        tdist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    # -- failing ----------------------------------------------------------------------------------
    def fail(self, error: str, trace: str | None = None) -> tuple[str, str | None]:
        """Tell the other ranks that this one failed with `error` (and its traceback); returns the
        (error, traceback) of the rank that failed first: this one's, or an earlier one's, named by
        its rank. The first to fail is the cause; the ranks that then fail are waiting on it."""
        if not self.enabled:
            return error, trace
        self.failed = True  # before the store hears of it: this rank's watcher must not take it for a peer's
        try:
            store = tdist.distributed_c10d._get_default_store()
            order = store.add(f"{self.run_key}/failures", 1)
            told = {"rank": self.rank, "error": error, "traceback": trace}
            store.set(f"{self.run_key}/failure/{order}", json.dumps(told))
            return self._told(store, 1) if order > 1 else (error, trace)
        except Exception as err:  # noqa: BLE001  no store (torchrun gone), or the first rank died
            log.warning("could not tell the other ranks of the failure, or learn theirs: %s", err)
            return error, trace

    def first_failure(self) -> tuple[str, str | None] | None:
        """The (error, traceback) of the rank that failed first, None where none failed: torchrun
        stops the other ranks with SIGTERM when one fails, which is then that failure, not a stop."""
        if not self.enabled:
            return None
        try:
            store = tdist.distributed_c10d._get_default_store()
            if not store.check([f"{self.run_key}/failures"]):  # made by the first rank that failed
                return None
            return self._told(store, 1)
        except Exception:  # noqa: BLE001  no store: nothing was told
            return None

    def _told(self, store, order: int) -> tuple[str, str | None]:
        store.wait([f"{self.run_key}/failure/{order}"], timedelta(seconds=30))  # set just after the count
        told = json.loads(store.get(f"{self.run_key}/failure/{order}"))
        return f"rank {told['rank']}: {told['error']}", told["traceback"]

    def watch_peers(self, on_lost: Callable[[], None], every_s: float = 2.0) -> None:
        """Call `on_lost`, from a thread of its own, once another rank has told the store that it
        failed (`fail`) while this one has not, or once the store itself is gone (it lived in rank 0's
        process, under SLURM's tasks, and that process has ended): either way no peer is left to
        wait for. Stopped by `stop_watching` (and `close`). nccl, unlike gloo, does not see a peer
        leave: a rank waiting on the failed one in a collective (blocked in CUDA, where no Python
        signal handler runs) would wait out trainer.dist_timeout_min, and then nccl's watchdog ends
        the process before rank 0 writes the record. `init_distributed` aborts the communicators here
        instead (`_abort_nccl`): the waiting collective raises, and the failure is recorded."""
        if not self.enabled or self._watching is not None:
            return
        store = tdist.distributed_c10d._get_default_store()
        key, stop = f"{self.run_key}/failures", threading.Event()

        def watch() -> None:
            while not stop.wait(every_s):
                try:
                    if not store.check([key]):
                        continue
                except Exception:  # noqa: BLE001  the store is gone with the process that held it
                    pass
                if not (self.failed or stop.is_set()):  # this rank's own failure was told by itself
                    self.lost_peer = True
                    on_lost()
                return

        self._watching = stop
        threading.Thread(target=watch, name="ablate-peer-failures", daemon=True).start()

    def stop_watching(self) -> None:
        """The run's outcome is settled (its last collective passed): a peer that now ends, and the
        store with it, is no failure."""
        if self._watching is not None:
            self._watching.set()

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def _comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def close(self) -> None:
        self.stop_watching()
        if self.enabled and tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except Exception as err:  # noqa: BLE001  only after an abort: the group is dropped anyway
                if not self.lost_peer:
                    raise
                log.warning("the process group, aborted after a peer failed, did not close cleanly: %s", err)


def _abort_nccl(group: tdist.ProcessGroup) -> None:
    """A peer failed (or ended) while this rank may be waiting on it in an nccl collective: abort the
    communicators of `group` (the run's; a later job of a sweep has its own), so that the wait raises
    and this rank records the peer's error (`Dist.fail`)."""
    log.error("another rank failed or ended: aborting this rank's nccl communicators so that it stops "
              "waiting on it and the run's record names that rank's error")
    try:
        group.abort()
    except Exception as err:  # noqa: BLE001  already destroyed: this rank was not waiting
        log.warning("could not abort the nccl communicators: %s", err)


def _slurm_env() -> None:
    """Under SLURM with one task per GPU and no torchrun, derive torchrun's variables; so too under
    submitit_local's tasks (`hydra.launcher.tasks_per_node`), which would otherwise each train the
    run alone, one process each (and all but one refused its folder)."""
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or "1"
    if "RANK" in os.environ or int(tasks) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _check_local_gpu(local_rank: int) -> None:
    """A process per GPU: a local rank past the node's GPUs was CUDA's "invalid device ordinal"."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"process {local_rank} of this node has no GPU of its own: the node has {count} "
                          f"GPU(s); start at most {count} processes per node (torchrun --nproc_per_node "
                          f"{count}, or SLURM's tasks per node), or use trainer.device=cpu")


def init_distributed(enabled: bool, device_name: str, backend: str = "auto", timeout_min: float = 30) -> Dist:
    """The Dist of this process; with `enabled` and torchrun's (or SLURM's) variables set, joins the
    process group. `enabled` without them is a run of one process (and says so)."""
    if not enabled:
        return Dist()
    _slurm_env()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        log.warning("trainer.distributed=true but this process was not started by torchrun (no RANK / "
                    "WORLD_SIZE): training in one process. Launch with `torchrun --nproc_per_node N -m "
                    "ablate.train trainer=ddp ...` to use N processes.")
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return Dist(rank, world, local)
    on_gpu = checked_device(device_name, "trainer.device").type == "cuda"
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"trainer.backend must be auto, nccl or gloo; got {backend!r}")
    if backend == "nccl":
        if not on_gpu:
            raise ValueError("trainer.backend=nccl needs a GPU: use trainer.backend=gloo (or auto) on CPUs")
        _check_local_gpu(local)
        torch.cuda.set_device(local)
    if tdist.is_initialized():  # a second job in one process (launchers reuse processes)
        tdist.destroy_process_group()
    # env:// as init_process_group reads it, but with keys of this group's own in the store: torchrun's
    # store outlives a destroyed group, and the next job of a sweep under torchrun read the previous
    # group's addresses and failed to connect ("Gloo connectFullMesh failed")
    timeout = timedelta(minutes=timeout_min)
    store, _, _ = next(tdist.rendezvous("env://", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    store = tdist.PrefixStore(f"default_pg/ablate-{next(_GROUPS)}", store)
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    quiet_size_one_stride_warnings()
    dist = Dist(rank, world, local, backend)
    dist.run_key = f"ablate/{dist.broadcast(uuid.uuid4().hex)}"
    if backend == "nccl":  # gloo sees a failed peer leave, and its waiting collective raises by itself
        group = tdist.distributed_c10d._get_default_group()
        dist.watch_peers(lambda: _abort_nccl(group))
    return dist


def quiet_size_one_stride_warnings(max_dims: int = 5) -> None:
    """DDP warns, once, when a gradient's strides differ from its bucket's ("... may impair
    performance"), and compares the strides of dimensions of size 1 too, where both layouts address the
    same memory: the weight of a 1x1 convolution whose gradient comes from a channels_last map (every
    DWNet block's), a depth-wise weight's one input channel. That warning is silenced; one whose strides
    differ where a size is not 1 (a strided copy into the bucket each step) is still shown."""
    for dims in range(1, max_dims + 1):
        sizes = r"\[" + ", ".join(rf"(?:1|(?P<n{i}>\d+))" for i in range(dims)) + r"\]"
        grad = r"\[" + ", ".join(rf"(?(n{i})(?P<g{i}>\d+)|\d+)" for i in range(dims)) + r"\]"
        bucket = r"\[" + ", ".join(rf"(?(n{i})(?P=g{i})|\d+)" for i in range(dims)) + r"\]"
        warnings.filterwarnings(
            "ignore", category=UserWarning,
            message=(r"Grad strides do not match bucket view strides[\s\S]*?grad\.sizes\(\) = (?P<sizes>"
                     rf"{sizes}), strides\(\) = {grad}\s*bucket_view\.sizes\(\) = (?P=sizes), "
                     rf"strides\(\) = {bucket}"))


# -- BatchNorm across ranks -----------------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """y = the sum of x over ranks; the gradient of each rank's x is the sum of the ranks' gradients
    of y (every rank's loss depends on every rank's x through y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        tdist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch over all ranks, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one is written with an autograd-aware sum over ranks
    (`_SumOverRanks`), so its backward is exact too, on gloo. Two passes
    (mean, then the mean squared deviation) as F.batch_norm does, so the statistics agree with one
    process holding the whole batch to float rounding. Same parameters and buffers as BatchNorm2d:
    checkpoints move freely between single-process and DDP runs.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and tdist.is_available() and tdist.is_initialized()
                and tdist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1].detach()
        if n.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n.item())} "
                             "over all ranks")
        mean = total[:-1] / n
        centred = x - mean.reshape(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` synchronised over the ranks: torch's SyncBatchNorm on GPUs (nccl),
    CpuSyncBatchNorm elsewhere. Parameters, buffers and state-dict keys are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CpuSyncBatchNorm):
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            # the very same parameters and buffers: an optimizer built before still holds them
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(model, name, sync)
        else:
            sync_batchnorm(child, device)
    return model


@torch.no_grad()
def pooled_batchnorms(model: nn.Module, in_chans: int, img_size: int) -> list[str]:
    """Names of the BatchNorms that see one value per channel per sample (on globally pooled
    features, as in the dynamic weight predictors): with a batch of one they cannot normalise.
    Found by one eval-mode forward of a single blank image (shapes only; no statistic changes)."""
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.append(name) if args[0][0].numel() == args[0].shape[1] else None)
        for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sorted(set(seen))


def average_scalar(dist: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a 0-d tensor (the global batch's mean loss)."""
    if not dist.enabled:
        return value
    value = value.detach().clone()
    tdist.all_reduce(value)
    return value / dist.world_size

