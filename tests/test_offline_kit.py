"""`make offline-kit` (scripts/offline_kit.sh) and the kit's setup.sh: a GPU machine without internet
whose image has PyTorch gets ablate's other dependencies and Fashion-MNIST from the kit alone.

The kit is built for real (pip downloads the wheels from the package index, as `make install` does),
here for this Python, and installed with setup.sh into a folder of its own; the command it runs must
import each dependency from that folder, find the sweeper under Hydra's plugin namespace and load the
checksummed Fashion-MNIST from where setup.sh put it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "offline_kit.sh"
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def bash(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    if not (ROOT / "data" / "FashionMNIST" / "raw" / ".complete").is_file():
        pytest.skip("no checked Fashion-MNIST in data/: run `make data` first")
    folder = tmp_path_factory.mktemp("kit") / "offline-kit"
    # a kit built before, with another version of a wheel: setup.sh's one `pip install` would take both
    folder.mkdir()
    (folder / "hydra_core-1.0.0-py3-none-any.whl").write_bytes(b"")
    built = bash(BUILD, folder, THIS_PYTHON, cwd=ROOT)
    assert built.returncode == 0, built.stderr[-2000:]
    return folder


@pytest.fixture
def kit_copy(kit, tmp_path) -> Path:
    """A copy of the kit to damage."""
    copy = tmp_path / "kit"
    shutil.copytree(kit, copy)
    return copy


def test_the_kit_holds_each_missing_dependency_at_the_tested_version_and_the_data(kit):
    from importlib.metadata import version
    found = [p.name.split("-")[:2] for p in kit.glob("*.whl")]
    wheels = {name.lower(): version for name, version in found}
    assert len(wheels) == len(found), f"two versions of one package: {sorted(found)}"
    for name in ("hydra_core", "omegaconf", "antlr4_python3_runtime", "hydra_joblib_launcher",
                 "hydra_submitit_launcher", "submitit", "pycocotools", "torchmetrics"):
        assert wheels.get(name) == version(name), (name, wheels)
    assert sorted(p.name for p in (kit / "fashion-mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz"]
    assert (kit / "python-version").read_text().strip() == THIS_PYTHON
    assert (kit / "setup.sh").read_text() == (ROOT / "scripts" / "offline_kit_setup.sh").read_text()


CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import importlib
for name in ("hydra", "omegaconf", "antlr4", "submitit", "pycocotools", "torchmetrics",
             "hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(site), (module.__name__, module.__file__)
import hydra_plugins.ablate_sweeper
from ablate.data.sources import load_fashion_mnist
train, test = load_fashion_mnist("data", download=False)
print("ok", len(train.labels), len(test.labels))
"""


def test_setup_installs_the_kit_beside_the_python_and_runs_the_command(kit, tmp_path):
    # a checkout of its own (its `ablate` the repository's), so that the data land in a fresh data/
    checkout, site = tmp_path / "checkout", tmp_path / "site"
    checkout.mkdir()
    (checkout / "ablate").symlink_to(ROOT / "ablate")
    ran = bash(kit / "setup.sh", sys.executable, "-c", CHECK, site, cwd=checkout, ABLATE_SITE=str(site))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split()[-3:] == ["ok", "60000", "10000"]
    assert (site / "hydra_plugins" / "ablate_sweeper").resolve() == ROOT / "ablate" / "sweep" / "hydra_plugin"
    # again, over what the first setup installed and unpacked: nothing to redo, the command runs
    again = bash(kit / "setup.sh", sys.executable, "-c", CHECK, site, cwd=checkout, ABLATE_SITE=str(site))
    assert again.returncode == 0 and again.stdout.split()[-1] == "10000", again.stderr[-3000:]


def test_setup_outside_a_checkout_says_where_to_run_it(kit, tmp_path):
    ran = bash(kit / "setup.sh", "true", cwd=tmp_path, ABLATE_SITE=str(tmp_path / "site"))
    assert ran.returncode == 2
    assert "run it from ablate's repository root" in ran.stderr
    assert not (tmp_path / "site").exists()


def test_the_build_without_checked_data_says_to_make_it(tmp_path):
    ran = bash(BUILD, tmp_path / "kit", THIS_PYTHON, cwd=tmp_path)
    assert ran.returncode == 2
    assert "run `make data`" in ran.stderr
    assert not (tmp_path / "kit").exists()


def test_setup_refuses_a_kit_for_another_python(kit_copy, tmp_path):
    (kit_copy / "python-version").write_text("3.99\n")
    ran = bash(kit_copy / "setup.sh", "true", cwd=ROOT, ABLATE_SITE=str(tmp_path / "site"))
    assert ran.returncode == 2, ran.stderr
    assert f"wheels for Python 3.99, and {sys.executable} is {THIS_PYTHON}" in ran.stderr
    assert f"make offline-kit KIT_PYTHON={THIS_PYTHON}" in ran.stderr
    assert not (tmp_path / "site").exists()


def test_setup_refuses_a_kit_whose_build_did_not_finish(kit_copy, tmp_path):
    (kit_copy / "python-version").unlink()
    ran = bash(kit_copy / "setup.sh", "true", cwd=ROOT, ABLATE_SITE=str(tmp_path / "site"))
    assert ran.returncode == 2 and "not a complete kit" in ran.stderr, ran.stderr
    assert not (tmp_path / "site").exists()


def test_setup_names_what_the_image_lacks_that_the_kit_does_not_hold(kit, tmp_path):
    # a Python of this version with none of the image's packages (not even pip)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    ran = bash(kit / "setup.sh", "true", cwd=ROOT, ABLATE_SITE=str(tmp_path / "site"),
               PYTHON=str(bare / "bin" / "python"))
    assert ran.returncode == 2, ran.stderr
    lacks = "torch, torchvision, triton, timm, numpy, pillow, pandas, matplotlib, scipy, pyyaml, tqdm, pip"
    assert f"lacks {lacks}, which the kit does not hold" in ran.stderr
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("version", ["3", "banana", "3.12; rm -rf /"])
def test_the_build_refuses_a_python_version_that_is_not_one(version, tmp_path):
    ran = bash(BUILD, tmp_path / "kit", version, cwd=ROOT)
    assert ran.returncode == 2 and "must read like 3.12" in ran.stderr and version in ran.stderr
    assert not (tmp_path / "kit").exists()
