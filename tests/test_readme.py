"""The README's preset table states what `ablate.measure` measures today."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ablate.config import CONF_DIR
from ablate.measure import measure
from ablate.space.presets import PAPER, PRESETS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    """The README text from the heading `## <title>` to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in section("The presets").splitlines():
        m = re.match(r"\| `(\w+)`", line)
        if m and m.group(1) in PRESETS:
            rows[m.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def measured(preset: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return measure(compose("measure", overrides=[f"operator={preset}", *overrides]))


def test_every_preset_has_a_row():
    assert set(table_rows()) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_row_numbers_are_measured(preset):
    cells = table_rows()[preset]
    for size, params_cell, gmac_cell in (("tiny", cells[6], cells[7]), ("base", cells[8], cells[9])):
        row = measured(preset, f"model={size}")
        params = float(re.match(r"([\d.]+)M", params_cell).group(1))
        gmac = float(re.match(r"([\d.]+)", gmac_cell).group(1))
        assert params == pytest.approx(row["params_m"], abs=0.006), (preset, size)
        assert gmac == pytest.approx(row["gmac"], abs=0.006), (preset, size)
        if (preset, size) in PAPER:  # the paper's numbers stand in parentheses
            ref_params, ref_gmac, _ = PAPER[(preset, size)]
            assert f"({ref_params:.2f}M)" in params_cell and f"({ref_gmac})" in gmac_cell
    micro = measured(preset, "model=micro", "in_chans=1", "num_classes=10")
    params, gmac = re.match(r"([\d.]+)M / ([\d.]+)", cells[10]).groups()
    assert float(params) == pytest.approx(micro["params_m"], abs=0.006)
    assert float(gmac) == pytest.approx(micro["gmac"], abs=0.00006)


def test_the_demo_section_shows_the_demo_report_itself():
    """The README's demo figure and table are the files `make demo` wrote, not a copy edited by hand."""
    demo = section("The demo")
    report = Path(__file__).resolve().parent.parent / "reports" / "demo"
    assert (report / "comparison.md").read_text().strip() in demo
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", demo):
        assert (report.parent.parent / image).is_file(), image
