"""A pytest helper: fail a test when a model is badly initialized, with initaudit's findings table.

    from initaudit.testing import assert_well_initialized

    def test_my_model_starts_well():
        assert_well_initialized(build_model(), activation="relu")   # an nn.Module, a file or a folder
"""

from __future__ import annotations

from typing import Any

from initaudit.judge.report import Report
from initaudit.reporters import View, render
from initaudit.reporters.table import draw_report
from initaudit.judge.rules import SEVERITIES


def assert_well_initialized(model_or_path: Any, *, fail_on: str = "warning", **options: Any) -> Report:
    """Audit `model_or_path` (an nn.Module, a path, or None with model='pkg.mod:factory') and raise
    AssertionError, its message the findings table, when a finding is at or above `fail_on` (error, warning
    or info), or when nothing of the model could be audited. `options` are those of `initaudit.audit` (activation=, activations=, select=, ignore=, state=,
    model=, trust_pickle=, options=). Returns the report when the model passes."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    from initaudit.pipeline import audit

    report = audit(model_or_path, **options)
    if report.nothing_audited:
        raise AssertionError(f"{report.model}: {report.no_verdict()}")
    if report.failed(fail_on):
        raise AssertionError(describe(report, fail_on))
    return report


def describe(report: Report, fail_on: str) -> str:
    """The failure message: which findings fail, then the per-layer table and every finding, in plain text."""
    failing = [f for f in report.findings if SEVERITIES.index(f.severity) >= SEVERITIES.index(fail_on)]
    head = f"{report.model} is not well initialized: {len(failing)} finding(s) at or above {fail_on}"
    table = render(View(), lambda console: draw_report(console, report, View()))
    return f"{head}\n{table}"
