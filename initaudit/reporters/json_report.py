"""`--format json`: the stable JSON contract (see DESIGN.md)."""

from __future__ import annotations

import json
from typing import IO

from ..report import Report


def write(report: Report, out: IO[str]) -> None:
    json.dump(report.to_dict(), out, indent=2)
    out.write("\n")
