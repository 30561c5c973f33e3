"""The audit's result: per-layer rows, findings, a summary, and the exit code they imply."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from initaudit import __version__
from initaudit.common.errors import InputError, did_you_mean
from initaudit.judge.rules import SEVERITIES

FAIL_ON = ("error", "warning", "info", "never")


@dataclass
class Finding:
    rule: str
    code: str
    severity: str
    layer: str
    tensor: str
    message: str
    expected: Any = None
    actual: Any = None
    fix: str | None = None
    origin: str | None = None  # signal-* findings: "predicted" (check) or "measured" (probe)


@dataclass
class LayerRow:
    name: str
    kind: str
    fan_in: int
    fan_out: int
    activation: str
    std: float | None
    expected_std: float | None
    scheme: str
    tensor: str = ""
    norm_after: bool = False
    run_depth: int = 0
    state: str = "unknown"   # the layer's weights: fresh | trained | unknown (initaudit.weight_state)
    fit: dict[str, Any] | None = None  # the fingerprint's evidence: std z-scores of the named scheme and runner-up
    predicted_gain: float | None = None        # initaudit.depth: fan_in·E[w²]·activation factor
    predicted_scale: float | None = None       # RMS of the output through depth, for a unit input
    predicted_grad_scale: float | None = None  # RMS of the gradient at the output, for a unit one at the model's output
    effective_scale: float = 1.0  # the constant the forward pass multiplies the weight by (std is the stored one's)
    parametrization: str | None = None  # weight_norm | spectral_norm: the row is the weight the module computes


@dataclass
class NotAudited:
    """Tensors of one kind left out, and why (the JSON names a lone one as `tensor`, a group by a few `examples`)."""

    kind: str
    reason: str
    tensors: list[str]

    @property
    def count(self) -> int:
        return len(self.tensors)

    def to_dict(self) -> dict[str, Any]:
        head = {"tensor": self.tensors[0]} if self.count == 1 else {}
        tail = {"examples": self.tensors[:5]} if self.count > 1 else {}
        return {**head, "kind": self.kind, "count": self.count, "reason": self.reason, **tail}

    def said(self) -> str:
        """'2 buffers (a batch counter, not weights)' or 'bn.num_batches_tracked (a batch counter, not weights)'."""
        return f"{self.tensors[0] if self.count == 1 else f'{self.count} {self.kind}s'} ({self.reason})"


@dataclass
class Coverage:
    """How many of a model's tensors were audited, and which were not and why."""

    tensors: int = 0
    audited: int = 0
    not_audited: list[NotAudited] = field(default_factory=list)

    @classmethod
    def of(cls, stored: list[str], audited: set[str], skipped: dict[tuple[str, str], list[str]]) -> "Coverage":
        """From every stored tensor's name, the audited ones and the others by (kind, reason); a stored tensor in
        neither belongs to no layer."""
        said = audited | {key for keys in skipped.values() for key in keys}
        rest = [key for key in stored if key not in said]
        groups = {**skipped, **({("tensor", "not part of any layer"): rest} if rest else {})}
        return cls(len(set(stored) | said), len(audited),
                   [NotAudited(kind, reason, list(keys)) for (kind, reason), keys in groups.items() if keys])

    def line(self) -> str:
        """'coverage: 7 of 9 tensors audited; not audited: 2 buffer (a batch counter, not weights)'."""
        text = f"coverage: {self.audited} of {self.tensors} tensors audited"
        return text + ("; not audited: " + ", ".join(n.said() for n in self.not_audited) if self.not_audited else "")

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "audited": self.audited,
                "not_audited": [n.to_dict() for n in self.not_audited]}

    @property
    def weights_left_out(self) -> bool:
        """Tensors that may be weights were left out (not only buffers and an optimizer's state)."""
        return any(n.kind not in ("buffer", "optimizer tensor") for n in self.not_audited)


