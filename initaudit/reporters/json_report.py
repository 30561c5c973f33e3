"""`--format json`: the stable JSON contract (see DESIGN.md); several models: {"tool", "version", "files", "summary"}."""

from __future__ import annotations

import json
from typing import IO

from initaudit.judge.report import Results
from initaudit.reporters import View


def write(results: Results, out: IO[str], view: View) -> None:
    json.dump(results.to_dict(), out, indent=2)
    out.write("\n")
