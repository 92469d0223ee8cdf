"""Writing tables: CSV at full precision, Markdown and LaTeX rounded for reading, HTML for the index.

Markdown and LaTeX are written here by hand rather than with `DataFrame.to_markdown` (needs the
`tabulate` package) or `to_latex` (needs jinja2 and a Styler): the tables are small and plain, and
one formatting function for both keeps the printed numbers identical in every format.
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.axes import is_missing
from analysis.stats import MAX_SEEDS

__all__ = ["MISSING", "fmt", "plural", "Cell", "number_cell", "interval_cell", "count_cell",
           "text_cell", "seeds_needed_cell", "pairs_cell", "experiment_columns", "format_table",
           "printed_cells", "one_line", "markdown_cell", "unescape_markdown", "to_markdown", "to_latex",
           "to_html", "write_table"]

MISSING = "n/a"  # how an absent number prints (not measured, one seed has no spread, ...)


def fmt(value: Any, spec: str) -> str:
    """`value` formatted with a format spec, or MISSING."""
    return MISSING if is_missing(value) else format(value, spec)


def plural(count: int, unit: str) -> str:
    """"1 seed", "3 seeds"."""
    return f"{count} {unit}" + ("" if count == 1 else "s")


def _half_unit(text: str) -> float:
    """Half a unit of the last printed digit: the most rounding can have moved a printed number."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10 ** -decimals + 1e-9


@dataclass(frozen=True)
class Cell:
    """One printed column: how a row prints (`render`), and what a printed cell says about the numbers
    it came from (`parse`: one (value, tolerance) per name of `columns`; tolerance None compares text).
    The report prints with `render`; analysis.check reads the written tables back with `parse`."""

    columns: tuple[str, ...]
    render: Callable[[Any], str]
    parse: Callable[[str], list[tuple[Any, float | None]]]


def _read_number(text: str) -> tuple[float, float]:
    return (math.nan, 0.0) if text == MISSING else (float(text), _half_unit(text))


def number_cell(column: str, spec: str) -> Cell:
    """A number, formatted with `spec` ("n/a" when missing)."""
    return Cell((column,), lambda r: fmt(r[column], spec), lambda text: [_read_number(text)])


def _seeds_needed_text(row) -> str:
    if row["verdict"] != "unresolved":
        return "-"
    needed = row["seeds_needed"]
    if is_missing(needed):
        if row["pairs"] == 1:
            return "needs 2 seeds"
        if row["pairs"] == 0:  # both sides measured, by no seed in common
            return "needs paired seeds"
        # tied pairs: a spread of 0 observed, so no count of seeds follows from it
        return "no spread to judge by" if row["delta_top1_std"] == 0 else MISSING
    if needed == float("inf"):
        return "never (Δ = 0)" if row["delta_top1_mean"] == 0 else f"> {MAX_SEEDS}"
    return f"{int(needed)}"


def _read_seeds_needed(text: str) -> list[tuple[float, float]]:
    if text.isdigit():
        return [(float(text), 0.0)]
    return [(float("inf"), 0.0)] if text.startswith((">", "never")) else [(float("nan"), 0.0)]


def seeds_needed_cell() -> Cell:
    """The paired seeds that would settle an unresolved difference (`seeds_needed`; "-" for any other
    verdict, "> MAX_SEEDS" for too small a difference, "never" for none at all)."""
    return Cell(("seeds_needed",), _seeds_needed_text, _read_seeds_needed)


_INTERVAL = re.compile(r"\[(\S+), (\S+)\]")


def interval_cell(low: str, high: str, count: str, spec: str, unit: str = "seed") -> Cell:
    """A confidence interval "[low, high]"; with one value, "1 seed: no interval" (never a fake ± 0)."""
    def render(row):
        if is_missing(row[low]) or is_missing(row[high]):
            n = row[count]
            return MISSING if is_missing(n) or int(n) != 1 else f"1 {unit}: no interval"
        return f"[{fmt(row[low], spec)}, {fmt(row[high], spec)}]"

    def parse(text):
        match = _INTERVAL.fullmatch(text)
        if not match:
            return [(math.nan, 0.0), (math.nan, 0.0)]
        return [_read_number(match.group(1)), _read_number(match.group(2))]
    return Cell((low, high), render, parse)


def count_cell(column: str, unit: str) -> Cell:
    """A count with its unit: "3 seeds"."""
    def parse(text):
        return [(math.nan, 0.0)] if text == MISSING else [(float(text.split()[0]), 0.0)]
    def render(row):
        return MISSING if is_missing(row[column]) else plural(int(row[column]), unit)
    return Cell((column,), render, parse)


_UNPAIRED = re.compile(r"\((\d+) unpaired left out\)")


def pairs_cell() -> Cell:
    """The paired seeds of a difference ("3 seeds"), and the seeds of one side only that it leaves out
    (`unpaired`): "2 seeds (1 unpaired left out)"."""
    def render(row):
        text = MISSING if is_missing(row["pairs"]) else plural(int(row["pairs"]), "seed")
        unpaired = row.get("unpaired", 0)
        return text if is_missing(unpaired) or not unpaired else f"{text} ({int(unpaired)} unpaired left out)"

    def parse(text):
        match = _UNPAIRED.search(text)
        pairs = math.nan if text == MISSING else float(text.split()[0])
        return [(pairs, 0.0), (float(match.group(1)) if match else 0.0, 0.0)]
    return Cell(("pairs", "unpaired"), render, parse)


