"""One run over two CPU processes: torchrun + DDP on gloo, against one process with the same global batch.

Tolerance, and why: the data of one step is the same (the loader draws an epoch's order and
augmentation before sharding, and rank r takes every 2nd sample, so the two halves of a global batch
are exactly the batch of one process), gradients are averaged over the ranks and BatchNorm is
synchronised, so the only difference is the order of float32 sums. For the Swin block (LayerNorm) that
stays at rounding level: the loss agrees to 1e-6 and the accuracies are equal. With BatchNorm on pooled
features (the dynamic predictors) float32 rounding is amplified (one process is itself ~1% off the
exact float64 gradients at init), so there the synchronisation is checked in float64, to 1e-9.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["operator=local_attention", "data.train_subset=1000", "data.val_size=500", "data.test_subset=1000",
          "schedule.epochs=2", "trainer.quiet=true", "trainer.threads=1", "logger=none", "trainer.device=cpu",
          "trainer.inference_batches=1"]
LOSS_RTOL, TOP1_ATOL = 1e-5, 0.0  # measured: loss 1e-8 apart, equal accuracies (see the docstring)


def reference_backend() -> list[str]:
    """The reference operators where the config knows backends: no compilation in a test's budget."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train")
    return ["ops.backend=reference"] if "ops" in cfg else []


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(root: Path, *overrides: str, nproc: int = 2, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_port", free_port(), "-m", "ablate.train", "trainer=ddp", *COMMON,
         f"trainer.results_root={root}", *overrides],
        cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and all its workers at once, as a preempted node (SLURM kills the cgroup)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def record(root: Path) -> dict:
    return json.loads(next(root.glob("runs/*/results.json")).read_text())


def metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in next(root.glob("runs/*/metrics.jsonl")).read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out = finish(torchrun(root, "data.batch_size=32"))
    return root, out


