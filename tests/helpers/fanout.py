"""A checkpoint fanned out in one process: its work units shared among workers taken in turn, and the report
built from their merged summaries."""

from __future__ import annotations

import json
from pathlib import Path

from initaudit.config import Options
from initaudit.distributed import checkpoint
from initaudit.load.dispatch import load
from initaudit.pipeline import analyse


def report_json(report) -> str:
    return json.dumps(report.to_dict(), indent=2)


def fanned_out(path: Path | str, workers: int, retry: bool = False) -> tuple[str, list[int]]:
    """The report of `path` measured by `workers` workers in turn (each only its share of the units), and the bytes
    each read; `retry`: every worker's first unit measured twice (a retried task)."""
    loaded, options = load(path), Options()
    work, skipped = checkpoint.tasks(loaded, options)
    shares = checkpoint.assign(work, workers)
    summaries = []
    for share in shares:
        summaries += [checkpoint.measure_unit(t) for t in share + share[:1] * retry]
    found = checkpoint.finished(summaries, skipped)
    return report_json(analyse(loaded, options, measured_from=found).report), [checkpoint.bytes_read(s) for s in shares]
