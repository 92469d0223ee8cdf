"""`python -m ablate.gpu_check` (`make gpu-check`): every check a GPU needs, in one command, one report.

    python -m ablate.gpu_check --budget-s 480         # on a GPU, within 8 minutes (make gpu-check)
    python -m ablate.gpu_check --device cpu --quick   # the same steps, small, anywhere (the tests)

Steps, each a command of its own with a time limit (its output goes to log.txt):

1. `python -m ablate.bench --section models`: the presets at tiny, batch 128, bf16, channels_last,
   AdamW, eager, dwconv and timm's Swin-T beside them in the same process, first those the targets
   name, then the others; micro runs of `python -m ablate.train` (the default model on Fashion-MNIST),
   eager and four sharing the GPU (joblib);
2. the same bench compiled, the targets' models first, and a micro run compiled with CUDA graphs
   (`trainer.compile=reduce-overhead`);
3. `pytest -m gpu`: every fast path against its reference on the GPU, every preset compiled;
4. `python -m ablate.ops.fast.selfcheck`, float32 and bf16: the Triton kernels and their operators;
5. where each preset's eager step spends its time (`python -m ablate.bench --section profile`,
   torch.profiler), and the operators of stage 1 (`--section ops`).

It writes `report.md` (and `report.json`, `log.txt`, the model bench's tables in `bench-models.md`,
the other benches' `bench.md` in a folder each) in --out, rewritten after every step, so a check
stopped midway keeps what it measured. The report names the route each shape's timing chose
(ablate/ops/fast/routes.py) and ends with the targets: each measured ratio beside the value the
project holds the GPU path to.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.bench import route_rows
from ablate.cli import run_cli
from ablate.distributed import checked_device
from ablate.errors import ConfigError
from ablate.space.presets import PRESETS

__all__ = ["TARGETS", "Step", "steps", "targets", "main"]

REPO = Path(__file__).resolve().parent.parent
# The micro train step's samples/s measured on an H200 before this check existed: the yardstick of
# "not launch-bound" (a micro run at 4x, or four runs sharing the GPU at 3.5x in all).
MICRO_BEFORE = 4648.0
# a step with less time than this left of --budget-s is not started: it could not finish
MIN_STEP_S = 20.0
# what a step stopped at its limit has to stop what it started, before its process group is killed
STOP_GRACE_S = 15.0


@dataclass
class Step:
    """One command of the check; `read` turns its output folder into the report's numbers."""

    name: str
    argv: list[str]
    timeout_s: int  # on a GPU: the session's device time; a CPU check has no limit
    env: dict[str, str] = field(default_factory=dict)
    read: Callable[[Path, str], dict[str, Any]] | None = None


def _pytest_counts(_folder: Path, output: str) -> dict[str, Any]:
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}
    return {"pytest": counts}


def _selfcheck_errors(_folder: Path, output: str) -> dict[str, Any]:
    cases = re.findall(r"^(.+?)\s+max relative error (\S+) (ok|FAIL)$", output, re.M)
    return {"cases": {name.strip(): {"error": float(err), "ok": ok == "ok"} for name, err, ok in cases}}


def _bench_rows(folder: Path, _output: str) -> dict[str, Any]:
    record = json.loads((folder / "bench.json").read_text())
    meta = record["meta"]
    return {"models": record["models"], "operators": record["operators"],
            "profile": record.get("profile", []), "bench_wall_s": meta.get("wall_s"),
            "routes": meta.get("routes", {}), "routes_timing_s": meta.get("routes_timing_s")}