def text_cell(column: str) -> Cell:
    """A word, compared as printed: "resolved"."""
    return Cell((column,), lambda r: MISSING if is_missing(r[column]) else str(r[column]),
                lambda text: [(None if text == MISSING else text, None)])


def printed_cells(cells: Mapping[str, Cell]) -> dict[str, Callable[[Any], str]]:
    """header -> render, for format_table."""
    return {header: cell.render for header, cell in cells.items()}


def experiment_columns(table: pd.DataFrame, *, block: bool = True) -> dict[str, Callable[[Any], str]]:
    """The printed columns that say which experiment a row is: a settings column only where rows
    differ in one (an empty table has none), then the block, model, data, epochs and train images."""
    columns: dict[str, Callable[[Any], str]] = {}
    if len(table) and (table["settings"] != "").any():
        columns["settings"] = lambda r: r["settings"]
    if block:
        columns["block"] = lambda r: r["block"]
    columns.update({"model": lambda r: r["model"], "data": lambda r: r["data"],
                    "epochs": lambda r: fmt(r["epochs"], "d"),
                    "train images": lambda r: fmt(r["train_size"], "d")})
    return columns


def format_table(frame: pd.DataFrame, columns: Mapping[str, Callable[[Any], str]]) -> pd.DataFrame:
    """A table of strings: header -> (format of one row). `columns` maps each printed header to a
    function of the row, so that combined cells (mean ± std) are one column."""
    data = {header: [render(row) for _, row in frame.iterrows()] for header, render in columns.items()}
    return pd.DataFrame(data, columns=list(columns))


def _cell(value: Any) -> str:
    return MISSING if is_missing(value) else str(value)


_LINE_BREAK = re.compile(r"\s*[\r\n]+\s*")
_MARKDOWN_ESCAPED = re.compile(r"([\\|<])")


def one_line(text: str) -> str:
    """A cell's text on one line: a line break (a YAML block's claim, a name) and the space around it
    become one space, since a Markdown row ends at a line break and a blank line ends a LaTeX cell."""
    return _LINE_BREAK.sub(" ", text).strip()


def markdown_cell(value: Any) -> str:
    """A cell as a Markdown table holds it: one line, with `\\`, `|` (the column rule) and `<` (an
    HTML tag to a renderer: a name like `<b>` or `<!--` would format or hide the rest of the page)
    escaped; analysis.check reads it back with unescape_markdown."""
    return _MARKDOWN_ESCAPED.sub(r"\\\1", one_line(_cell(value)))


def unescape_markdown(text: str) -> str:
    """The text of a cell markdown_cell wrote."""
    return re.sub(r"\\([\\|<])", r"\1", text)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (each cell as markdown_cell writes it)."""
    def line(cells):
        return "| " + " | ".join(markdown_cell(c) for c in cells) + " |"
    numeric = [i for i, c in enumerate(table.columns) if _is_numeric_column(table[c])]
    rule = ["---:" if i in numeric else "---" for i in range(len(table.columns))]
    rows = [line(table.columns), "|" + "|".join(rule) + "|"]
    rows += [line(row) for row in table.itertuples(index=False, name=None)]
    return "\n".join(rows) + "\n"


def _is_numeric_column(column: pd.Series) -> bool:
    """Right-align columns whose printed cells are numbers (so decimals line up in a renderer)."""
    def numeric(text):
        text = _cell(text).split(" ± ")[0]
        try:
            return math.isfinite(float(text))
        except ValueError:
            return text == MISSING
    return len(column) > 0 and all(numeric(v) for v in column)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _latex_escape(text: str) -> str:
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return text.replace("±", r"$\pm$")


def to_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs tabular (inside a table environment when `caption` is given)."""
    align = "".join("r" if _is_numeric_column(table[c]) else "l" for c in table.columns)
    body = [r"\begin{tabular}{" + align + "}", r"\toprule",
            " & ".join(_latex_escape(str(c)) for c in table.columns) + r" \\", r"\midrule"]
    body += [" & ".join(_latex_escape(one_line(_cell(v))) for v in row) + r" \\"
             for row in table.itertuples(index=False, name=None)]
    body += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        body = [r"\begin{table}[t]", r"\centering", r"\caption{" + _latex_escape(caption) + "}", *body,
                r"\end{table}"]
    return "\n".join(body) + "\n"


def to_html(table: pd.DataFrame) -> str:
    """An HTML table of the printed cells (for index.html)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in table.itertuples(index=False, name=None))
    return f'<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{rows}</tbody>\n</table>\n'


def write_table(numbers: pd.DataFrame, printed: pd.DataFrame, stem: Path, formats=("csv", "md"),
                caption: str | None = None) -> list[Path]:
    """`numbers` as <stem>.csv (full precision, for re-use), `printed` as <stem>.md / .tex."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in formats:
        path = stem.with_suffix(f".{kind}")
        if kind == "csv":
            numbers.to_csv(path, index=False)  # floats as repr: they read back exactly
        elif kind == "md":
            path.write_text(to_markdown(printed))
        elif kind == "tex":
            path.write_text(to_latex(printed, caption))
        else:
            raise ValueError(f"unknown table format {kind!r}: csv, md or tex")
        paths.append(path)
    return paths
