"""Every record names the code that made it, and the analysis never pools seeds of different code
without saying so: real runs in a real git repository, a real commit between them."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.tracking import code as code_module
from ablate.tracking.code import NOT_IN_RUNS, code_identity, fingerprint, fingerprint_at, short

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data.train_subset=300", "data.val_size=200", "data.test_subset=300", "data.batch_size=64",
         "schedule.epochs=1", "logger=none", "trainer.quiet=true", "trainer.threads=1", "operator=dwconv",
         "trainer.sweep=versions"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout


def test_this_process_names_its_code():
    code = code_identity()
    assert re.fullmatch(r"[0-9a-f]{16}", code["fingerprint"])
    assert code["fingerprint"] == fingerprint()
    if code["commit"] is not None:  # a git checkout (CI's clean clone is one)
        assert re.fullmatch(r"[0-9a-f]{40}", code["commit"]) and isinstance(code["dirty"], bool)
    assert short(None) == "unrecorded" and short(code).startswith(code["fingerprint"][:8])


def test_the_code_command_refuses_a_commit_it_cannot_find(capsys):
    """`python -m ablate.tracking.code <commit>` printed a null fingerprint and exited 0 for a commit
    that is not there (and took --help for a commit): argparse's line naming it, exit 2."""
    code_module.main([])
    assert json.loads(capsys.readouterr().out)["fingerprint"] == fingerprint()
    for argv in (["no-such-commit"], ["--nope"]):
        with pytest.raises(SystemExit) as stopped:
            code_module.main(argv)
        assert stopped.value.code == 2
    assert "no-such-commit" in capsys.readouterr().err


def test_the_fingerprint_follows_the_package_sources_only(tmp_path):
    package = tmp_path / "ablate"
    shutil.copytree(ROOT / "ablate", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = fingerprint(package)
    (package / "bench.py").write_text("# measuring only: not part of any run\n")
    (package / "notes.txt").write_text("not a source\n")
    assert fingerprint(package) == before
    kernel = package / "ops" / "sources" / "static.py"
    kernel.write_text(kernel.read_text() + "\n# a comment is a change of the sources too\n")
    assert fingerprint(package) != before


def test_an_installed_copy_has_the_fingerprint_of_its_sources(tmp_path):
    """`pip install .` (not editable) puts ablate/sweep/hydra_plugin at hydra_plugins/ablate_sweeper
    (pyproject's package-dir): the same sources must give the same fingerprint there, else runs of an
    installed copy of a commit are "other code" than the checkout's and `fingerprint_at` cannot find
    its commit."""
    import tomllib

    moved = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    moved = {k: v for k, v in moved.items() if v.startswith("ablate/")}  # not conf/ and sweeps/ (YAML)
    assert {v: k for k, v in moved.items()} == {"ablate/" + source: installed.replace("/", ".")
                                                for source, installed in code_module.INSTALLED_AT.items()}
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "ablate", site / "ablate", ignore=shutil.ignore_patterns("__pycache__"))
    for source, installed in code_module.INSTALLED_AT.items():
        shutil.move(site / "ablate" / source, site / installed)
    assert fingerprint(site / "ablate") == fingerprint()
    plugin = site / "hydra_plugins" / "ablate_sweeper" / "__init__.py"
    plugin.write_text(plugin.read_text() + "\n# changed\n")
    assert fingerprint(site / "ablate") != fingerprint()


def test_a_real_pip_install_runs_the_hydra_commands_with_the_checkouts_fingerprint(tmp_path):
    """`pip install .` (not editable) has no checkout around it: conf/ and sweeps/ travel inside the
    package (pyproject.toml), or every Hydra command stopped at "Primary config directory not found"."""
    site, elsewhere, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    # built from a copy of what pyproject.toml packages: setuptools writes build/ beside its sources
    for part in ("ablate", "analysis", "conf", "sweeps"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)],
                   check=True, capture_output=True, timeout=300)
    shipped = [*ROOT.glob("conf/**/*.yaml"), *ROOT.glob("sweeps/*.yaml")]
    installed = sorted(p.relative_to(site / "ablate") for p in (site / "ablate").glob("**/*.yaml"))
    assert installed == sorted(p.relative_to(ROOT) for p in shipped)
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert run("-c", "import ablate.config as c; print(c.CONF_DIR)").strip() == str(site / "ablate" / "conf")
    assert json.loads(run("-m", "ablate.measure", "model=micro").splitlines()[-1])["operator"] == "dwconv"
    sweep = run("-m", "ablate.train", "sweeps=demo", "--cfg", "hydra")  # sweeps/ on the search path
    assert "hydra_plugins.ablate_sweeper.GridSweeper" in sweep and "local_attention,local_mlp" in sweep
    installed_fingerprint = run("-c", "from ablate.tracking.code import fingerprint; print(fingerprint())")
    assert installed_fingerprint.strip() == fingerprint()