def _run_rates(folder: Path, _output: str) -> dict[str, Any]:
    """Every results.json under the run's folder: the train samples/s of each run (epochs after the
    first: the trainer's own figure), and their sum (runs that shared the GPU)."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]
    rates = [r.get("train_samples_per_s") for r in runs if r.get("status") == "completed"]
    return {"runs": len(runs), "completed": len(rates), "samples_per_s": rates,
            "total_samples_per_s": sum(rates) if rates else None,
            "test_top1": [r.get("final_test_top1") for r in runs]}


# The model bench's presets, in two groups a step each per mode: the models the targets' ratios name
# (the bench adds dwconv and timm's Swin-T to every group: the yardsticks, in the same process), then
# the other presets. A step stopped at its limit keeps nothing, and on a cold GPU compiling every preset
# takes minutes: so the targets' numbers come from steps that compile three or four models, not eleven.
TARGET_MODELS = {"eager": ("local_attention", "neighborhood_attention"), "compiled": ("local_attention",)}


def _model_groups(mode: str, quick: bool) -> list[tuple[str, list[str]]]:
    if quick:  # micro, the plumbing only: a small model in each group
        return [("the targets' models", ["local_attention"]), ("the other presets", ["local_mlp"])]
    targets = list(TARGET_MODELS[mode])
    return [("the targets' models", targets),
            ("the other presets", [p for p in PRESETS if p not in (*targets, "dwconv")])]


def steps(device: str, quick: bool, work: Path) -> list[Step]:
    py = sys.executable
    gpu = device.startswith("cuda")
    train = [py, "-m", "ablate.train", f"trainer.device={device}", "logger=none", "trainer.quiet=true"]
    train += (["schedule.epochs=2", "data.train_subset=1000", "data.val_size=500", "data.test_subset=500"]
              if quick else ["schedule.epochs=3"])
    bench = [py, "-m", "ablate.bench", "--device", device]
    if quick:
        bench_models = [*bench, "--quick", "--section", "models", "--sizes", "micro"]
        bench_ops = [*bench, "--quick", "--section", "ops", "--sizes", "micro", "--stages", "1"]
        bench_profile = [*bench, "--quick", "--section", "profile", "--sizes", "micro",
                         "--models", "dwconv", "local_attention"]
    else:
        bench_models = [*bench, "--section", "models", "--sizes", "tiny"]
        bench_ops = [*bench, "--section", "ops", "--sizes", "tiny", "--stages", "1", "--rounds", "5"]
        bench_profile = [*bench, "--section", "profile", "--sizes", "tiny"]

    def models_step(mode: str, group: int, timeout_s: int) -> Step:
        what, names = _model_groups(mode, quick)[group]
        folder = work / f"bench-{mode}-{'targets' if group == 0 else 'others'}"
        return Step(f"bench models, {mode}: {what}",
                    [*bench_models, "--compile", mode, "--models", *names, "--out", str(folder)], timeout_s,
                    read=_bench_rows)

    interpret = {} if gpu else {"TRITON_INTERPRET": "1"}
    selfcheck = [py, "-m", "ablate.ops.fast.selfcheck", "--device", device]
    share = 2 if quick else 4
    # The targets' steps first: a lent GPU's session is time-boxed (--budget-s), and the ratios the
    # GPU path is held to are what its next design is measured against; the cheap ones before the
    # compiled models, whose compiling may take what is left; then the correctness steps, which a CPU
    # checks too (Triton's interpreter, FlexAttention's eager form)
    listed = [
        # 180 s: on a cold GPU its prewarm compiles every route candidate of every shape of its four
        # models (Triton's 416 specialisations of all presets took 78-93 s of one core to compile for
        # sm_90 here; FlexAttention's are inductor's, on top)
        models_step("eager", 0, 180),
        Step("micro run, eager", [*train, f"trainer.results_root={work / 'eager'}"], 90, read=_run_rates),
        Step(f"micro, {share} runs sharing the device",
             [*train[:3], "-m", *train[3:], "launcher=joblib", f"hydra.launcher.n_jobs={share}",
              "trainer.seed=" + ",".join(str(s) for s in range(share)),
              f"trainer.results_root={work / 'share'}"], 120, read=_run_rates),
        models_step("eager", 1, 240),
        # on a GPU machine's cores, workers share the GPU: inductor compiles the presets side by side.
        # No route timing: it would compile every candidate at every test shape (FlexAttention's
        # twice), and the tests hold each candidate to the reference one by one (`routes.forced`)
        Step("pytest -m gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               *(["-n", "8"] if gpu else []), "tests"], 150, env={"ABLATE_TUNE_ROUTES": "0"},
             read=_pytest_counts),
        # 120 s: each dtype compiles dozens of Triton kernel variants (the cases' constants differ)
        Step("selfcheck float32", selfcheck, 120, env=interpret, read=_selfcheck_errors),
        Step("selfcheck bfloat16", [*selfcheck, "--dtype", "bfloat16"], 120, env=interpret,
             read=_selfcheck_errors),
        # then where each preset's step goes, for whoever designs the next kernel (measured before
        # designed); written model by model, so that a step stopped by its limit keeps the models
        # it profiled
        Step("bench profile", [*bench_profile, "--out", str(work / "bench-profile")], 120, read=_bench_rows),
        # 90 s: neighbourhood attention's candidates each compile at a shape the models did not take
        Step("bench operators", [*bench_ops, "--out", str(work / "bench-ops")], 90, read=_bench_rows),
    ]
    if not quick:  # compiled models and CUDA graphs: on the CPU compiling would dwarf the quick check
        listed[4:4] = [
            models_step("compiled", 0, 240),
            Step("micro run, compiled (CUDA graphs)", [*train, "trainer.compile=reduce-overhead",
                                                       f"trainer.results_root={work / 'graphs'}"],
                 150, read=_run_rates),
            models_step("compiled", 1, 300)]
    return listed


# (what, how it is computed from the report's numbers, the target it is held to)
TARGETS = [
    ("local_attention train img/s / timm Swin-T's, eager", ">=", 1.0),
    ("local_attention train img/s / timm Swin-T's, compiled", ">=", 1.0),
    ("lowest efficiency vs dwconv of any preset, eager", ">=", 0.8),
    ("dwconv compiled train img/s / compiled timm Swin-T's", ">=", 1.1),
    ("neighborhood_attention train step / local_attention's, eager", "<=", 1.3),
    ("micro run train img/s / 4648 (before), best single run", ">=", 4.0),
    ("micro runs sharing the device, img/s in all / 4648", ">=", 3.5),
]


def _model(rows: list[dict], name: str, mode: str) -> dict | None:
    wanted = name if name == "swin_tiny" else f"ablate_{name}_tiny"
    return next((r for r in rows if r["model"] == wanted and r.get("mode") == mode), None)


def _model_rows(results: dict[str, Any]) -> list[dict]:
    """The model rows of the bench's steps, eager and compiled (each mode's ratios from one process)."""
    return [row for step, numbers in results.items() if step.startswith("bench models")
            for row in numbers.get("models", [])]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value (None where its step did not run or failed)."""
    rows = _model_rows(results)

    def ratio(a, b, key="train_samples_per_sec"):
        return round(a[key] / b[key], 3) if a and b and a.get(key) and b.get(key) else None

    eager_eff = [r["efficiency_vs_dwconv"] for r in rows if r.get("mode") == "eager"
                 and r["model"] != "swin_tiny" and r.get("efficiency_vs_dwconv") is not None]
    nat, la = _model(rows, "neighborhood_attention", "eager"), _model(rows, "local_attention", "eager")
    singles = [results.get(k, {}).get("total_samples_per_s") for k in
               ("micro run, eager", "micro run, compiled (CUDA graphs)")]
    singles = [s for s in singles if s]
    shared = next((v.get("total_samples_per_s") for k, v in results.items()
                   if k.endswith("sharing the device")), None)
    values = [
        ratio(la, _model(rows, "swin_tiny", "eager")),
        ratio(_model(rows, "local_attention", "compiled"), _model(rows, "swin_tiny", "compiled")),
        min(eager_eff) if eager_eff else None,
        ratio(_model(rows, "dwconv", "compiled"), _model(rows, "swin_tiny", "compiled")),
        ratio(nat, la, "train_step_time"),
        round(max(singles) / MICRO_BEFORE, 2) if singles else None,
        round(shared / MICRO_BEFORE, 2) if shared else None,
    ]
    out = []
    for (what, op, target), value in zip(TARGETS, values):
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"target": what, "value": value, "goal": f"{op} {target}", "met": met})
    return out


