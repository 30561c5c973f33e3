"""`--format github`: GitHub Actions workflow commands, one annotation per finding (and per unreadable model)."""

from __future__ import annotations

from typing import IO

from initaudit.common.printable import printable
from initaudit.judge.report import Results
from initaudit.reporters import View

LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def _escape(text: str) -> str:
    """A workflow command's data: the text as `printable` shows it (so no line break ends the command early and
    no control character reaches the log), then GitHub's own escape of '%'."""
    return printable(text).replace("%", "%25")


def _escape_property(text: str) -> str:
    """A property (file=, title=): also ':' and ',', which would end it."""
    return _escape(text).replace(":", "%3A").replace(",", "%2C")


def write(results: Results, out: IO[str], view: View) -> None:
    for report, f in results.findings:
        title = _escape_property(f"{f.code} {f.rule} ({f.layer})")
        out.write(f"::{LEVEL[f.severity]} file={_escape_property(report.model)},title={title}::{_escape(f.message)}\n")
    for e in results.unreadable:
        out.write(f"::error file={_escape_property(e.path)},title=initaudit::{_escape(e.message)}\n")
    for report in results.reports:
        if report.no_verdict():
            out.write(f"::error file={_escape_property(report.model)},title=initaudit::{_escape(report.no_verdict())}\n")