def test_a_training_run_imports_none_of_the_modules_left_out_of_the_fingerprint(tmp_path):
    script = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "import ablate.train\n"  # the command (registers the sweeper), and through it the loop
        "from ablate.config import CONF_DIR\n"
        "from ablate.training import train\n"
        "with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
        f"    cfg = compose('train', overrides={QUICK + [f'trainer.results_root={tmp_path}']!r})\n"
        "assert train(cfg)['status'] == 'completed'\n"
        "print(sorted(m for m in sys.modules if m.startswith('ablate')))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(eval(done.stdout.strip().splitlines()[-1]))  # noqa: S307  our own repr of a list
    left_out = {"ablate." + m.removesuffix(".py").replace("/", ".") for m in NOT_IN_RUNS}
    assert "ablate.training" in loaded and not loaded & left_out


@pytest.fixture
def repository(tmp_path):
    """The package and its configs in a git repository of their own (what a user's clone is)."""
    repo = tmp_path / "repo"
    for name in ("ablate", "analysis", "conf", "sweeps"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled",
           "ABLATE_DATA": str(ROOT / "data")}
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)


def _comparison(report: Path) -> list[dict]:
    with open(report / "comparison.csv") as f:
        return list(csv.DictReader(f))


def test_seeds_of_two_code_versions_are_not_pooled_without_saying_so(repository, tmp_path):
    results = tmp_path / "results"
    train = ["-m", "ablate.train", *QUICK, f"trainer.results_root={results}"]
    for seed in (0, 1):
        assert _run(repository, *train, f"trainer.seed={seed}").returncode == 0
    first = json.loads(next((results / "versions").glob("*s0-*/results.json")).read_text())["code"]
    assert first["commit"] == git(repository, "rev-parse", "HEAD").strip() and first["dirty"] is False

    # a commit that changes what dwconv computes (its kernel, doubled), then a third seed
    kernel = repository / "ablate" / "ops" / "sources" / "static.py"
    text = kernel.read_text()
    start = text.index("class StaticKernel(")
    end = text.index("return self.weight[None]", start)
    rest = text[end + len("return self.weight[None]"):]
    kernel.write_text(text[:end] + "return 2 * self.weight[None]" + rest)
    git(repository, "commit", "-q", "-am", "dwconv: a changed kernel")
    assert _run(repository, *train, "trainer.seed=2").returncode == 0
    second = json.loads(next((results / "versions").glob("*s2-*/results.json")).read_text())["code"]
    assert second["fingerprint"] != first["fingerprint"]
    assert second["fingerprint"] == fingerprint_at("HEAD", repository)
    assert first["fingerprint"] == fingerprint_at("HEAD~1", repository)

    report = tmp_path / "report"
    done = _run(repository, "-m", "analysis.report", str(results), "--out", str(report), "--no-weights")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _comparison(report)  # default: each code version its own row, named under settings
    assert sorted(int(r["seeds"]) for r in rows) == [1, 2]
    named = sorted(r["settings"] for r in rows)
    assert named == sorted(f"code={short(c)}" for c in (first, second))
    table = (report / "comparison.md").read_text()
    assert short(first) in table and short(second) in table
    index = (report / "index.md").read_text()
    assert "2 code versions made these runs" in index and "kept apart" in index

    pooled = tmp_path / "pooled"
    done = _run(repository, "-m", "analysis.report", str(results), "--out", str(pooled), "--no-weights",
                "--code", "pool")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [int(r["seeds"]) for r in _comparison(pooled)] == [3]
    assert "POOLED on request" in (pooled / "index.md").read_text()

    newest = tmp_path / "newest"
    done = _run(repository, "-m", "analysis.report", str(results), "--out", str(newest), "--no-weights",
                "--code", "newest")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [int(r["seeds"]) for r in _comparison(newest)] == [1]
    assert "2 older run(s) left out" in (newest / "index.md").read_text()


def test_a_commit_keeps_its_fingerprint_after_the_rule_leaves_out_more(repository):
    """A module that joins NOT_IN_RUNS later changes the fingerprint of the code from then on, not of
    the commits before: `fingerprint_at` applies each commit's own list, so the fingerprints their runs
    recorded (and the committed reports name) are still found at their commits."""
    code_file = repository / "ablate" / "tracking" / "code.py"
    current = code_file.read_text()
    assert '"gpu_compile.py", ' in current
    code_file.write_text(current.replace('"gpu_compile.py", ', "", 1))  # the rule before gpu_compile joined
    git(repository, "commit", "-q", "-am", "the older rule")
    recorded = _run(repository, "-m", "ablate.tracking.code")
    assert recorded.returncode == 0, recorded.stderr
    recorded = json.loads(recorded.stdout)["fingerprint"]
    code_file.write_text(current)
    git(repository, "commit", "-q", "-am", "gpu_compile.py joins the modules no run imports")
    assert fingerprint_at("HEAD~1", repository) == recorded
    assert fingerprint_at("HEAD", repository) == fingerprint(repository / "ablate") != recorded


