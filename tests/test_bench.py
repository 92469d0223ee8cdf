"""`python -m ablate.bench` in its quick mode: the files, their columns, the table. No timing checks:
the CPU is shared, so timings are only measured, never asserted."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from ablate.bench import (
    MODEL_COLUMNS,
    OP_COLUMNS,
    OPERATORS,
    PASSES,
    BenchArgs,
    Candidate,
    _time_candidates,
    main,
    run,
)
from ablate.space.presets import PRESETS


def test_quick_bench_writes_csv_json_and_markdown(tmp_path, capsys):
    run(BenchArgs(device="cpu", out=str(tmp_path), quick=True, sizes=("micro",), stages=(1,),
                  models=("dwconv", "local_attention")))
    for name in ("operators.csv", "models.csv", "bench.json", "bench.md"):
        assert (tmp_path / name).is_file()

    with open(tmp_path / "operators.csv") as f:
        ops = list(csv.DictReader(f))
    assert {r["operator"] for r in ops} == set(OPERATORS)
    for column in ("candidate", "baseline", "peak_mb", *(f"{p}_ms" for p in PASSES),
                   *(f"{p}_speedup" for p in PASSES)):
        assert column in ops[0]
    for op in OPERATORS:  # one baseline (speedup 1) and both ablate backends per operator
        rows = [r for r in ops if r["operator"] == op]
        names = {r["candidate"] for r in rows}
        assert {"ablate reference", "ablate fast"} <= names
        assert sum(r["candidate"] == r["baseline"] for r in rows) == 1
        assert all(float(r["fwd_bwd_ms"]) > 0 for r in rows)

    with open(tmp_path / "models.csv") as f:
        models = list(csv.DictReader(f))
    assert [r["model"] for r in models] == ["ablate_dwconv_micro", "ablate_local_attention_micro"]
    assert float(models[0]["efficiency_vs_dwconv"]) == 1.0  # dwconv is the yardstick
    efficiency = float(models[1]["train_samples_per_sec"]) * float(models[1]["gmac"]) / (
        float(models[0]["train_samples_per_sec"]) * float(models[0]["gmac"]))
    # from the CSV's rounded columns: equal up to the printed efficiency's last digit plus what rounding
    # the GMAC (4 decimals) and samples/s (2 decimals) can move the recomputed ratio
    relative = sum(5e-5 / float(m["gmac"]) + 5e-3 / float(m["train_samples_per_sec"]) for m in models[:2])
    assert abs(float(models[1]["efficiency_vs_dwconv"]) - efficiency) <= 0.0051 + efficiency * relative
    assert efficiency > 0
    for column in ("infer_samples_per_sec", "train_samples_per_sec", "infer_batch_size", "train_img_size",
                   "param_count"):
        assert column in models[0]

    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["meta"]["machine"]["cpu_threads"] >= 1
    assert len(record["operators"]) == len(ops) and len(record["models"]) == 2
    table = (tmp_path / "bench.md").read_text()
    assert all(c in table for c in ("fwd_bwd_speedup", "train_samples_per_sec"))
    assert "train_samples_per_sec" in capsys.readouterr().out
    assert set(MODEL_COLUMNS) - {"train_vs_swin_tiny", "train_speedup_bf16"} <= set(models[0])
    assert set(OP_COLUMNS) - set(ops[0]) <= {"fwd_gbps", "fwd_copy_fraction", "fwd_bwd_copy_fraction"}


def test_cli_sections(tmp_path):
    assert main(["--device", "cpu", "--quick", "--section", "ops", "--sizes", "micro", "--stages", "4",
                 "--ops", "dwconv", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "operators.csv").is_file() and not (tmp_path / "models.csv").exists()


@pytest.mark.parametrize("flag,value", [("--stages", "5"), ("--stages", "0"), ("--batch", "0"),
                                        ("--batch", "-1"), ("--model-batch", "0"), ("--rounds", "0"),
                                        ("--rounds", "-2"), ("--prewarm", "-1")])
def test_a_count_out_of_range_is_refused_naming_its_flag(tmp_path, capsys, flag, value):
    """A stage the sizes lack or a count below 1 is a line and exit 2 before anything is measured:
    not an IndexError or a negative tensor's traceback, nor a 0 that silently became the default
    (`--batch 0` ran batch 4) or a stage 0 that was stage 4 under another name."""
    with pytest.raises(SystemExit) as stopped:
        main(["--device", "cpu", "--quick", "--section", "ops", "--sizes", "micro", "--ops", "dwconv",
              flag, value, "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_timms_swin_tiny_is_timed_at_tiny_only(tmp_path, capsys):
    """timm's swin_tiny is built for 224 px: `--models swin_tiny` at micro stopped the bench with timm's
    AssertionError. It stands beside the tiny models only, and asked for without tiny it is refused."""
    from ablate.bench import _models_of

    args = BenchArgs(models=("swin_tiny", "local_attention"))
    assert _models_of(args, "micro") == ["dwconv", "local_attention"]
    assert _models_of(args, "tiny") == ["dwconv", "swin_tiny", "local_attention"]
    with pytest.raises(SystemExit) as stopped:
        main(["--device", "cpu", "--quick", "--section", "models", "--sizes", "micro",
              "--models", "swin_tiny", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "--models swin_tiny" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_an_out_that_is_a_file_is_refused_before_anything_is_measured(tmp_path, capsys):
    """The full bench takes minutes: a bad --out is found at its start, not when the tables are written."""
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(FileExistsError):
        main(["--device", "cpu", "--quick", "--section", "ops", "--sizes", "micro", "--stages", "4",
              "--ops", "dwconv", "--out", str(afile)])
    assert "operators:" not in capsys.readouterr().out


def test_vs_bf16_times_the_bf16_train_step_beside_the_fp32_one(tmp_path):
    assert main(["--device", "cpu", "--quick", "--section", "models", "--sizes", "micro", "--models",
                 "dwconv", "--vs-bf16", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "models.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["train_speedup_bf16"]) > 0
    assert "train_speedup_bf16" in (tmp_path / "bench.md").read_text()


def test_an_explicit_rounds_count_times_the_models_that_many_rounds(tmp_path, capsys):
    """The README's model efficiencies come from `--rounds 5`: the CPU's default of 2 model rounds
    must not silently replace it (one warm-up round, then the timed ones)."""
    assert main(["--device", "cpu", "--section", "models", "--sizes", "micro", "--models", "dwconv",
                 "--model-batch", "2", "--rounds", "3", "--out", str(tmp_path)]) == 0
    assert "models micro eager round 4/4" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["rounds"] == 3


def test_the_readme_quick_bench_runs_to_the_end(tmp_path):
    """`make bench ARGS="--quick"` as the README writes it: every section, size and preset (it used to
    stop at micro stage 3, where timm's window attention was built for a window larger than the map)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert 'make bench` (`python -m ablate.bench`; `ARGS="--quick"`' in readme
    assert main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "models.csv") as f:
        models = list(csv.DictReader(f))
    assert {re.sub(r"^ablate_|_(micro|tiny)$", "", r["model"]) for r in models} >= set(PRESETS)
    assert all(r["efficiency_vs_dwconv"] for r in models if r["model"] != "swin_tiny")



def test_the_readmes_model_commands_name_the_optimizer_their_numbers_were_measured_with():
    """The train step's optimizer is AdamW by default since `--optimizer` came (2026-12-06); the README's
    model-level numbers from before it were measured with SGD, and the commands shown beside them ran
    AdamW. A models command names `--optimizer sgd` unless its paragraph says AdamW."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    checked = 0
    for paragraph in re.split(r"\n\s*\n", readme):
        for command in re.findall(r"`python -m ablate\.bench ([^`]*)`", paragraph.replace("\n", " ")):
            if "--section models" in command and "AdamW" not in paragraph:
                assert "--optimizer sgd" in command, command
                checked += 1
    assert checked >= 4


def test_the_profile_splits_each_models_step_by_operator(tmp_path):
    """--section profile: each model's eager train step by PyTorch operator, largest self time first,
    the ten largest and a row for the rest, whose shares of the step sum to 1."""
    assert main(["--device", "cpu", "--quick", "--section", "profile", "--sizes", "micro", "--models",
                 "dwconv", "idynamic_dwconv", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["profile"]
    assert not record["models"] and not record["operators"]
    for model in ("ablate_dwconv_micro", "ablate_idynamic_dwconv_micro"):
        mine = [r for r in rows if r["model"] == model]
        assert len(mine) == 11 and mine[-1]["operator"].startswith("the other ")
        times = [r["ms_per_step"] for r in mine[:-1]]
        assert times == sorted(times, reverse=True)
        assert abs(sum(r["share"] for r in mine) - 1) < 0.01
        assert abs(sum(r["ms_per_step"] for r in mine) - mine[0]["step_ms"]) < 0.05 * mine[0]["step_ms"]
    assert any("convolution" in r["operator"] for r in rows)
    assert "## Where an eager train step's time goes" in (tmp_path / "bench.md").read_text()


def test_a_forward_only_candidate_is_timed_forward_only():
    """A kernel without a backward (the GPU's naive Triton candidate) gets its forward timed beside the
    others and no backward columns, instead of stopping the bench at its first backward."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)

    def setup(with_backward: bool):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xf, wf = (xi, wi) if with_backward else (xi.detach(), wi.detach())
        return (lambda: F.conv2d(xf, wf, padding=1, groups=4)), [xi], [wi]

    cands = [Candidate("conv", lambda: setup(True), baseline=True),
             Candidate("forward only", lambda: setup(False), passes=("fwd",))]
    result = _time_candidates(cands, torch.device("cpu"), rounds=2, warmup=1)
    assert set(result["conv"]["median"]) == set(PASSES)
    assert set(result["forward only"]["median"]) == {"fwd"} and result["forward only"]["median"]["fwd"] > 0


def test_models_compiled_after_a_prewarm_process(tmp_path):
    """--compile both: eager and compiled rows of each model, timed in one process; the compiled
    graphs were first built by a prewarm process (inductor's disk cache), which is what keeps a GPU
    bench of a dozen compiled models within minutes."""
    assert main(["--device", "cpu", "--quick", "--section", "models", "--sizes", "micro", "--models",
                 "dwconv", "--compile", "both", "--prewarm", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "models.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["mode"]) for r in rows] == [("ablate_dwconv_micro", "eager"),
                                                       ("ablate_dwconv_micro", "compiled")]
    assert rows[0]["compile_s"] == "" and float(rows[1]["compile_s"]) >= 0
    assert all(float(r["train_samples_per_sec"]) > 0 and float(r["peak_gib"]) > 0 for r in rows)


def test_the_eager_rows_are_written_before_the_compiled_models_start(tmp_path, monkeypatch):
    """A GPU bench of both modes spends most of its time compiling; stopped there (gpu-check's time
    limit), it kept nothing when the tables were written only at the end."""
    from ablate import bench

    measured = bench.model_rows

    def compiled_never_ends(*args, compiled=False, **kwargs):
        if compiled:
            raise KeyboardInterrupt  # the step's limit, while compiling
        return measured(*args, compiled=compiled, **kwargs)

    monkeypatch.setattr(bench, "model_rows", compiled_never_ends)
    with pytest.raises(KeyboardInterrupt):
        run(BenchArgs(device="cpu", out=str(tmp_path), quick=True, section="models", sizes=("micro",),
                      models=("dwconv",), compile="both", prewarm=0))
    rows = json.loads((tmp_path / "bench.json").read_text())["models"]
    assert [(r["model"], r["mode"]) for r in rows] == [("ablate_dwconv_micro", "eager")]
    assert "ablate_dwconv_micro" in (tmp_path / "bench.md").read_text()


def test_gpu_check_runs_every_step_and_writes_one_report(tmp_path):
    """`make gpu-check`'s steps, small and on the CPU (Triton's interpreter, the bench, micro runs,
    runs sharing the device): the command a GPU session runs works before the GPU is lent."""
    from ablate import gpu_check

    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [s.name for s in gpu_check.steps("cpu", True, tmp_path)]
    assert all(s["exit"] == 0 for s in report["steps"])
    results = report["results"]
    assert all(case["ok"] for case in results["selfcheck float32"]["cases"].values())
    # the targets' models, then the others: each group beside dwconv, in a process of its own
    assert {r["model"] for r in results["bench models, eager: the targets' models"]["models"]} == {
        "ablate_dwconv_micro", "ablate_local_attention_micro"}
    assert {r["model"] for r in results["bench models, eager: the other presets"]["models"]} == {
        "ablate_dwconv_micro", "ablate_local_mlp_micro"}
    assert results["micro, 2 runs sharing the device"]["completed"] == 2
    assert {r["model"] for r in results["bench profile"]["profile"]} == {"ablate_dwconv_micro",
                                                                          "ablate_local_attention_micro"}
    assert [t["target"] for t in report["targets"]] == [t[0] for t in gpu_check.TARGETS]
    text = (tmp_path / "report.md").read_text()
    assert "## Targets" in text and "micro run, eager" in text and (tmp_path / "log.txt").stat().st_size > 0
    assert "## Where an eager train step's time goes" in text
    assert "### bench models, eager: the other presets" in text
    models_md = (tmp_path / "bench-models.md").read_text()
    assert "# bench models, eager: the targets' models" in models_md and "ablate_local_mlp_micro" in models_md
    # what comes back from a lent GPU: at most eight files
    assert len([f for f in tmp_path.rglob("*") if f.is_file()]) <= 8


def test_gpu_checks_model_bench_times_the_targets_models_first_and_every_preset_once_a_mode(tmp_path):
    """On a GPU the model bench runs per mode in two steps: the models the targets name (a few to
    compile, so a cold GPU's session gets their ratios) before every other step of that mode's bench,
    then the other presets; each preset is timed once a mode, and dwconv and Swin-T are in both
    (the bench adds them: the yardsticks of each process's ratios)."""
    from ablate import gpu_check
    from ablate.space.presets import PRESETS

    listed = gpu_check.steps("cuda", False, tmp_path)
    names = [s.name for s in listed]
    for mode in ("eager", "compiled"):
        mine = [(i, s) for i, s in enumerate(listed) if s.name.startswith(f"bench models, {mode}")]
        assert [s.name.split(": ")[1] for _, s in mine] == ["the targets' models", "the other presets"]
        groups = [s.argv[s.argv.index("--models") + 1:s.argv.index("--out")] for _, s in mine]
        assert set(groups[0]) == set(gpu_check.TARGET_MODELS[mode])
        assert sorted(groups[0] + groups[1] + ["dwconv"]) == sorted(PRESETS)
        assert all(s.argv[s.argv.index("--compile") + 1] == mode for _, s in mine)
        assert len({gpu_check._folder_of(s) for _, s in mine}) == 2
    # the targets' steps before the other presets' and before the correctness steps
    first_compiled = names.index("bench models, compiled: the targets' models")
    assert names.index("bench models, eager: the targets' models") == 0
    other_compiled = names.index("bench models, compiled: the other presets")
    assert first_compiled < other_compiled < names.index("pytest -m gpu")
    assert names.index("micro, 4 runs sharing the device") < first_compiled


def test_gpu_check_within_a_budget_names_the_steps_it_did_not_start(tmp_path, capsys):
    """--budget-s: a lent GPU's device time ends; the steps that no longer fit are not started and
    the report names them, instead of the whole command being killed with nothing written."""
    from ablate import gpu_check

    assert gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "1", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [s.name for s in gpu_check.steps("cpu", True, tmp_path)]
    assert {s["exit"] for s in report["steps"]} == {"not run"}
    assert "not started" in (tmp_path / "report.md").read_text()
    assert "did not finish cleanly" in capsys.readouterr().err


def test_a_gpu_check_step_stopped_at_its_limit_leaves_none_of_its_processes(tmp_path, monkeypatch):
    """A step past its time (--budget-s) is stopped with everything it started: its process group
    gets SIGTERM, then SIGKILL for what ignores it. subprocess.run's timeout killed the step's own
    process alone, and the bench's prewarm processes compiled on beside the steps timed after it."""
    import sys
    import time

    from ablate import gpu_check
    from ablate.errors import _alive

    pids = tmp_path / "pids"
    # a step that ignores SIGTERM and has started a process of its own, as the bench its prewarm
    script = ("import os, signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "child = subprocess.Popen(['sleep', '300'], **quiet)\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
              "time.sleep(300)\n")
    stuck = gpu_check.Step("stuck", [sys.executable, "-c", script], 300)
    monkeypatch.setattr(gpu_check, "steps", lambda device, quick, work: [stuck])
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 1.0)
    assert gpu_check.main(["--device", "cpu", "--budget-s", "3", "--out", str(tmp_path / "out")]) == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["step"], s["exit"]) for s in report["steps"]] == [("stuck", "timeout")]
    step, child = map(int, pids.read_text().split())
    for _ in range(50):  # SIGKILLed: gone once the kernel has torn them down
        if not (_alive(step) or _alive(child)):
            break
        time.sleep(0.1)
    assert not _alive(step) and not _alive(child)


def test_gpu_check_refuses_a_budget_that_is_not_positive(tmp_path):
    from ablate import gpu_check
    from ablate.errors import ConfigError

    for budget in ("0", "nan"):  # (nan passed a `<= 0` check and became every step's time limit)
        with pytest.raises(ConfigError, match="--budget-s"):
            gpu_check.main(["--device", "cpu", "--budget-s", budget, "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="runs on cpu, cuda or cuda:<index>.*--device cpu --quick"):
        gpu_check.main(["--device", "tpu", "--out", str(tmp_path)])


def test_the_targets_read_the_eager_and_the_compiled_bench_steps():
    """The model bench runs as two steps on a GPU (eager, then compiled, whose compiling may take
    what the session has left): each target takes its ratio from the step of its mode."""
    from ablate import gpu_check

    def row(model, mode, rate, efficiency=1.0):
        return {"model": model, "mode": mode, "train_samples_per_sec": rate, "train_step_time": 128e3 / rate,
                "efficiency_vs_dwconv": efficiency}

    eager = [row("swin_tiny", "eager", 2000), row("ablate_local_attention_tiny", "eager", 2200, 0.9),
             row("ablate_dwconv_tiny", "eager", 2800),
             row("ablate_neighborhood_attention_tiny", "eager", 2000)]
    compiled = [row("swin_tiny", "compiled", 4000), row("ablate_local_attention_tiny", "compiled", 3000),
                row("ablate_dwconv_tiny", "compiled", 4800)]
    values = {t["target"]: t["value"] for t in gpu_check.targets(
        {"bench models, eager": {"models": eager}, "bench models, compiled": {"models": compiled}})}
    assert values == {
        "local_attention train img/s / timm Swin-T's, eager": 1.1,
        "local_attention train img/s / timm Swin-T's, compiled": 0.75,
        "lowest efficiency vs dwconv of any preset, eager": 0.9,
        "dwconv compiled train img/s / compiled timm Swin-T's": 1.2,
        "neighborhood_attention train step / local_attention's, eager": 1.1,
        "micro run train img/s / 4648 (before), best single run": None,
        "micro runs sharing the device, img/s in all / 4648": None}
    # a compiled step that did not run leaves its targets unmeasured, not failed
    eager_only = gpu_check.targets({"bench models, eager": {"models": eager}})
    unmeasured = {t["target"] for t in eager_only if t["met"] is None}
    assert "dwconv compiled train img/s / compiled timm Swin-T's" in unmeasured


def test_gpu_check_refuses_an_only_word_that_names_no_step(tmp_path):
    """A misspelt --only ran no step and exited 0 with an empty report: a lent GPU's session spent on
    nothing. Each word must match a step; the message lists them."""
    from ablate import gpu_check
    from ablate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--only selfchek: no step's name contains it.*selfcheck float32"):
        gpu_check.main(["--device", "cpu", "--quick", "--only", "bench", "selfchek", "--out", str(tmp_path)])
    assert not (tmp_path / "report.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_gpu_check_without_a_gpu_says_so_at_once(tmp_path):
    """`make gpu-check` on a machine without a GPU: one clear error (exit 2) before any step runs,
    instead of seven failing steps."""
    from ablate import gpu_check
    from ablate.errors import ConfigError

    with pytest.raises(ConfigError, match="no CUDA GPU.*--device cpu --quick"):
        gpu_check.main(["--out", str(tmp_path)])
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("name,message", [
    ("cuda", "--device cuda, but PyTorch sees no CUDA GPU"), ("cuda:7", "no CUDA GPU|has 1 GPU"),
    ("tpu", "runs on cpu, cuda or cuda:<index>"), ("gpu0", "runs on cpu, cuda"), ("mps", "runs on cpu")])
def test_bench_on_a_device_this_machine_lacks_says_so(tmp_path, name, message):
    from ablate.errors import ConfigError

    if torch.cuda.is_available() and name == "cuda":
        pytest.skip("the machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        main(["--device", name, "--quick", "--section", "ops", "--out", str(tmp_path)])


def test_gpu_check_summarises_a_step_that_reported_nothing():
    """A step that crashed before its first line of results still gets a row (the report is the
    GPU session's only output), instead of the check failing on it."""
    from ablate.gpu_check import _summary

    assert _summary("selfcheck float32", {"cases": {}}) == "no case reported (log.txt)"
    nothing = {"runs": 0, "completed": 0, "samples_per_s": []}
    assert _summary("micro run, eager", nothing).startswith("0/0 runs completed")


def test_the_routes_each_shape_took_reach_the_bench_and_the_gpu_check_report(tmp_path):
    """A GPU session's only output is its files: the bench and the report name the candidate each
    shape's timing chose (without the GPU and PyTorch, which their headers name)."""
    from ablate.bench import write_outputs
    from ablate.gpu_check import _markdown

    key = ("NVIDIA H200 | torch 2.11.0 | neighbourhood attention | (128, 3, 3136, 32) strides "
           "(903168, 32, 288, 1) | map (56, 56) k 7 | bfloat16")
    meta = {"machine": {"gpu": "NVIDIA H200", "cpu_threads": 16}, "dtype": "bfloat16",
            "routes": {key: "flex 64-token tiles"}}
    # one cell: the key's own separators would split the markdown table's row
    row = ("| neighbourhood attention; (128, 3, 3136, 32) strides (903168, 32, 288, 1); map (56, 56) k 7; "
           "bfloat16 | flex 64-token tiles |")
    assert row in write_outputs(tmp_path, [], [], meta)["markdown"].read_text()
    report = _markdown({}, [], {"bench operators": {"routes": meta["routes"]}}, [])
    assert "## Routes" in report and row in report and "flex 64-token tiles" in report
    assert "## Routes" not in _markdown({}, [], {"bench models": {"routes": {}}}, [])


@pytest.mark.parametrize("kind", ["static", "homogeneous", "inhomogeneous"])
def test_depthwise_family_candidates_compute_the_baselines_function(kind):
    """The bench times candidates side by side; each must compute its baseline's operator (same x,
    same weights), forward and gradients, or its speed means nothing."""
    from ablate import bench

    device = torch.device("cpu")
    x, wt = bench._dw_family(kind, 3, 8, 7, 6, 4, 3, device, torch.float64, seed=0)
    cands = {"static": bench._static_candidates, "homogeneous": bench._homogeneous_candidates,
             "inhomogeneous": bench._inhomogeneous_candidates}[kind](x, wt, device)
    results = {}
    for cand in cands:
        fn, inputs, weights = cand.setup()
        y = fn()
        results[cand.name] = (y, *torch.autograd.grad(y, inputs + weights, torch.ones_like(y)))
    base = results[next(c.name for c in cands if c.baseline)]
    assert len(results) >= 3
    for name, got in results.items():
        for a, b in zip(got, base):
            # static weights: candidates hold the kernel as (C, 1, k, k) or (1, C, k*k); compare values
            torch.testing.assert_close(a.reshape(b.shape), b, msg=lambda m, name=name: f"{name}: {m}")


def test_gpu_check_reads_a_profile_stopped_midway(tmp_path):
    """The profile writes its files model by model; one stopped by its time limit has no wall time
    yet, and the check still reports the models it profiled."""
    from ablate.bench import write_outputs
    from ablate.gpu_check import _bench_rows, _summary

    meta = {"machine": {"cpu": "a CPU", "cpu_threads": 2}, "dtype": "float32"}
    rows = [{"model": "ablate_dwconv_tiny", "operator": "aten::mm", "ms_per_step": 1.0, "share": 1.0,
             "calls_per_step": 1.0, "step_ms": 1.0}]
    write_outputs(tmp_path, [], [], meta, rows)
    numbers = _bench_rows(tmp_path, "")
    assert numbers["profile"] == rows and "1 models profiled" in _summary("bench profile", numbers)
