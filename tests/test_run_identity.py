"""One run per run folder, and an epoch history that cannot shrink or lie.

A command whose run (its identity: ablate/tracking/identity.py) differs from the one its run folder
records is refused before it touches anything; a resumed run restores metrics.jsonl from the history
its checkpoint carries. Real training on small Fashion-MNIST subsets, as in test_train.py.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_train import ROOT, cfg_for, run_cli

from ablate.runs import run_folder
from ablate.tracking import RunStore
from ablate.training import train

NAMED = ["trainer.run_name=exp1", "logger=none"]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder (.lock included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_after_checkpoint(monkeypatch, epoch: int) -> None:
    """Stop training like a kill right after the checkpoint of `epoch` (1-based) is saved: no record."""
    real = RunStore.save_checkpoint

    def save_then_stop(self, state):
        real(self, state)
        if state["epoch"] == epoch:
            raise KeyboardInterrupt(f"killed after the checkpoint of epoch {epoch}")

    monkeypatch.setattr(RunStore, "save_checkpoint", save_then_stop)


def refused(proc: subprocess.Popen) -> str:
    """The command's stderr, once checked to be a short refusal (exit 2, no traceback)."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert "holds another run" in err and "trainer.run_name" in err and "delete that folder" in err
    return err


# -- a run folder holds one run -------------------------------------------------------------------
def test_a_reused_run_name_with_another_operator_is_refused_and_touches_nothing(tmp_path):
    cfg = cfg_for(tmp_path, *NAMED)
    assert train(cfg)["status"] == "completed"
    folder = run_folder(cfg)
    before = snapshot(folder)
    err = refused(run_cli(tmp_path, *NAMED, "operator=local_attention"))
    assert "operator: dwconv recorded, local_attention here" in err
    assert snapshot(folder) == before


def test_an_interrupted_run_is_not_resumed_by_another_lr_and_batch(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, *NAMED, "schedule.epochs=2")
    interrupt_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    folder = run_folder(cfg)
    before = snapshot(folder)
    assert {"config.yaml", "checkpoint.pt", "metrics.jsonl"} <= set(before) and "results.json" not in before
    err = refused(run_cli(tmp_path, *NAMED, "schedule.epochs=2", "optim.lr=0.01", "data.batch_size=32"))
    assert "optim.lr" in err and "data.batch_size: 64 recorded, 32 here" in err
    assert snapshot(folder) == before


def test_a_hand_edited_config_is_refused_naming_the_setting(tmp_path):
    cfg = cfg_for(tmp_path, *NAMED)
    assert train(cfg)["status"] == "completed"
    folder = run_folder(cfg)
    recorded = OmegaConf.load(folder / "config.yaml")
    lr = recorded.optim.lr
    recorded.optim.lr = lr * 2
    OmegaConf.save(recorded, folder / "config.yaml")
    before = snapshot(folder)
    err = refused(run_cli(tmp_path, *NAMED))  # the very command that made the run
    assert f"optim.lr: {lr * 2} recorded, {lr} here" in err
    assert snapshot(folder) == before


def test_a_sweep_mapping_two_operators_to_one_run_name_refuses_the_second(tmp_path):
    tiny = ["data.train_subset=200", "data.val_size=100", "data.test_subset=200", "data.batch_size=100",
            "schedule.epochs=1", "trainer.quiet=true", "trainer.threads=1", "trainer.inference_batches=1"]

    def sweep(operators: str) -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "ablate.train", "-m", f"trainer.results_root={tmp_path}",
             f"operator={operators}", *NAMED, *tiny], cwd=ROOT, capture_output=True, text=True,
            timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
        return proc.returncode, proc.stdout + proc.stderr

    code, out = sweep("dwconv,local_attention")
    assert code != 0, out[-3000:]
    assert "1 completed, 1 refused" in out
    assert "operator: dwconv in an earlier job, local_attention here" in out
    folder = tmp_path / "runs" / "exp1"
    record = json.loads((folder / "results.json").read_text())
    assert (record["status"], record["preset"]) == ("completed", "dwconv")
    before = snapshot(folder)
    # the finished record of another run is not this job's: refused, not "already finished"
    code, out = sweep("local_attention")
    assert code != 0, out[-3000:]
    assert "0 already finished" in out and "1 refused" in out
    assert "operator: dwconv recorded, local_attention here" in out
    assert snapshot(folder) == before


