"""The Lightning callback: audit the LightningModule at `on_fit_start` and stop `trainer.fit` on findings.

    from initaudit.integrations.lightning import InitAuditCallback

    trainer = lightning.Trainer(callbacks=[InitAuditCallback(write_report=True)])

Findings go to Python logging and, as counts (`initaudit/errors`, `initaudit/warnings`, `initaudit/infos`,
`initaudit/layers`), to the trainer's loggers; a logger whose experiment takes text (TensorBoard's `add_text`)
gets the findings too. `write_report=True` writes the JSON report into `trainer.log_dir`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from initaudit.integrations.ranks import finding_line
from initaudit.integrations.train_start import TrainStartAudit, summary_counts
from initaudit.judge.report import Report


class InitAuditCallback(TrainStartAudit, Callback):
    """Audit `pl_module` when fit starts; raise InitAuditFailed (on every rank) on findings at or above fail_on.

    Keywords: `write_report` (into `trainer.log_dir`) or `output_dir`; `config`, `fail_on`, `logger`,
    `report_name` as for `audit_at_train_start`; the rest (`activation=`, `ignore=`...) as for `initaudit.audit`."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        agreed = self.audit(pl_module, lambda: trainer.log_dir)  # log_dir is broadcast: every rank asks it
        if trainer.is_global_zero and agreed.report is not None:
            to_trainer_loggers(trainer, agreed.report)
        agreed.raise_if_failed()


def to_trainer_loggers(trainer: Any, report: Report) -> None:
    """The counts to every logger of the trainer, the findings as text where the experiment takes text."""
    text = "\n".join(finding_line(f) for f in report.findings) or "no findings"
    for logger in trainer.loggers:
        logger.log_metrics(summary_counts(report), step=trainer.global_step)
        add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
        if callable(add_text):
            add_text("initaudit", text, global_step=trainer.global_step)
        logger.save()
