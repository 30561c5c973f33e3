"""`--format gitlab`: GitLab Code Quality JSON (a list of issues), for merge-request widgets.

Each finding is an issue on its model file (line 1: weights have no lines), with a fingerprint stable
across runs (path, rule and tensor)."""

from __future__ import annotations

import hashlib
import json
from typing import IO

from initaudit.common.printable import printable
from initaudit.judge.report import Results
from initaudit.reporters import View, message

SEVERITY = {"error": "major", "warning": "minor", "info": "info"}


def issues(results: Results) -> list[dict]:
    out = []
    for report, f in results.findings:
        key = "\0".join((report.model, f.rule, f.tensor))
        out.append({"description": f"{printable(f.layer)}: {message(f)}", "check_name": f"{f.code} {f.rule}",
                    "fingerprint": hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest(),
                    "severity": SEVERITY[f.severity], "location": {"path": report.model, "lines": {"begin": 1}}})
    return out


def write(results: Results, out: IO[str], view: View) -> None:
    json.dump(issues(results), out, indent=2)
    out.write("\n")
