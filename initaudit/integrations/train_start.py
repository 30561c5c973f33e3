"""The plain call for custom training loops: audit the live model in the second before training starts.

    from initaudit.integrations.train_start import audit_at_train_start

    model = build_model()
    audit_at_train_start(model, output_dir="runs/42")   # raises InitAuditFailed on findings at or above fail_on

The model is audited as `initaudit check --model` audits one (activations from the module itself), under the
`[tool.initaudit]` config found from the working directory (or `config=`). Findings go to Python logging (logger
`initaudit`, one record per finding, its level the finding's severity). In a torch.distributed run every rank
audits its model and the verdict is agreed over the process group: every rank raises, or none does; only rank 0
logs and writes the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from initaudit import config as config_file
from initaudit.common.errors import InputError, one_line
from initaudit.config import Options
from initaudit.integrations import live_model
from initaudit.integrations.errors import InitAuditError, NotMaterialized
from initaudit.integrations.ranks import Outcome, finding_line, gather, rank, verdict
from initaudit.judge.report import Report, Results, finding_dict
from initaudit.judge.rules import SEVERITIES
from initaudit.load.modules import from_module
from initaudit.pipeline import make_options, run
from initaudit.reporters import View, totals
from initaudit.reporters import json_report
from initaudit.repair.outputs import atomic

REPORT_NAME = "initaudit.json"
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}


@dataclass
class Settings:
    """What the caller asked for: the config (a path, Options or None to discover), where the report goes."""

    config: str | Path | Options | None = None
    output_dir: str | Path | None = None
    fail_on: str | None = None
    logger: logging.Logger | None = None
    report_name: str = REPORT_NAME
    group: Any = None  # the process group the verdict is agreed over (None: the default group)


@dataclass
class Agreed:
    """This rank's report (None where the rank made none) and the verdict every rank shares."""

    report: Report | None
    error: InitAuditError | None
    cause: BaseException | None = None  # what this rank raised while auditing, chained to the error

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error from self.cause


def audit_at_train_start(model: torch.nn.Module, *, config: str | Path | Options | None = None,
                         output_dir: str | Path | None = None, fail_on: str | None = None,
                         logger: logging.Logger | None = None, report_name: str = REPORT_NAME, group: Any = None,
                         **options: Any) -> Report | None:
    """Audit `model` now and stop the run on findings at or above `fail_on` (default: the config's, else 'error').

    `config`: a TOML file, an `initaudit.config.Options`, or None for the nearest pyproject.toml above the
    working directory; `output_dir`: write the JSON report there (as `report_name`, numbered when that name is
    taken: an existing file is never replaced); `logger`: where findings are logged (default `initaudit`);
    `options`: `activation=`, `activations=`, `select=`, `ignore=`, `state=` as for `initaudit.audit`.
    Raises InitAuditFailed (its `findings`), NotMaterialized, or InitAuditError; returns this rank's report.
    """
    settings = Settings(config, output_dir, fail_on, logger, report_name, group)
    agreed = audit_and_agree(model, settings, options)
    agreed.raise_if_failed()
    return agreed.report


def audit_and_agree(model: torch.nn.Module, settings: Settings, options: dict[str, Any]) -> Agreed:
    """Audit on this rank, then agree on the verdict with every other rank (the callbacks log between the two)."""
    me = rank(settings.group)
    report, outcome, cause = None, Outcome(rank=me), None
    try:
        chosen = resolve_options(settings.config, options)
        fail_on = settings.fail_on or chosen.fail_on
        report = audit_live(model, chosen)
        if report is not None:
            outcome.failing = failing(report, fail_on)
        if me == 0:
            publish(report, settings)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement, whatever this one raised
        cause, outcome.problem = exc, problem_line(exc)
        outcome.cause = "NotMaterialized" if isinstance(exc, NotMaterialized) else "InitAuditError"
        fail_on = settings.fail_on or "error"
    outcomes = gather(outcome, settings.group)
    if me == 0:
        log_other_ranks(outcomes, report, settings.logger or logging.getLogger("initaudit"))
    return Agreed(report, verdict(outcomes, fail_on), cause)


def resolve_options(config: str | Path | Options | None, options: dict[str, Any]) -> Options:
    """The config's options (discovered from the working directory, read from a file, or given), keywords over them."""
    if isinstance(config, Options):
        base = replace(config)  # the caller's Options stay as they were
    else:
        base = config_file.load(Path(config) if config is not None else None)
    return make_options(base, **options)