@pytest.mark.parametrize("report", ["demo", "study", "downstream"])
def test_the_committed_reports_name_the_code_that_made_them(report):
    """A committed report names a code fingerprint and commit, and that commit's package sources have
    that fingerprint: the report was made by the code of a commit in this history."""
    if code_module._git("rev-parse", "HEAD") is None:
        pytest.skip("not a git checkout: the commits a report names cannot be looked up")
    index = (ROOT / "reports" / report / "index.md").read_text()
    section = index[index.index("## Code"):]
    section = section[:section.index("\n## ", 1)]
    named = re.findall(r"\b([0-9a-f]{8}) \(([0-9a-f]{7})\)", section)
    assert named, f"reports/{report}/index.md names no code version: regenerate it (README, The demo)"
    for prefix, commit in named:
        assert fingerprint_at(commit, ROOT) is not None, f"commit {commit} is not in this history"
        assert fingerprint_at(commit, ROOT).startswith(prefix), (
            f"reports/{report} says code {prefix} of commit {commit}, whose sources are "
            f"{fingerprint_at(commit, ROOT)[:8]}: it was made by uncommitted code")


def test_a_relaunch_retrains_other_code_runs_only_when_asked(repository, tmp_path):
    results = tmp_path / "results"
    train = ["-m", "ablate.train", *QUICK, f"trainer.results_root={results}", "trainer.seed=0"]
    assert _run(repository, *train).returncode == 0
    (repository / "ablate" / "ops" / "sources" / "static.py").write_text(
        (repository / "ablate" / "ops" / "sources" / "static.py").read_text() + "\n# changed\n")
    git(repository, "commit", "-q", "-am", "a change of the sources")
    again = _run(repository, *train)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert len(list((results / "versions").iterdir())) == 1
    rerun = _run(repository, *train, "trainer.rerun_other_code=true")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    old, new = sorted((results / "versions").iterdir())
    fresh = fingerprint_at("HEAD", repository)
    assert new.name == f"{old.name}@{fresh[:8]}"
    assert json.loads((new / "results.json").read_text())["code"]["fingerprint"] == fresh
    assert json.loads((old / "results.json").read_text())["status"] == "completed"  # kept
    third = _run(repository, *train, "trainer.rerun_other_code=true")  # done: nothing to train
    assert third.returncode == 0 and "nothing to do" in third.stdout + third.stderr


def test_one_fingerprint_at_two_commits_is_one_code_version():
    """The fingerprint is the code: seeds made by the same package sources at two commits (a commit of
    the README between them, or a dirty tree then committed) are one version, pooled by every mode,
    and the report does not say two versions made them; another fingerprint is still kept apart."""
    from analysis.code_versions import by_code_version, code_note, versions
    from analysis.records import runs_frame

    same = {"fingerprint": "a" * 16, "dirty": False}
    codes = [{**same, "commit": "1" * 40}, {**same, "commit": "2" * 40, "dirty": True},
             {**same, "commit": "3" * 40}, {"fingerprint": "b" * 16, "commit": "3" * 40, "dirty": False}]
    rows = [{"status": "completed", "run": f"r{seed}", "seed": seed, "experiment": "e", "settings": {},
             "code": short(code), "code_fingerprint": code["fingerprint"],
             "recorded_at": f"2026-01-0{seed + 1}"}
            for seed, code in enumerate(codes)]
    one = runs_frame(rows[:3])
    assert [n for _, n in versions(one)] == [3]
    assert "one code version: aaaaaaaa (1111111, 2222222+, 3333333)" in code_note(one, one, "separate")
    for mode in ("separate", "newest", "pool"):
        used = by_code_version(one, mode)
        assert len(used) == 3 and used["experiment"].nunique() == 1, mode

    two = runs_frame(rows)
    assert [n for _, n in versions(two)] == [3, 1]
    apart = by_code_version(two, "separate")
    assert apart["experiment"].tolist() == ["e@" + "a" * 16] * 3 + ["e@" + "b" * 16]
    assert len({str(s) for s in apart["settings"][:3]}) == 1  # one version, one row of the tables
    assert by_code_version(two, "newest")["seed"].tolist() == [3]
