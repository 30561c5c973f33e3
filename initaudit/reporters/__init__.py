"""Reporters, one module per output format; each takes a Report and writes text."""

from __future__ import annotations

from typing import IO, Callable

from ..report import Report
from . import github, json_report, sarif, table

REPORTERS: dict[str, Callable[[Report, IO[str]], None]] = {
    "table": table.write,
    "json": json_report.write,
    "sarif": sarif.write,
    "github": github.write,
}
