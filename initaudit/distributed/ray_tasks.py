"""A checkpoint's work units as Ray tasks (the optional `ray` extra, imported only here): the same pure
`measure_unit` each rank of `check --distributed` runs, on a cluster already running Ray. A task Ray retries
returns the same summary, merged once."""

from __future__ import annotations

from initaudit.config import Options
from initaudit.distributed import checkpoint
from initaudit.judge.report import Report
from initaudit.load.source import Loaded
from initaudit.measure.summary import Finished
from initaudit.pipeline import analyse


def measured(loaded: Loaded, options: Options) -> dict[str, Finished | str]:
    """The checkpoint's units measured as Ray tasks (on the cluster `ray.init` joined), their summaries merged."""
    import ray

    work, skipped = checkpoint.tasks(loaded, options)
    task = ray.remote(checkpoint.measure_unit)
    return checkpoint.finished(ray.get([task.remote(t) for t in work]), skipped)


def report(loaded: Loaded, options: Options) -> Report:
    """The report of a checkpoint measured as Ray tasks."""
    return analyse(loaded, options, measured_from=measured(loaded, options)).report
