"""The audit's result: per-layer rows, findings, a summary, and the exit code they imply."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from . import __version__
from .rules import SEVERITIES

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
    predicted_gain: float | None = None        # initaudit.depth: fan_in·E[w²]·activation factor
    predicted_scale: float | None = None       # RMS of the output through depth, for a unit input
    predicted_grad_scale: float | None = None  # RMS of the gradient at the output, for a unit one at the model's output


@dataclass
class Report:
    model: str
    format: str
    layers: list[LayerRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weights_state: str = "unknown"  # fresh | trained | mixed | unknown
    state_evidence: dict[str, Any] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def summary(self) -> dict[str, int]:
        return {"layers": len({row.name for row in self.layers}), "errors": self.count("error"),
                "warnings": self.count("warning"), "infos": self.count("info")}

    def failed(self, fail_on: str = "error") -> bool:
        """Any finding at or above `fail_on` ('never' never fails)."""
        if fail_on == "never":
            return False
        floor = SEVERITIES.index(fail_on)
        return any(SEVERITIES.index(f.severity) >= floor for f in self.findings)

    def exit_code(self, fail_on: str = "error") -> int:
        return 1 if self.failed(fail_on) else 0

    def by_rule(self) -> set[tuple[str, str]]:
        """(rule, layer) pairs: what a comparison across formats looks at."""
        return {(f.rule, f.layer) for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "initaudit", "version": __version__, "model": self.model, "format": self.format,
                "layers": [_clean(asdict(row)) for row in self.layers],
                "findings": [_finding(f) for f in self.findings],
                "summary": self.summary, "notes": self.notes,
                "weights_state": self.weights_state, "state_evidence": self.state_evidence}


def _finding(f: Finding) -> dict[str, Any]:
    """A finding's JSON; `origin` only where it has one (the signal rules')."""
    return {k: v for k, v in _clean(asdict(f)).items() if k != "origin" or v is not None}


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: unknown numbers become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
