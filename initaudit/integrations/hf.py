"""The Hugging Face Trainer callback: audit the model at `on_train_begin` and stop `trainer.train()` on findings.

    from initaudit.integrations.hf import InitAuditCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[InitAuditCallback(write_report=True)])

Findings go to Python logging, and the counts (`initaudit/errors`, ...) into the Trainer's `state.log_history`
(saved in its `trainer_state.json`). `write_report=True` writes the JSON report into `args.output_dir`.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from initaudit.integrations.train_start import TrainStartAudit, summary_counts


class InitAuditCallback(TrainStartAudit, TrainerCallback):
    """Audit `model` when training begins; raise InitAuditFailed (on every rank) on findings at or above fail_on.

    Keywords: `write_report` (into `args.output_dir`) or `output_dir`; `config`, `fail_on`, `logger`,
    `report_name` as for `audit_at_train_start`; the rest (`activation=`, `ignore=`...) as for `initaudit.audit`."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        agreed = self.audit(model, lambda: args.output_dir)
        if state.is_world_process_zero and agreed.report is not None:
            state.log_history.append({**summary_counts(agreed.report), "step": state.global_step})
        agreed.raise_if_failed()