def _environment(device: str) -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    for package in ("triton", "timm"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _markdown(env: dict, log: list[dict], results: dict, goals: list[dict]) -> str:
    lines = ["# GPU check", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| step | exit | seconds | result |", "|---|---:|---:|---|"]
    for entry in log:
        lines.append(f"| {entry['step']} | {entry['exit']} | {entry['seconds']:.0f} | {entry['summary']} |")
    if _model_rows(results):
        # a table per step: each step's ratios are to its own dwconv and Swin-T, timed in its process
        cols = ("model", "train_samples_per_sec", "train_vs_swin_tiny", "gmac", "efficiency_vs_dwconv",
                "peak_gib", "compile_s", "train_step_time")
        lines += ["", "## Models (train step, samples/s)"]
        for step, numbers in results.items():
            if step.startswith("bench models") and numbers.get("models"):
                lines += ["", f"### {step}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |"
                          for r in numbers["models"]]
    profiled = results.get("bench profile", {}).get("profile", [])
    if profiled:
        cols = ("model", "operator", "share", "ms_per_step", "step_ms")
        lines += ["", f"## Where an eager train step's time goes (the {PROFILE_TOP} operators of each model "
                  "with the most self time on the device; bench-profile in the bench's files has more)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |"
                  for r in _top_of_each(profiled, PROFILE_TOP)]
    chosen = {k: v for step, numbers in results.items() if step.startswith("bench")
              for k, v in numbers.get("routes", {}).items()}
    if chosen:
        lines += ["", "## Routes (the candidate each shape's timing chose)", "",
                  "| form and operands | candidate |", "|---|---|"]
        lines += [f"| {r['form and operands']} | {r['candidate']} |" for r in route_rows(chosen)]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for g in goals:
        met = "not measured" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['target']} | {'' if g['value'] is None else g['value']} | {g['goal']} | {met} |")
    return "\n".join(lines) + "\n"


PROFILE_TOP = 5


def _top_of_each(rows: list[dict], top: int) -> list[dict]:
    """The first `top` rows of each model (the bench lists each model's operators largest first)."""
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        seen[row["model"]] = seen.get(row["model"], 0) + 1
        if seen[row["model"]] <= top:
            kept.append(row)
    return kept


def _summary(name: str, numbers: dict[str, Any]) -> str:
    if "pytest" in numbers:
        return ", ".join(f"{n} {k}" for k, n in numbers["pytest"].items())
    if "cases" in numbers:
        if not numbers["cases"]:
            return "no case reported (log.txt)"
        bad = [c for c, v in numbers["cases"].items() if not v["ok"]]
        worst = max(v["error"] for v in numbers["cases"].values())
        return f"{len(numbers['cases'])} cases, largest relative error {worst:.1e}" + (
            f", failing: {', '.join(bad)}" if bad else "")
    if "models" in numbers:
        timing = numbers.get("routes_timing_s")
        profiled = len({r["model"] for r in numbers.get("profile", [])})
        return (f"{len(numbers['models'])} model rows, {len(numbers['operators'])} operator rows"
                + (f", {profiled} models profiled" if profiled else "")
                + (f", {timing} s of it timing routes" if timing else ""))
    if "runs" in numbers:
        rates = ", ".join(f"{r:.0f}" for r in numbers["samples_per_s"])
        return f"{numbers['completed']}/{numbers['runs']} runs completed; train img/s {rates}"
    return ""


def check(device: str, out: Path, quick: bool = False, only: list[str] | None = None,
          budget_s: float | None = None) -> dict[str, Any]:
    """Run the steps in order; with `budget_s`, each step gets at most the time left of it, and a step
    with under MIN_STEP_S left is not started (the report names it), so a lent GPU's session ends with
    a report of what fitted instead of a command killed midway."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    env = _environment(device)
    log: list[dict] = []
    results: dict[str, Any] = {}
    logfile, models_md = out / "log.txt", out / "bench-models.md"
    logfile.write_text("")
    models_md.unlink(missing_ok=True)  # an earlier check's, in the same --out
    with tempfile.TemporaryDirectory(prefix="ablate-gpu-check-") as tmp:
        for step in steps(device, quick, Path(tmp)):
            if only and not any(o in step.name for o in only):
                continue
            # the limits keep a GPU session within its device time; on a CPU the check tests the
            # mechanism, and a busy machine must not fail it (CI failed it so, beside other work)
            limit = step.timeout_s if device.startswith("cuda") else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < MIN_STEP_S:
                    log.append({"step": step.name, "exit": "not run", "seconds": 0.0,
                                "summary": f"not started: {max(left, 0):.0f} s of --budget-s left"})
                    print(f"gpu-check: {step.name}: not started (budget)", flush=True)
                    _write_report(out, env, log, results)
                    continue
                limit = left if limit is None else min(limit, left)
            print(f"gpu-check: {step.name} ...", flush=True)
            started = time.perf_counter()
            code, output = _run(step.argv, limit, {**os.environ, **step.env})
            seconds = time.perf_counter() - started
            with logfile.open("a") as f:
                f.write(f"\n===== {step.name} (exit {code}, {seconds:.0f} s): {' '.join(step.argv)}\n")
                f.write(output)
            numbers: dict[str, Any] = {}
            if step.read is not None:
                try:
                    numbers = step.read(Path(tmp) / _folder_of(step), output)
                except (OSError, ValueError, KeyError) as err:
                    numbers = {"unreadable": f"{type(err).__name__}: {err}"}
            # each bench's tables (its numbers are in report.json), the model steps' in one file: six
            # files in all, within what a lent GPU's session brings back (eight)
            src = Path(tmp) / _folder_of(step) / "bench.md"
            if step.name.startswith("bench models") and src.is_file():
                # under a heading per step, the bench's own headings a level down
                tables = "".join("#" + line if line.startswith("#") else line
                                 for line in src.read_text().splitlines(keepends=True))
                with models_md.open("a") as f:
                    f.write(f"# {step.name}\n\n{tables}\n")
            elif step.name.startswith("bench") and src.is_file():
                target = out / _folder_of(step) / "bench.md"
                target.parent.mkdir(exist_ok=True)
                target.write_text(src.read_text())
            results[step.name] = numbers
            summary = numbers.get("unreadable") or _summary(step.name, numbers)
            log.append({"step": step.name, "exit": code, "seconds": seconds, "summary": summary})
            print(f"gpu-check: {step.name}: exit {code} in {seconds:.0f} s; {summary}", flush=True)
            _write_report(out, env, log, results)
    _write_report(out, env, log, results)
    print((out / "report.md").read_text())
    return {"steps": log, "results": results, "targets": targets(results)}


def _run(argv: list[str], limit: float | None, env: dict[str, str]) -> tuple[int | str, str]:
    """One step's command, in a process group of its own: its exit code ("timeout" at `limit`) and
    output. At its limit the whole group gets SIGTERM (each command's run_cli stops what it started
    and exits), and SIGKILL what is left after STOP_GRACE_S; after any ending, what the step left
    running is killed. subprocess.run's timeout killed the step's own process alone: the bench's
    prewarm processes went on compiling and stepping models on the GPU beside the steps timed after
    them. (A Ctrl-C of the check still reaches them: run_cli stops its descendants, by parentage.)"""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    _signal_group(proc.pid, signal.SIGKILL)
    return code, out + err


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # none of the group is left
        os.killpg(pgid, sig)


def _write_report(out: Path, env: dict, log: list[dict], results: dict) -> None:
    """report.json and report.md as they stand: written after every step, so a check stopped midway
    keeps what it measured."""
    goals = targets(results)
    (out / "report.json").write_text(json.dumps(
        {"environment": env, "steps": log, "results": results, "targets": goals}, indent=1))
    (out / "report.md").write_text(_markdown(env, log, results, goals))


def _folder_of(step: Step) -> str:
    """The folder a step writes under the check's temporary folder (its --out or results root)."""
    for arg in step.argv:
        if arg.startswith("trainer.results_root="):
            return Path(arg.split("=", 1)[1]).name
    if "--out" in step.argv:
        return Path(step.argv[step.argv.index("--out") + 1]).name
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ablate.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the steps' plumbing, small)")
    p.add_argument("--out", default="reports/gpu-check", help="folder for report.md, report.json, log.txt")
    p.add_argument("--quick", action="store_true", help="small versions of every step")
    p.add_argument("--only", nargs="+", help="run the steps whose names contain one of these words")
    p.add_argument("--budget-s", type=float, help="seconds for the whole check: each step gets at most "
                   "what is left, and steps that no longer fit are not started (the report names them)")
    a = p.parse_args(argv)
    if a.budget_s is not None and not a.budget_s > 0:  # (nan too)
        raise ConfigError(f"--budget-s must be a positive number of seconds, got {a.budget_s}")
    try:
        device = str(checked_device(a.device, "--device"))  # "auto" becomes cuda or cpu
    except ConfigError as err:
        raise ConfigError(f"{err} (`python -m ablate.gpu_check --device cpu --quick` runs the check's "
                          "steps small on this machine)") from None
    names = [s.name for s in steps(device, a.quick, Path(a.out))]
    for word in a.only or []:  # a word matching nothing ran no step and passed: a GPU session spent
        if not any(word in name for name in names):
            raise ConfigError(f"--only {word}: no step's name contains it; the steps: {', '.join(names)}")
    done = check(device, Path(a.out), a.quick, a.only, a.budget_s)
    failed = [s["step"] for s in done["steps"] if s["exit"] != 0]
    if failed:
        print(f"gpu-check: {len(failed)} step(s) did not finish cleanly: {', '.join(failed)} (log.txt)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