def test_two_processes_match_one_with_the_same_global_batch(ddp_run, tmp_path):
    root, out = ddp_run
    single = subprocess.run([sys.executable, "-m", "ablate.train", *COMMON, "data.batch_size=64",
                             f"trainer.results_root={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, one = record(root), record(tmp_path)
    assert ddp["world_size"] == 2 and ddp["global_batch_size"] == 64 and ddp["lr"] == one["lr"]
    assert ddp["train_size"] == one["train_size"] and ddp["epochs_done"] == one["epochs_done"] == 2
    for a, b in zip(metrics(root), metrics(tmp_path)):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=LOSS_RTOL)
        for key in ("val_top1", "val_top5", "test_top1", "test_top5"):
            assert abs(a[key] - b[key]) <= TOP1_ATOL, (key, a[key], b[key])
    assert ddp["final_test_top1"] > 40  # it learned


def test_only_rank_0_writes(ddp_run):
    root, out = ddp_run
    folders = list(root.glob("runs/*"))
    assert len(folders) == 1
    names = {p.name for p in folders[0].iterdir()}
    assert names == {"config.yaml", "metrics.jsonl", "results.json", "checkpoint.pt", "checkpoint.prev.pt",
                     "checkpoint.sha256", "results.sha256", ".lock"}
    assert len(metrics(root)) == 2  # one line per epoch, not one per rank
    assert out.count("epoch 2/2") == 1  # the other rank logs warnings only


def test_ddp_resumes_after_sigkill_with_the_metrics_of_an_uninterrupted_run(ddp_run, tmp_path):
    reference = record(ddp_run[0])
    proc = torchrun(tmp_path, "data.batch_size=32")
    deadline = time.time() + 240
    while time.time() < deadline:  # the first epoch is checkpointed (the metrics line comes first)
        if next(tmp_path.glob("runs/*/checkpoint.pt"), None) is not None:
            break
        time.sleep(0.1)
    kill_node(proc)
    assert len(metrics(tmp_path)) < 2, "killed too late to test"
    out = finish(torchrun(tmp_path, "data.batch_size=32"))
    assert "resuming" in out
    resumed = record(tmp_path)
    for key in ("final_test_top1", "final_test_top5", "final_val_top1", "best_val_top1", "best_epoch"):
        assert resumed[key] == reference[key], key
    assert [r["train_loss"] for r in metrics(tmp_path)] == [r["train_loss"] for r in metrics(ddp_run[0])]


def test_one_sample_per_process_trains_with_synchronised_batchnorm(tmp_path):
    """The dynamic predictors normalise pooled features: one sample per rank works only because the
    statistics are those of the global batch (in one process the same batch is a clear error)."""
    out = finish(torchrun(tmp_path, "operator=dynamic_dwconv", "data.batch_size=1", "data.train_subset=40",
                          "data.val_size=20", "data.test_subset=20", "schedule.epochs=1",
                          *reference_backend()))
    assert record(tmp_path)["status"] == "completed", out[-3000:]


SYNC_CHECK = textwrap.dedent("""
    import torch, torch.distributed as dist, torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    import ablate
    from ablate.distributed import sync_batchnorm

    def model():
        torch.manual_seed(0)
        m = ablate.create("dynamic_dwconv", "micro", in_chans=1, num_classes=10).double()
        try:
            from ablate.ops.mixer import apply_backend
            apply_backend(m, "reference")
        except ImportError:
            pass
        return m

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g).double(), torch.randint(0, 10, (8,), generator=g)
    one = model()
    F.cross_entropy(one(x), y).backward()
    synced = sync_batchnorm(model(), torch.device("cpu"))
    ddp = DistributedDataParallel(synced, broadcast_buffers=False)
    F.cross_entropy(ddp(x[rank::2]), y[rank::2]).backward()
    grad = max(((a.grad - b.grad).norm() / (b.grad.norm() + 1e-3)).item()
               for a, b in zip(synced.parameters(), one.parameters()))
    stats = max((a - b).abs().max().item()
                for a, b in zip(synced.buffers(), one.buffers()) if a.is_floating_point())
    if rank == 0:
        print(f"grad {grad:.3e} stats {stats:.3e}", flush=True)
    assert grad < 1e-9 and stats < 1e-12, (grad, stats)
    dist.destroy_process_group()
""")


def torchrun_script(folder: Path, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`code`, written to a file of `folder`, run by torchrun in 2 processes; asserts it exits 0."""
    script = folder / "script.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", free_port(), str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_synchronised_batchnorm_is_exact_in_float64(tmp_path):
    assert "grad " in torchrun_script(tmp_path, SYNC_CHECK).stdout


FOLDER = ["data=imagenet", "data.auto_augment=null", "data.train_subset=null", "data.test_subset=null",
          "data.num_classes=3", "data.img_size=32", "data.val_size=3", "data.num_workers=0",
          "data.batch_size=4", "data.eval_batch_size=4"]


def rank_first_batch(root: Path, rank: int) -> list[str]:
    """The image files rank `rank` of 2 reads first (epoch 0), by the real loader."""
    import torch

    import ablate.data.folder as folder
    from ablate.data import build_data

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*FOLDER, f"data.root={root}"])
    read, load = [], folder.default_loader
    folder.default_loader = lambda path: (read.append(path), load(path))[1]
    try:
        data = build_data(cfg.data, torch.device("cpu"), seed=cfg.trainer.seed, rank=rank, world_size=2)
        data.train.set_epoch(0)
        next(iter(data.train))
    finally:
        folder.default_loader = load
    return read


def test_a_failure_on_another_rank_is_recorded_with_its_error_not_rank_0s_symptom(tmp_path):
    """Rank 1 reads a damaged image; rank 0, waiting on it in a collective, fails only with gloo's
    "connection closed" (or is stopped by torchrun's SIGTERM). The record must name rank 1's error,
    the one to fix, not that symptom nor an interruption the same command would "resume"."""
    from tests.test_data import write_image_folder

    data = write_image_folder(tmp_path / "images")
    damaged = next(p for p in rank_first_batch(data, 1) if p not in rank_first_batch(data, 0))
    Path(damaged).write_bytes(b"not an image")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
         "-m", "ablate.train", "trainer=ddp", *COMMON, *FOLDER, f"data.root={data}",
         f"trainer.results_root={tmp_path / 'results'}"],
        cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=300)
    assert next((tmp_path / "results").glob("runs/*/results.json"), None), out[-3000:]
    result = record(tmp_path / "results")
    assert result["status"] == "failed", out[-3000:]
    assert result["error"].startswith("rank 1: DataError: ") and damaged in result["error"], result["error"]
    assert "DataError" in result["traceback"]
    assert "interrupted" not in out, out[-3000:]


WATCH_CHECK = textwrap.dedent("""
    import threading
    from ablate.distributed import init_distributed

    def watcher_running():
        return any(t.name == "ablate-peer-failures" for t in threading.enumerate())

    dist = init_distributed(True, "cpu", "gloo", timeout_min=1)
    seen = threading.Event()
    dist.watch_peers(seen.set, every_s=0.05)
    assert watcher_running()
    if dist.rank == 1:
        dist.fail("DataError: a damaged image")
        assert not seen.wait(1.0), "a rank took its own failure for a peer's"
    else:
        assert seen.wait(30), "rank 0 never heard of rank 1's failure"
        assert dist.lost_peer and dist.first_failure()[0] == "rank 1: DataError: a damaged image"
    dist.barrier()
    dist.close()

    quiet = init_distributed(True, "cpu", "gloo", timeout_min=1)  # the next job: nobody fails
    quiet.watch_peers(seen.clear, every_s=0.05)
    assert watcher_running()
    quiet.barrier()
    quiet.close()
    threading.Event().wait(0.5)
    assert not watcher_running(), "close() left the watcher running"
    print(f"rank {dist.rank} ok", flush=True)
""")


def test_a_rank_hears_of_a_peers_failure_from_the_store_and_not_of_its_own(tmp_path):
    """What ends nccl's wait on a failed peer (`Dist.watch_peers`, which aborts the communicators
    there): gloo sees the peer leave by itself, so on the CPU the watcher is held to hearing of a
    peer's failure within seconds, never taking its own rank's for one, and stopping at close()."""
    out = torchrun_script(tmp_path, WATCH_CHECK, timeout=180).stdout
    assert "rank 0 ok" in out and "rank 1 ok" in out, out


STORE_GONE_CHECK = textwrap.dedent("""
    import os, sys, threading
    rank, port = int(sys.argv[1]), sys.argv[2]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
    from ablate.distributed import init_distributed

    dist = init_distributed(True, "cpu", "gloo", timeout_min=1)  # no torchrun: rank 0 holds the store
    lost = threading.Event()
    dist.watch_peers(lost.set, every_s=0.05)
    dist.barrier()
    if rank == 0:
        os._exit(0)  # gone without a word, as a killed task
    assert lost.wait(30), "rank 1 never noticed that rank 0 and its store are gone"
    print("rank 1 ok", flush=True)
""")


def test_a_rank_whose_store_holder_is_gone_stops_waiting(tmp_path):
    """Under SLURM's tasks without torchrun the store lives in rank 0's process: once it has ended,
    no peer is left to wait for, and a rank blocked in nccl would wait out its timeout."""
    script, port = tmp_path / "store_gone.py", free_port()
    script.write_text(STORE_GONE_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    outs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert procs[1].returncode == 0 and "rank 1 ok" in outs[1], outs[1][-3000:]


def test_a_sweep_under_torchrun_trains_every_job_over_the_processes(tmp_path):
    """Each job of a sweep joins a new process group in the same processes: the second one read the
    first group's addresses from torchrun's store and failed to connect, and a rank's sweeper read the
    record before rank 0 had written it ("lost"). A relaunch finds both finished by 2 processes."""
    def sweep() -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             free_port(), "-m", "ablate.train", "-m", "trainer=ddp", *COMMON,
             "operator=dwconv,local_attention", "data.train_subset=200", "data.val_size=100",
             "data.test_subset=100", "data.batch_size=50", "schedule.epochs=1",
             f"trainer.results_root={tmp_path}"],
            cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return finish(proc)

    out = sweep()
    found = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/results.json")]
    assert [(r["status"], r["world_size"]) for r in found] == [("completed", 2)] * 2, out[-3000:]
    assert "lost" not in out
    assert "2 jobs: 2 already finished" in sweep()  # the planner knows the sweep's 2 processes


def test_ddp_stride_warnings_differing_only_where_a_size_is_1_are_silenced():
    """DDP's "Grad strides do not match bucket view strides" compares the strides of size-1
    dimensions too, where both layouts are the same memory: every DWNet run under DDP printed it for a
    1x1 convolution's weight. That case is silenced; a real mismatch is still shown. (The messages are
    DDP's, reducer.cpp; `tests/test_sweep.py` checks that a DDP run of dwconv prints none.)"""
    import warnings

    from ablate.distributed import quiet_size_one_stride_warnings

    def shown(sizes, grad, bucket):
        message = ("Grad strides do not match bucket view strides. This may indicate grad was not created "
                   "according to the gradient layout contract, or that the param's strides changed since DDP "
                   "was constructed.  This is not an error, but may impair performance.\n"
                   f"grad.sizes() = {sizes}, strides() = {grad}\n"
                   f"bucket_view.sizes() = {sizes}, strides() = {bucket} (Triggered internally at "
                   "/pytorch/torch/csrc/distributed/c10d/reducer.cpp:335.)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_size_one_stride_warnings()
            warnings.warn(message, UserWarning, stacklevel=1)
        return bool(caught)

    assert not shown([256, 512, 1, 1], [512, 1, 512, 512], [512, 1, 1, 1])  # 1x1 conv, channels_last
    assert not shown([96, 1, 7, 7], [49, 1, 7, 1], [49, 49, 7, 1])  # depth-wise, one input channel
    assert not shown([10, 1], [1, 1], [1, 10])
    assert shown([96, 32, 3, 3], [288, 1, 96, 32], [288, 9, 3, 1])  # a 3x3 kernel: a real mismatch
    assert shown([256, 512, 1, 1], [1, 256, 512, 512], [512, 1, 1, 1])
    assert shown([64, 64], [1, 64], [64, 1])


def test_a_gpu_named_by_index_or_missing_for_a_rank_is_refused_before_cuda(monkeypatch):
    """Under torchrun, trainer.device=cuda:0 put every rank on GPU 0 (NCCL then refuses two ranks on
    one GPU), and a local rank past the node's GPUs got CUDA's raw "invalid device ordinal". Both are
    refused naming the setting, before any CUDA call (PyTorch is told it has 2 GPUs: none is here)."""
    import torch

    from ablate.distributed import Dist
    from ablate.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device was called"))
    with pytest.raises(ConfigError, match=r"trainer.device=cuda:0 puts every one of the 2 processes on "
                                          r"GPU 0.*trainer.device=cuda .*CUDA_VISIBLE_DEVICES"):
        Dist(rank=1, world_size=2, local_rank=1).device("cuda:0")
    with pytest.raises(ConfigError, match=r"process 2 of this node has no GPU .* 2 GPU\(s\)"
                                          r".*--nproc_per_node 2"):
        Dist(rank=2, world_size=3, local_rank=2).device("cuda")
