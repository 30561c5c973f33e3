"""`--format github`: GitHub Actions workflow commands, one annotation per finding."""

from __future__ import annotations

from typing import IO

from ..printable import printable
from ..report import Report

LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def _escape(text: str) -> str:
    """Workflow-command escaping over `printable`: no control character reaches the log."""
    return printable(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def _escape_property(text: str) -> str:
    return _escape(text).replace(":", "%3A").replace(",", "%2C")


def write(report: Report, out: IO[str]) -> None:
    for f in report.findings:
        title = _escape_property(f"{f.code} {f.rule} ({f.layer})")
        out.write(f"::{LEVEL[f.severity]} file={_escape_property(report.model)},title={title}::{_escape(f.message)}\n")
