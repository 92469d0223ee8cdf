"""The notebooks run top to bottom on a real store (tests/mini_store.py) and are committed clean.

They are executed with nbclient in a real kernel, from their own folder (as Jupyter runs them: a
relative ABLATE_RESULTS is read from the repository's root, above it), with ABLATE_RESULTS pointing
at the mini store.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from mini_store import REPO, mini_store  # noqa: F401  (the session fixture)

# a dev tool (pip install -e .[dev]); a GPU machine's `pytest -m gpu` collects this file without it
nbformat = pytest.importorskip("nbformat")

pytestmark = pytest.mark.xdist_group("mini_store")

NOTEBOOKS = REPO / "notebooks"


def execute(path: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def outputs(notebook, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if kind in o.get("data", {}) or o.get("output_type") == kind]


@pytest.mark.parametrize("name", ["figure2.ipynb", "tables.ipynb"])
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} holds outputs: clear them"


def test_figure2_notebook_runs_on_the_store(mini_store, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ABLATE_RESULTS", str(mini_store))
    notebook = execute(NOTEBOOKS / "figure2.ipynb")
    assert not outputs(notebook, "error")
    assert len(outputs(notebook, "image/png")) == 1  # the figure, drawn
    html = "".join(o["data"]["text/html"] for o in outputs(notebook, "text/html"))
    assert "local_mlp" in html and "top1_mean" in html


def test_tables_notebook_runs_on_the_store(mini_store, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ABLATE_RESULTS", str(mini_store))
    notebook = execute(NOTEBOOKS / "tables.ipynb")
    assert not outputs(notebook, "error")
    assert len(outputs(notebook, "image/png")) == 1  # the cost plot
    html = "".join(o["data"]["text/html"] for o in outputs(notebook, "text/html"))
    assert "dynamic_dwconv" in html and "pareto_gmac" in html and "homogeneous" in html


def test_a_relative_results_folder_is_read_from_the_repository_root(mini_store, monkeypatch):  # noqa: F811
    """The README gives the folder as `ABLATE_RESULTS=results/demo`, from the repository's root; Jupyter
    runs a notebook in notebooks/, where such a path named no folder (FileNotFoundError in the first
    cell that reads the store). A relative path is read from the repository's root."""
    monkeypatch.setenv("ABLATE_RESULTS", os.path.relpath(mini_store, REPO))
    notebook = execute(NOTEBOOKS / "figure2.ipynb")
    assert not outputs(notebook, "error"), [o.get("evalue") for o in outputs(notebook, "error")]
    assert len(outputs(notebook, "image/png")) == 1


def test_the_notebooks_use_the_runs_the_report_uses(mini_store, monkeypatch, tmp_path):  # noqa: F811
    """On a tuned sweep's store (the study) the report's tables hold each cell's chosen runs only; the
    notebooks read every run, so their tables also held the candidates that were not chosen (here:
    local_mlp at 8 channels per group, a candidate of a cell that chose 32), and a downstream store's
    detection runs as rows of top-1 n/a. They read the runs the report reads."""
    from analysis import load_runs

    store = tmp_path / "store"
    shutil.copytree(mini_store, store)
    runs = load_runs(store)
    key = {cpg: runs[(runs["preset"] == "local_mlp") & (runs["cpg"] == cpg)]["experiment"].iloc[0]
           for cpg in (8, 32)}
    candidates = [{"value": cpg, "experiment": key[cpg]} for cpg in (8, 32)]
    (store / "tuning.json").write_text(json.dumps({
        "setting": "sharing.channels_per_group", "metric": "best_val_top1", "seed": 0,
        "cells": [{"label": "local_mlp", "chosen": 32, "chosen_experiment": key[32],
                   "candidates": candidates}]}))
    monkeypatch.setenv("ABLATE_RESULTS", str(store))
    notebook = execute(NOTEBOOKS / "tables.ipynb")
    assert not outputs(notebook, "error")
    html = "".join(o["data"]["text/html"] for o in outputs(notebook, "text/html"))
    assert "local_mlp" in html and "channels_per_group=1]" in html
    assert "channels_per_group=8]" not in html
