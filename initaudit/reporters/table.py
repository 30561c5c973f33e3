"""`--format full` (the default on a terminal): per model, a rich table of its layers, then its findings."""

from __future__ import annotations

from typing import IO

from rich.table import Table
from rich.text import Text

from initaudit.common.printable import printable
from initaudit.judge.report import Report, Results
from initaudit.judge.rules import SEVERITIES
from initaudit.reporters import View, counts, render, statistics, totals

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def number(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.3g}"


def layer_table(report: Report) -> Table:
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
        kind = f"{row.kind} ({row.parametrization})" if row.parametrization else row.kind
        cells = (row.name if row.tensor in (row.name, f"{row.name}.weight") else row.tensor, kind,
                 f"{row.fan_in}→{row.fan_out}", act, row.scheme, number(row.std), number(row.expected_std),
                 number(ratio), " ".join(sorted(set(codes.get(row.name, [])))))
        table.add_row(*(Text(printable(c)) for c in cells), style=style)
    return table


def draw_report(console, report: Report, view: View) -> None:
    """One model: its table, findings, notes and summary line (findings only with view.quiet)."""
    if not view.quiet:
        console.print(layer_table(report))
    if not view.statistics:
        for f in report.findings:
            console.print(Text.assemble((f"{f.severity:7}", STYLE[f.severity]), f" {f.code} ", (f.rule, "bold"),
                                        f" {printable(f.message)}"))
            if f.fix and not view.quiet:
                console.print(Text(f"        fix: {printable(f.fix)}", style="dim"))
    if view.quiet:
        return
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="dim"))
    if report.coverage is not None:
        console.print(Text(printable(report.coverage.line()), style="bold red" if report.nothing_audited else "dim"))
    console.print(counts(report.summary))


def write(results: Results, out: IO[str], view: View) -> None:
    def draw(console):
        for i, report in enumerate(results.reports):
            if view.quiet:  # no table, whose title names the model: a header where several models have findings
                if results.combined and report.findings and not view.statistics:
                    console.print(Text(printable(f"{report.model}:"), style="bold"))
            elif i:
                console.print()
            draw_report(console, report, view)
        if view.statistics:
            for line in statistics(results):
                console.print(line)
        if results.combined and not view.quiet:
            console.print()
            console.print(Text(totals(results), style="bold"))

    out.write(render(view, draw))
