"""What a train-start audit raises to stop the run: the same exception, with the same message, on every rank."""

from __future__ import annotations

from initaudit.judge.report import Finding


class InitAuditError(RuntimeError):
    """initaudit stopped the run at train start: the model could not be audited, or it failed the audit."""


class NotMaterialized(InitAuditError):
    """The model's parameters do not hold their values at this moment (meta tensors, DeepSpeed ZeRO-3 partitions,
    FSDP1 flat shards): nothing can be said about their initialization, so the audit refuses rather than pass."""


class InitAuditFailed(InitAuditError):
    """Findings at or above `fail_on`: `findings` holds them (from every rank where they differ)."""

    def __init__(self, message: str, findings: list[Finding], fail_on: str):
        super().__init__(message)
        self.findings = findings
        self.fail_on = fail_on

    def __reduce__(self):
        """Pickled whole, findings included (launchers that spawn ranks send a rank's exception back)."""
        return type(self), (str(self), self.findings, self.fail_on)
