"""The default, human report: a rich table of layers, then the findings."""

from __future__ import annotations

from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..printable import printable
from ..report import Report
from ..rules import SEVERITIES

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _num(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.3g}"


def write(report: Report, out: IO[str]) -> None:
    console = Console(file=out, width=max(Console(file=out).width, 120), highlight=False)
    worst: dict[str, str] = {}
    for f in report.findings:
        if SEVERITIES.index(f.severity) >= SEVERITIES.index(worst.get(f.layer, "info")):
            worst[f.layer] = f.severity
    codes: dict[str, list[str]] = {}
    for f in report.findings:
        codes.setdefault(f.layer, []).append(f.code)
    table = Table(title=Text(printable(f"{report.model} ({report.format})")), title_justify="left")
    for col in ("layer", "kind", "fan in→out", "activation", "scheme", "std", "expected", "ratio", "findings"):
        table.add_column(col, justify="right" if col in ("std", "expected", "ratio") else "left")
    for row in report.layers:
        ratio = row.std / row.expected_std if row.std is not None and row.expected_std else None
        act = row.activation + (" +norm" if row.norm_after else "")
        style = STYLE.get(worst.get(row.name, ""), "")
        cells = (row.name if row.tensor in (row.name, f"{row.name}.weight") else row.tensor, row.kind,
                 f"{row.fan_in}→{row.fan_out}", act, row.scheme, _num(row.std), _num(row.expected_std),
                 _num(ratio), " ".join(sorted(set(codes.get(row.name, [])))))
        table.add_row(*(Text(printable(c)) for c in cells), style=style)
    console.print(table)
    for f in report.findings:
        console.print(Text.assemble((f"{f.severity:7}", STYLE[f.severity]), f" {f.code} ", (f.rule, "bold"),
                                    f" {printable(f.message)}"))
        if f.fix:
            console.print(Text(f"        fix: {printable(f.fix)}", style="dim"))
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="dim"))
    s = report.summary
    console.print(f"{s['layers']} layers: {s['errors']} errors, {s['warnings']} warnings, {s['infos']} infos")