# -- the history cannot shrink or lie -------------------------------------------------------------
THREE = [*NAMED, "schedule.epochs=3"]
COMPARED_ROWS = ("epoch", "train_loss", "val_top1", "test_top1")
COMPARED_RESULTS = ("final_test_top1", "final_val_top1", "best_val_top1", "best_test_top1", "best_epoch",
                    "epochs_done")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list[dict]]:
    cfg = cfg_for(tmp_path_factory.mktemp("reference"), *THREE)
    results = train(cfg)
    assert results["status"] == "completed"
    return results, RunStore(run_folder(cfg)).read_metrics()


def cut_mid_line(text: str) -> str:
    first, second = text.splitlines()[:2]
    return text[: len(first) + 1 + len(second) // 2]


def edit_a_number(text: str) -> str:
    rows = [json.loads(line) for line in text.splitlines()]
    rows[0]["val_top1"] += 1.0
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("damage", [cut_mid_line, edit_a_number], ids=["cut", "edited"])
def test_a_damaged_history_is_rebuilt_from_the_checkpoint(tmp_path, monkeypatch, caplog, uninterrupted,
                                                           damage):
    reference, reference_rows = uninterrupted
    cfg = cfg_for(tmp_path, *THREE)
    interrupt_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    store = RunStore(run_folder(cfg))
    store.metrics.write_text(damage(store.metrics.read_text()))
    with caplog.at_level(logging.INFO):
        results = train(cfg)
    assert caplog.text.count("was damaged or edited: rebuilt from the checkpoint (2 epochs)") == 1
    assert "resuming" in caplog.text
    assert results["status"] == "completed"
    recorded = store.read_results()
    for key in COMPARED_RESULTS:
        assert recorded[key] == reference[key], key
    assert recorded["epochs_done"] == 3
    rows = store.read_metrics()
    assert [[r[k] for k in COMPARED_ROWS] for r in rows] == [[r[k] for k in COMPARED_ROWS]
                                                             for r in reference_rows]


def test_lines_after_the_checkpoint_are_dropped_quietly(tmp_path, caplog):
    store = RunStore(tmp_path)
    rows = [{"epoch": e, "val_top1": 10.0 + e} for e in range(3)]
    for row in rows:
        store.append_metrics(row)
    with open(store.metrics, "a") as f:
        f.write('{"epoch": 3, "val_')  # a kill mid-write of the next epoch's line
    with caplog.at_level(logging.WARNING):
        assert store.resume_metrics(2, rows[:2]) == rows[:2]  # the kill came before epoch 3's checkpoint
    assert store.read_metrics() == rows[:2] and not caplog.text
    # a checkpoint written before checkpoints carried the history: the file's intact rows are kept
    store.append_metrics(rows[2])
    assert store.resume_metrics(3, None) == rows


# -- the precision a run asks for is part of what it is --------------------------------------------
def test_an_explicit_precision_is_another_experiment_and_auto_keeps_the_old_identity(tmp_path):
    from ablate.runs import run_identity
    from ablate.tracking.identity import experiment_key

    auto, fp32, bf16 = (cfg_for(tmp_path, f"trainer.precision={p}") for p in ("auto", "fp32", "bf16"))
    ids = {name: run_identity(c) for name, c in (("auto", auto), ("fp32", fp32), ("bf16", bf16))}
    assert "precision" not in ids["auto"]  # default runs keep the identity (and folder) they had
    assert ids["bf16"]["precision"] == "bf16" and ids["fp32"]["precision"] == "fp32"
    assert len({experiment_key(i) for i in ids.values()}) == 3
    assert len({run_folder(c) for c in (auto, fp32, bf16)}) == 3  # a bf16 run never resumes an fp32 one
    # read back from a config.yaml (the analysis' fallback for old records): trainer.precision counts
    from ablate.tracking.identity import identity_from_config
    written = {"model": {"size": "micro"}, "trainer": {"precision": "bf16", "device": "cpu"}}
    assert identity_from_config(written, 0) == {"model": {"size": "micro"}, "precision": "bf16", "seed": 0}


def test_bf16_on_a_cpu_without_bf16_instructions_is_bad_input(tmp_path, monkeypatch):
    import ablate.training as train_module

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not train_module.cpu_has_bf16(str(flags))
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert train_module.cpu_has_bf16(str(flags))
    flags.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # Arm
    assert train_module.cpu_has_bf16(str(flags))
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="trainer.precision=bf16 needs a CPU with bf16") as err:
        train_module.autocast(torch.device("cpu"), "bf16")
    assert "trainer.precision=fp32" in str(err.value)
    assert train_module.autocast(torch.device("cpu"), "auto")() is not None  # fp32 needs nothing
