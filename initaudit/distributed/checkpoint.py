"""A checkpoint fanned out: its work units (load/plan.py) as measuring tasks, a pure `measure_unit(task)` that reads
one unit's bytes and summarizes them (measure/summary.py), a deterministic split of the tasks over workers, and
the merged summaries ready for `pipeline.analyse(..., measured_from=...)`. torchrun ranks (distributed/ranks.py)
and Ray tasks (distributed/ray_tasks.py) run the same functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from initaudit.config import Options
from initaudit.load import plan
from initaudit.load.source import Loaded
from initaudit.measure import stats, summary
from initaudit.measure.summary import Finished, Summary
from initaudit.measure.tensors import summary_targets
from initaudit.pipeline import build_graph


@dataclass(frozen=True)
class Task:
    """One unit to measure, and how its tensor is summarized (as the measuring pass reads that tensor)."""

    unit: plan.Unit
    units: bool
    unit_axis: int


def tasks(loaded: Loaded, options: Options) -> tuple[list[Task], dict[str, str]]:
    """The measuring tasks of a loaded checkpoint's audited tensors, and the tensors not measured (non-float
    values) with why: both from its metadata alone."""
    targets = summary_targets(build_graph(loaded, options))
    units = plan.plan(loaded, list(targets), stats.chunk_rows,
                      whole=frozenset(k for k, (_, axis) in targets.items() if axis != 0))
    skipped = {u.key: stats.auditable(torch.empty(0, dtype=u.dtype))[1] for u in units
               if stats.auditable(torch.empty(0, dtype=u.dtype))[0] is None}
    return [Task(u, *targets[u.key]) for u in units if u.key not in skipped], skipped


def measure_unit(task: Task) -> Summary:
    """One unit read (its byte range only) and summarized."""
    u = task.unit
    try:
        return summary.summarize(plan.read_unit(u), u.key, u.shape, u.offset, units=task.units,
                                 unit_axis=task.unit_axis)
    except ValueError as exc:  # a piece of a tensor whose units are not on dim 0
        from initaudit.common.errors import InputError

        raise InputError(f"{u.file}: {u.key}: {exc}") from None


def assign(work: list[Task], workers: int) -> list[list[Task]]:
    """The tasks split over `workers`, the same way in every process: the largest first, each to the worker with
    the fewest bytes so far (the lowest rank on a tie)."""
    shares: list[list[Task]] = [[] for _ in range(workers)]
    load = [0] * workers
    for task in sorted(work, key=lambda t: (-t.unit.nbytes, t.unit.key, t.unit.offset)):
        w = min(range(workers), key=lambda i: (load[i], i))
        shares[w].append(task)
        load[w] += task.unit.nbytes
    return shares


def finished(summaries: list[Summary], skipped: dict[str, str]) -> dict[str, Finished | str]:
    """Every tensor's merged summaries finished (a retried unit counted once), with the tensors not measured."""
    out: dict[str, Finished | str] = dict(skipped)
    for key, merged in summary.merge_all(summaries).items():
        out[key] = summary.finish(merged)
    return out


def bytes_read(done: list[Task]) -> int:
    """What measuring these tasks read (each unit's byte range, checked whole by plan.read_unit)."""
    return sum(t.unit.nbytes for t in done)


def measure_all(loaded: Loaded, options: Options) -> dict[str, Finished | str]:
    """A checkpoint's summaries measured in this process, unit by unit (one worker)."""
    work, skipped = tasks(loaded, options)
    return finished([measure_unit(t) for t in work], skipped)

