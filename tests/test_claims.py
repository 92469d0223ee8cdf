"""The paper's claims as verdicts: like with like (one context, paired seeds, the preset as defined),
the verdict rules of analysis/claims.yaml, and a claims file that fails with a clear message.

Records are real ones from the mini store (tests/mini_store.py), copied to more seeds and contexts
with accuracies set to chosen values, so every verdict is known in advance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mini_store import mini_store  # noqa: F401  (the session fixture)
from scipy import stats
from test_comparisons import synthetic, write_store

from ablate.tracking.identity import experiment_of, flatten
from analysis import load_runs
from analysis.check import TableMismatch, check_tables
from analysis.claims import CLAIMS_FILE, ClaimsFileError, claims_table, load_claims, printed_claims
from analysis.report import main as report_main
from analysis.stats import seeds_to_bound, seeds_to_resolve

pytestmark = pytest.mark.xdist_group("mini_store")

BASE = np.array([80.0, 81.0, 82.0])
# a difference of about 1 point that varies over the seeds (an exact +1 for every seed is a tie: no spread)
PLUS_ONE = np.array([1.0, 1.2, 0.9])


def three_seeds(store, preset, accuracies, tag="", **settings):
    """The preset's seed-0 record (the preset as its config defines it) as seeds 0, 1, 2 with these
    accuracies, and these settings changed."""
    from analysis.claims import side_settings, split_settings

    found = [json.loads(p.read_text()) for p in Path(store).rglob("results.json")]
    template = next(r for r in found if r["status"] == "completed" and r["seed"] == 0
                    and split_settings(flatten(experiment_of(r["identity"])))[0]
                    == side_settings({"operator": preset}))
    out = []
    for seed, top1 in enumerate(accuracies):
        record = synthetic(template, f"{preset}{tag}-s{seed}", **settings)
        record["seed"] = record["identity"]["seed"] = seed
        record["final_test_top1"] = float(top1)
        out.append(record)
    return out


def claim_rows(records, tmp_path, claim_id):
    table = claims_table(load_runs(write_store(tmp_path / "store", records)))
    return table[table["id"] == claim_id].reset_index(drop=True)


def test_the_shipped_claims_load_and_every_side_is_a_composed_preset():
    claims = load_claims()
    assert len(claims) >= 8 and len({c.id for c in claims}) == len(claims)
    assert {c.expect for c in claims} == {"better", "on_par"}
    from analysis.claims import side_settings
    for claim in claims:
        for side in claim.sides:
            wanted = side_settings(side)
            assert json.loads(wanted["preset"]) == side["operator"]
            for key, value in side.items():
                if key != "operator":
                    assert json.loads(wanted[key]) == value


@pytest.mark.parametrize("deltas,verdict", [
    ([1.0, 1.2, 0.9], "supported"),
    ([-1.0, -1.2, -0.9], "contradicted"),
    ([1.0, -1.0, 0.5], "unresolved"),
])
def test_a_better_claim_is_judged_by_the_paired_interval(mini_store, tmp_path, deltas, verdict):  # noqa: F811
    deltas = np.array(deltas)
    records = (three_seeds(mini_store, "dwconv", BASE)
               + three_seeds(mini_store, "dynamic_dwconv", BASE + deltas))
    row = claim_rows(records, tmp_path, "dynamic_beats_static").iloc[0]
    low, high = stats.t.interval(0.95, 2, loc=deltas.mean(), scale=stats.sem(deltas))
    assert row["pairs"] == 3 and row["verdict"] == verdict
    assert np.isclose(row["delta_top1_mean"], deltas.mean()) and np.isclose(row["ci_low"], low)
    assert np.isclose(row["ci_high"], high)
    if verdict == "unresolved":
        assert row["seeds_needed"] == seeds_to_resolve(deltas.mean(), deltas.std(ddof=1))
    else:
        assert np.isnan(row["seeds_needed"])


@pytest.mark.parametrize("deltas,verdict", [
    ([0.1, -0.1, 0.05], "supported"),      # the interval lies inside +-0.5
    ([2.0, 2.2, 1.9], "contradicted"),     # wholly above +0.5
    ([0.4, 0.6, 0.5], "unresolved"),       # straddles +0.5
])
def test_an_on_par_claim_needs_the_interval_inside_its_tolerance(mini_store, tmp_path, deltas, verdict):  # noqa: F811
    deltas = np.array(deltas)
    records = (three_seeds(mini_store, "local_attention", BASE)
               + three_seeds(mini_store, "dwconv", BASE + deltas))
    row = claim_rows(records, tmp_path, "dwconv_on_par_with_local_attention").iloc[0]
    assert row["verdict"] == verdict and row["tolerance"] == 0.5
    if verdict == "unresolved":
        assert row["seeds_needed"] == seeds_to_bound(deltas.mean(), deltas.std(ddof=1), 0.5)



@pytest.mark.parametrize("claim_id,src,to,deltas", [
    ("dynamic_beats_static", "dwconv", "dynamic_dwconv", [0.5, 0.5, 0.5]),  # was "supported"
    ("dwconv_on_par_with_local_attention", "local_attention", "dwconv", [0.0, 0.0, 0.0]),  # was "supported"
])
def test_tied_pairs_settle_no_claim(mini_store, tmp_path, claim_id, src, to, deltas):  # noqa: F811
    """Every pair differing by the same amount is an interval of no width: a tie, not a certainty."""
    records = three_seeds(mini_store, src, BASE) + three_seeds(mini_store, to, BASE + np.array(deltas))
    row = claim_rows(records, tmp_path, claim_id).iloc[0]
    assert row["pairs"] == 3 and row["delta_top1_std"] == 0
    assert row["verdict"] == "unresolved" and np.isnan(row["seeds_needed"])
    assert printed_claims(pd.DataFrame([row]))["seeds to settle"].iloc[0] == "no spread to judge by"


def test_seeds_of_one_side_only_are_counted_and_checked(mini_store, tmp_path):  # noqa: F811
    """dwconv has seeds 0-2, dynamic_dwconv 0-1: 2 pairs, and the seed left out is said, in the table
    and its check; at another rate the sides share no seed: a row of 0 pairs, not "not in this store"."""
    from analysis import write_axis_effects, write_comparison
    from analysis.claims import write_claims

    late = three_seeds(mini_store, "dynamic_dwconv", BASE + 1, "-lr", **{"optim.lr": 1e-2})
    for record in late:
        record["seed"] = record["identity"]["seed"] = record["seed"] + 10
    records = (three_seeds(mini_store, "dwconv", BASE)
               + three_seeds(mini_store, "dynamic_dwconv", BASE + 1)[:2]
               + three_seeds(mini_store, "dwconv", BASE, "-lr", **{"optim.lr": 1e-2}) + late)
    store = write_store(tmp_path / "store", records)
    runs = load_runs(store)
    rows = claims_table(runs)
    rows = rows[rows["id"] == "dynamic_beats_static"].sort_values("settings").reset_index(drop=True)
    assert list(rows["pairs"]) == [2, 0] and list(rows["unpaired"]) == [1, 6]
    assert list(rows["verdict"]) == ["unresolved", "unresolved"]  # 2 pairs of +1 exactly: tied
    printed = printed_claims(rows)
    assert list(printed["paired seeds"]) == ["2 seeds (1 unpaired left out)", "0 seeds (6 unpaired left out)"]
    assert printed["seeds to settle"].iloc[1] == "needs paired seeds"
    report = tmp_path / "report"
    write_comparison(runs, report), write_axis_effects(runs, report), write_claims(runs, report)
    assert check_tables(store, report) > 0
    claims_md = (report / "claims.md").read_text()
    (report / "claims.md").write_text(claims_md.replace(" (1 unpaired left out)", "", 1))
    with pytest.raises(TableMismatch, match="paired seeds"):
        check_tables(store, report)

def test_sides_pair_only_within_one_context_and_as_the_preset_defines_them(mini_store, tmp_path):  # noqa: F811
    records = (three_seeds(mini_store, "dwconv", BASE)
               + three_seeds(mini_store, "dynamic_dwconv", BASE + PLUS_ONE)
               # another context holding only one side: no row of its own, never paired across
               + three_seeds(mini_store, "dynamic_dwconv", BASE - 5, "-small", **{"data.train_subset": 300})
               # dwconv with another kernel is another operator: it never stands for `dwconv`
               + three_seeds(mini_store, "dwconv", BASE + 9, "-k5", **{"connectivity.kernel_size": 5}))
    table = claims_table(load_runs(write_store(tmp_path / "store", records)))
    rows = table[table["id"] == "dynamic_beats_static"]
    assert len(rows) == 1 and np.isclose(rows.iloc[0]["delta_top1_mean"], PLUS_ONE.mean())
    missing = table[table["id"] == "inhomogeneous_on_par_with_homogeneous"].iloc[0]
    assert missing["verdict"] == "not in this store" and missing["pairs"] == 0
    assert "not in this store" in set(printed_claims(table)["verdict"])


def test_a_side_follows_its_models_window(mini_store, tmp_path):  # noqa: F811
    """A preset's kernel is its model's window (conf/connectivity: ${model.window}): at a size with
    window 7, dwconv 7x7 stands for `dwconv`; the 5x5 one beside it does not."""
    seven = {"model.window": 7, "connectivity.kernel_size": 7}
    five = seven | {"connectivity.kernel_size": 5}
    records = (three_seeds(mini_store, "dwconv", BASE, "-w7", **seven)
               + three_seeds(mini_store, "dynamic_dwconv", BASE + PLUS_ONE, "-w7", **seven)
               + three_seeds(mini_store, "dwconv", BASE + 9, "-w7k5", **five))
    rows = claim_rows(records, tmp_path, "dynamic_beats_static")
    assert len(rows) == 1 and np.isclose(rows.iloc[0]["delta_top1_mean"], PLUS_ONE.mean())


def test_two_contexts_are_two_rows_that_name_their_setting(mini_store, tmp_path):  # noqa: F811
    records = (three_seeds(mini_store, "dwconv", BASE)
               + three_seeds(mini_store, "dynamic_dwconv", BASE + PLUS_ONE)
               + three_seeds(mini_store, "dwconv", BASE, "-lr", **{"optim.lr": 1e-2})
               + three_seeds(mini_store, "dynamic_dwconv", BASE - PLUS_ONE, "-lr", **{"optim.lr": 1e-2}))
    rows = claim_rows(records, tmp_path, "dynamic_beats_static")
    assert sorted(rows["verdict"]) == ["contradicted", "supported"]
    assert all(s.startswith("optim.lr=") for s in rows["settings"])


def test_a_claim_written_over_several_lines_is_one_row_of_the_table(mini_store, tmp_path):  # noqa: F811
    """A long claim or source written as a YAML block (`claim: >`, `where: |`) ended its Markdown row at
    each line break: claims.md was cut into pieces and the report's own check of it stopped the report
    with a TableMismatch traceback (exit 1). A line break in a cell is written as a space."""
    from analysis.check import read_markdown_table

    store = write_store(tmp_path / "store", three_seeds(mini_store, "dwconv", BASE)
                        + three_seeds(mini_store, "dynamic_dwconv", BASE + PLUS_ONE))
    claims = tmp_path / "claims.yaml"
    claims.write_text("claims:\n  - id: long\n    claim: >\n      Dynamic weights improve\n"
                      "      depth-wise convolution | <b>D-DWNet</b>\n"
                      "    where: |\n      Table 2: D-DWNet-T 81.9\n      vs DWNet-T 81.3\n"
                      "    from: {operator: dwconv}\n    to: {operator: dynamic_dwconv}\n"
                      "    expect: better\n")
    out = tmp_path / "report"
    assert report_main([str(store), "--out", str(out), "--no-weights", "--claims", str(claims)]) == 0
    lines = (out / "claims.md").read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("|") and line.endswith("|") for line in lines)
    row = read_markdown_table(out / "claims.md").iloc[0]
    assert row["claim"] == "Dynamic weights improve depth-wise convolution | <b>D-DWNet</b>"
    assert row["paper"] == "Table 2: D-DWNet-T 81.9 vs DWNet-T 81.3" and row["verdict"] == "supported"
    assert "<b>" not in (out / "index.html").read_text()


def test_the_report_writes_and_checks_the_claims_and_refuses_a_bad_claims_file(mini_store, tmp_path):  # noqa: F811
    store = write_store(tmp_path / "store", three_seeds(mini_store, "dwconv", BASE)
                        + three_seeds(mini_store, "dynamic_dwconv", BASE + PLUS_ONE))
    out = tmp_path / "report"
    assert report_main([str(store), "--out", str(out), "--no-weights"]) == 0
    assert "supported" in (out / "claims.md").read_text() and (out / "claims.csv").is_file()
    assert "The paper's claims" in (out / "index.md").read_text()
    edited = (out / "claims.md").read_text().replace("supported", "contradicted", 1)
    (out / "claims.md").write_text(edited)
    with pytest.raises(TableMismatch, match="claims.md"):
        check_tables(store, out)

    bad = tmp_path / "claims.yaml"
    cases = {
        "claims:\n  - {id: x, claim: c, from: {operator: dwconvx}, to: {operator: dwconv}, expect: better}\n":
            "`from` must name a preset",
        "claims:\n  - {id: x, claim: c, from: {operator: dwconv}, to: {operator: dwconv}, expect: equal}\n":
            "`expect` must be one of",
        "claims:\n  - {id: x, claim: c, from: {operator: dwconv}, to: {operator: dwconv}, expect: on_par}\n":
            "needs `tolerance:` > 0",
        "claims:\n  - {id: x, from: {operator: dwconv}, to: {operator: dwconv}, expect: better}\n":
            "missing key `claim`",
        "claims: [\n": "cannot read the claims file",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ClaimsFileError, match=message) as err:
            load_claims(bad)
        assert str(bad) in str(err.value)
    assert report_main([str(store), "--out", str(tmp_path / "r2"), "--no-weights", "--claims", str(bad)]) == 2
    assert CLAIMS_FILE.name == "claims.yaml"