def audit_live(model: torch.nn.Module, options: Options) -> Report | None:
    """The report of the live model (None on ranks other than 0 of a sharded audit); unmaterialized ones refused."""
    model = live_model.unwrap(model)
    live_model.refuse_unmaterialized(model)
    if live_model.holds_dtensors(model):
        from initaudit.distributed.live import audit_sharded

        return audit_sharded(model, options)
    report = run(from_module(model, None), options)
    if report.nothing_audited:
        raise InputError(f"initaudit found nothing to audit in the model: {report.no_verdict()}")
    return report


def failing(report: Report, fail_on: str) -> list:
    """The report's findings at or above `fail_on` (none for 'never')."""
    report.failed(fail_on)  # checks the name
    if fail_on == "never":
        return []
    return [f for f in report.findings if SEVERITIES.index(f.severity) >= SEVERITIES.index(fail_on)]


def problem_line(exc: BaseException) -> str:
    """The one line every rank raises for a rank that could not audit."""
    if isinstance(exc, (InputError, InitAuditError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"initaudit failed while auditing the model: {type(exc).__name__}: {one_line(exc)}"


def publish(report: Report | None, settings: Settings) -> None:
    """Rank 0: the findings to the logger, the JSON report to the output folder when one was given."""
    logger = settings.logger or logging.getLogger("initaudit")
    if report is None:
        return
    log_report(report, logger)
    if settings.output_dir is not None:
        path = write_report(report, Path(settings.output_dir), settings.report_name)
        logger.info("initaudit: report written to %s", path)


def log_report(report: Report, logger: logging.Logger) -> None:
    """One record per finding, at its severity's level (the finding's JSON in `record.initaudit_finding`), then
    the coverage and the totals at INFO."""
    for f in report.findings:
        logger.log(LEVELS[f.severity], "initaudit: %s", finding_line(f), extra={"initaudit_finding": finding_dict(f)})
    if report.coverage is not None:
        logger.info("initaudit: %s", report.coverage.line())
    logger.info("initaudit: %s", totals(Results([report], combined=False)))


def log_other_ranks(outcomes: list[Outcome], report: Report | None, logger: logging.Logger) -> None:
    """Rank 0: the failing findings and problems of other ranks that rank 0's own report does not show."""
    own = {(f.rule, f.tensor) for f in report.findings} if report is not None else set()
    for outcome in outcomes[1:]:
        if outcome.problem is not None:
            logger.error("initaudit: rank %d: %s", outcome.rank, outcome.problem)
        for f in outcome.failing:
            if (f.rule, f.tensor) not in own:
                logger.log(LEVELS[f.severity], "initaudit: rank %d: %s", outcome.rank, finding_line(f),
                           extra={"initaudit_finding": finding_dict(f)})


def write_report(report: Report, folder: Path, name: str) -> Path:
    """The JSON report written atomically into `folder` (made if missing) as `name`, or `name` numbered
    (initaudit-2.json...) when that is taken: no existing file is replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    target = free_name(folder, name)
    with atomic(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
        json_report.write(Results([report], combined=False), out, View())
    return target


def free_name(folder: Path, name: str) -> Path:
    stem, suffix = os.path.splitext(name)
    for n in range(1, 10_000):
        candidate = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
    raise InputError(f"{folder}: {name} and 9,999 numbered names after it are taken; give another report_name")


class TrainStartAudit:
    """What the framework callbacks share: their keywords and the audit agreed over ranks.

    `write_report=True` writes the report into the framework's run folder (`output_dir=` names another)."""

    def __init__(self, *, write_report: bool = False, output_dir: str | Path | None = None,
                 config: str | Path | Options | None = None, fail_on: str | None = None,
                 logger: logging.Logger | None = None, report_name: str = REPORT_NAME, **options: Any):
        self.write_report = write_report
        self.settings = Settings(config, output_dir, fail_on, logger, report_name)
        self.options = options
        self.report: Report | None = None  # this rank's report, once audited

    def audit(self, model: torch.nn.Module, run_folder: Callable[[], str | Path]) -> Agreed:
        """Audit and agree; `run_folder()` is asked (on every rank) only when the report goes there."""
        settings = self.settings
        if self.write_report and settings.output_dir is None:
            settings = replace(settings, output_dir=run_folder())
        agreed = audit_and_agree(model, settings, self.options)
        self.report = agreed.report
        return agreed


def summary_counts(report: Report) -> dict[str, int]:
    """{'initaudit/layers': 3, 'initaudit/errors': 1, ...}: what the frameworks' loggers record."""
    return {f"initaudit/{key}": value for key, value in report.summary.items()}
