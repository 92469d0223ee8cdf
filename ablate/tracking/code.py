"""Which code made a result: a fingerprint of the package's sources, and the git commit where there is one.

Every record carries `code_identity()`:

- `fingerprint`: sha256 (16 hex digits) of the package's own source files that a training run
  executes, path and content, in a fixed order. It identifies the code with or without git (an
  installed copy, a tarball, a cluster node that copied the tree), and it is the same for two
  commits whose package sources are the same;
- `commit`: the git commit of the checkout the package was imported from (None without git);
- `dirty`: whether the package's sources differ from that commit (None without git).

Left out of the fingerprint are the modules that only measure, check or drive commands and never run
inside a training run (`NOT_IN_RUNS`; tests/test_code_identity.py checks that a run imports none of
them), so that editing the benchmark does not make every result "other code". The list is read from
each commit's own copy of this file when a commit's fingerprint is computed: a module added to it
later leaves the fingerprints that earlier commits' runs recorded findable.

    python -m ablate.tracking.code            # this checkout's code identity
    python -m ablate.tracking.code <commit>   # the fingerprint of a commit's package sources
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

__all__ = ["INSTALLED_AT", "NOT_IN_RUNS", "code_identity", "fingerprint", "fingerprint_at", "short"]

PACKAGE = Path(__file__).resolve().parent.parent  # the `ablate` package folder
SUFFIXES = (".py", ".c")
# measuring, checking and command-line modules: never imported by a training run
NOT_IN_RUNS = ("bench.py", "gpu_check.py", "gpu_compile.py", "measure.py", "reliability.py",
               "models/geometry.py", "ops/fast/selfcheck.py", "ops/fast/triton_target.py")

# package folders that `pip install .` puts elsewhere (pyproject's [tool.setuptools.package-dir]):
# Hydra finds plugins only under `hydra_plugins`. An installed copy of a commit must have its fingerprint.
INSTALLED_AT = {"sweep/hydra_plugin": "hydra_plugins/ablate_sweeper"}


def _counted(relative: str, left_out: tuple[str, ...] = NOT_IN_RUNS) -> bool:
    return relative.endswith(SUFFIXES) and relative not in left_out and "__pycache__" not in relative


def _digest(files: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for relative, content in sorted(files):
        h.update(relative.encode() + b"\0" + hashlib.sha256(content).digest())
    return h.hexdigest()[:16]


def fingerprint(package: Path = PACKAGE) -> str:
    """The fingerprint of the package's sources as they are on disk; in an installed copy, the folders
    installed elsewhere (INSTALLED_AT) are read there, under their names in the source tree."""
    files = []
    folders = [(package, "")]
    for source, installed in INSTALLED_AT.items():
        if not (package / source).is_dir() and (package.parent / installed).is_dir():
            folders.append((package.parent / installed, source + "/"))
    for folder, prefix in folders:
        for path in folder.rglob("*"):
            relative = prefix + path.relative_to(folder).as_posix()
            if path.is_file() and _counted(relative):
                files.append((relative, path.read_bytes()))
    return _digest(files)


def _git(*args: str, cwd: Path = PACKAGE) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def fingerprint_at(commit: str, repo: Path = PACKAGE.parent) -> str | None:
    """The fingerprint of the package's sources at `commit` of the git repository `repo` (None where
    git or the commit is missing): what `fingerprint()` gave in a checkout of that commit."""
    listing = _git("ls-tree", "-r", "--name-only", commit, "--", "ablate", cwd=repo)
    if listing is None:
        return None
    left_out = _left_out_at(commit, repo)
    files = []
    for name in listing.splitlines():
        relative = name[len("ablate/"):]
        if _counted(relative, left_out):
            done = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{name}"], capture_output=True,
                                  timeout=20)
            if done.returncode != 0:
                return None
            files.append((relative, done.stdout))
    return _digest(files)


def _left_out_at(commit: str, repo: Path) -> tuple[str, ...]:
    """NOT_IN_RUNS as this file said it at `commit`: the rule that commit's runs were fingerprinted by
    (the current list where the commit's file has none it can read)."""
    source = _git("show", f"{commit}:ablate/tracking/code.py", cwd=repo)
    try:
        for node in ast.parse(source or "").body:
            names = [getattr(target, "id", None) for target in getattr(node, "targets", ())]
            if isinstance(node, ast.Assign) and "NOT_IN_RUNS" in names:
                return tuple(ast.literal_eval(node.value))
    except (SyntaxError, ValueError):
        pass
    return NOT_IN_RUNS


def _changed(status_line: str) -> str:
    """The package-relative path of a `git status --porcelain` line (a rename's new path)."""
    path = status_line[3:].split(" -> ")[-1].strip().strip('"')
    return path[len("ablate/"):] if path.startswith("ablate/") else path


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, str | bool | None]:
    """This process's code: fingerprint, git commit and whether the package differs from it. The
    commit is read only where the package is the `ablate/` folder of a git checkout's top level (an
    installed copy inside some other repository gets none)."""
    top = _git("rev-parse", "--show-toplevel")
    commit = dirty = None
    if top is not None and Path(top.strip()).resolve() == PACKAGE.parent:
        head = _git("rev-parse", "HEAD")
        commit = head.strip() if head else None
        status = _git("status", "--porcelain", "--untracked-files=all", "--", ".")
        if commit is not None and status is not None:
            dirty = any(_counted(_changed(line)) for line in status.splitlines())
    return {"fingerprint": fingerprint(), "commit": commit, "dirty": dirty}


def short(code: dict | None) -> str:
    """A code version as a table shows it: the fingerprint's first 8 digits, with the commit's 7
    (and `+` where the sources differed from it); "unrecorded" for records made before this."""
    if not code or not code.get("fingerprint"):
        return "unrecorded"
    text = code["fingerprint"][:8]
    if code.get("commit"):
        text += f" ({code['commit'][:7]}{'+' if code.get('dirty') else ''})"
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ablate.tracking.code", description=__doc__.splitlines()[0])
    p.add_argument("commit", nargs="?", help="a commit of this checkout (default: the code as it is on disk)")
    a = p.parse_args(argv)
    if a.commit is None:
        print(json.dumps(code_identity()))
        return 0
    found = fingerprint_at(a.commit)
    if found is None:  # a null fingerprint would read as an answer: bad input, argparse's exit 2
        p.error(f"no commit {a.commit} in a git checkout at {PACKAGE.parent}: name one that `git log` lists")
    print(json.dumps({"commit": a.commit, "fingerprint": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