@dataclass
class Report:
    model: str
    format: str
    layers: list[LayerRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weights_state: str = "unknown"  # fresh | trained | mixed | unknown
    state_evidence: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, Any] = field(default_factory=dict)  # `expect` and `recipe`, where the user or model declared them
    coverage: Coverage | None = None  # set by the pipeline (a report built by hand may have none)
    baselined: list[Finding] | None = None  # with a baseline: its findings, set aside (initaudit.judge.baseline)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def summary(self) -> dict[str, int]:
        counts = {"layers": len({row.name for row in self.layers}), "errors": self.count("error"),
                  "warnings": self.count("warning"), "infos": self.count("info")}
        return counts if self.baselined is None else {**counts, "baselined": len(self.baselined)}

    def failed(self, fail_on: str = "error") -> bool:
        """Any finding at or above `fail_on` ('never' never fails)."""
        if fail_on not in FAIL_ON:
            raise InputError(f"fail_on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}"
                             + did_you_mean(fail_on, FAIL_ON))
        if fail_on == "never":
            return False
        floor = SEVERITIES.index(fail_on)
        return any(SEVERITIES.index(f.severity) >= floor for f in self.findings)

    @property
    def nothing_audited(self) -> bool:
        """No tensor audited, or no layer while tensors that may be weights were left out: never a clean report."""
        c = self.coverage
        return c is not None and (c.audited == 0 or (not self.layers and c.weights_left_out))

    def no_verdict(self) -> str | None:
        """Why this report is no verdict ('nothing audited: coverage: ...'), or None."""
        if not self.nothing_audited:
            return None
        return f"{'nothing' if self.coverage.audited == 0 else 'no layer'} audited: {self.coverage.line()}"

    def exit_code(self, fail_on: str = "error") -> int:
        """2 when nothing of the model could be audited, else 1 on a finding at or above `fail_on`."""
        if self.nothing_audited:
            return 2
        return 1 if self.failed(fail_on) else 0

    def by_rule(self) -> set[tuple[str, str]]:
        """(rule, layer) pairs: what a comparison across formats looks at."""
        return {(f.rule, f.layer) for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "initaudit", "version": __version__, "model": self.model, "format": self.format,
                "layers": [_row_dict(row) for row in self.layers],
                "findings": [finding_dict(f) for f in self.findings],
                **({"baselined": [finding_dict(f) for f in self.baselined]} if self.baselined is not None else {}),
                "summary": self.summary, "notes": self.notes,
                "weights_state": self.weights_state, "state_evidence": self.state_evidence, **self.declared,
                **({"coverage": self.coverage.to_dict()} if self.coverage is not None else {})}


@dataclass
class FileError:
    """A model of a several-model run that could not be audited (exit 2), and why."""

    path: str
    message: str


@dataclass
class Results:
    """One run: the reports of every model it covered and the ones it could not read.

    `combined` is False when the run named a single model: its JSON keeps the single-report shape.
    """

    reports: list[Report] = field(default_factory=list)
    unreadable: list[FileError] = field(default_factory=list)
    skipped: list[FileError] = field(default_factory=list)  # files of a combined run that hold no model weights
    combined: bool = True

    @property
    def summary(self) -> dict[str, int]:
        total = {"files": len(self.reports) + len(self.unreadable), "unreadable": len(self.unreadable),
                 "skipped": len(self.skipped),
                 "layers": 0, "errors": 0, "warnings": 0, "infos": 0}
        for report in self.reports:
            for key, value in report.summary.items():
                if isinstance(value, int):  # counts add up across models
                    total[key] = total.get(key, 0) + value
            if report.coverage is not None:
                total["tensors"] = total.get("tensors", 0) + report.coverage.tensors
                total["audited"] = total.get("audited", 0) + report.coverage.audited
        return total

    @property
    def findings(self) -> list[tuple[Report, Finding]]:
        return [(report, f) for report in self.reports for f in report.findings]

    def exit_code(self, fail_on: str = "error") -> int:
        """The worst of all: 2 when a model could not be read, else 1 when one has findings at or above `fail_on`."""
        return 2 if self.unreadable else max((r.exit_code(fail_on) for r in self.reports), default=0)

    def to_dict(self) -> dict[str, Any]:
        if not self.combined and len(self.reports) == 1:
            return self.reports[0].to_dict()
        return {"tool": "initaudit", "version": __version__, "files": [r.to_dict() for r in self.reports],
                "unreadable": [asdict(e) for e in self.unreadable], "skipped": [asdict(e) for e in self.skipped],
                "summary": self.summary}


def finding_dict(f: Finding) -> dict[str, Any]:
    """A finding's JSON; `origin` only where it has one (the signal rules')."""
    return {k: v for k, v in _clean(asdict(f)).items() if k != "origin" or v is not None}


def _row_dict(row: LayerRow) -> dict[str, Any]:
    """A layer row's JSON; `parametrization` only where it has one."""
    return {k: v for k, v in _clean(asdict(row)).items() if k != "parametrization" or v is not None}


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: unknown numbers become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
