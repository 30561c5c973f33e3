"""`--format concise` (the default off a terminal): one line per finding, `path:layer: CODE rule severity: message`,
like ruff's; then the models' notes and one summary line (findings only with --quiet; counts per rule with
--statistics). Never wrapped or padded; coloured only when asked to be."""

from __future__ import annotations

from typing import IO

from rich.text import Text

from initaudit.common.printable import printable
from initaudit.judge.report import Results
from initaudit.reporters import View, message, render, statistics, totals
from initaudit.reporters.table import STYLE


def write(results: Results, out: IO[str], view: View) -> None:
    def draw(console):
        if view.statistics:
            for line in statistics(results):
                console.print(line)
        else:
            for report, f in results.findings:
                console.print(Text.assemble((f"{printable(report.model)}:{printable(f.layer)}:", "bold"),
                                            f" {f.code} {f.rule} ", (f"{f.severity}:", STYLE[f.severity]),
                                            f" {message(f)}"))
        if view.quiet:
            return
        where: dict[str, list[str]] = {}
        for report in results.reports:
            for note in report.notes:
                where.setdefault(note, []).append(report.model)
        for note, models in where.items():  # a note many models share is said once
            said = f"{len(models)} files: " if len(models) > 1 else f"{models[0]}: "
            console.print(Text(printable(f"{said}note: {note}"), style="dim"))
        for report in results.reports:
            if report.coverage is not None:
                console.print(Text(printable(f"{report.model}: {report.coverage.line()}"),
                                   style="bold red" if report.nothing_audited else "dim"))
        console.print(totals(results))

    out.write(render(view, draw))
