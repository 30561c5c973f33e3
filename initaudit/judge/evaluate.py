"""Judging: the rules evaluated on every measured tensor's facts into findings, the rules that trained weights
kept quiet, and the report's per-layer rows."""

from __future__ import annotations

import math
from typing import Any, Callable

from initaudit.judge import rules as rulebook
from initaudit.judge.report import Finding, LayerRow
from initaudit.measure import depth, schemes
from initaudit.measure.tensors import Measured


def evaluate(measured: list[Measured], rules: list[rulebook.Rule],
             ignored: Callable[[str, str, str], bool] = lambda layer, rule, code: False) -> list[Finding]:
    """Every finding of `rules` on the measured tensors' facts, errors first (a tensor tied across layers of one
    kind once, under its first name; a head tied to an embedding as both; `ignored(layer, rule name, code)`: the
    per-layer ignores)."""
    findings = []
    kind_of: dict[str, str] = {}  # a tensor's key -> the kind of its first layer
    for m in measured:
        kind_of.setdefault(m.param.key, m.layer.kind)
        if m.param.shared_with is not None and kind_of.get(m.param.shared_with) == m.layer.kind:
            continue  # the same finding under another name
        for rule in rules:
            severity = rule.verdict(m.facts)
            if severity is None or ignored(m.layer.name, rule.name, rule.code):
                continue
            findings.append(Finding(
                rule=rule.name, code=rule.code, severity=severity, layer=m.layer.name, tensor=m.param.key,
                message=rule.render(m.facts), expected=_plain(m.facts.get(rule.expected)) if rule.expected else None,
                actual=_plain(m.facts.get(rule.actual)) if rule.actual else None, fix=_fix_text(rule, m),
                origin=m.facts.get("origin") if rule.name in depth.RULES else None))
    order = {s: i for i, s in enumerate(reversed(rulebook.SEVERITIES))}
    return sorted(findings, key=lambda f: (order[f.severity], f.code))


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fix_text(rule: rulebook.Rule, m: Measured) -> str | None:
    if rule.fix == "zeros" or (rule.fix == "reinit" and m.param.role in ("bias", "norm_bias")):
        return "zeros_()"
    if m.param.role == "norm_weight":
        return "ones_()"
    if m.param.role == "parameter":
        return None  # a free parameter has no scheme to re-draw it with
    if rule.fix == "reinit":
        return m.recommended.call if m.recommended else "re-draw with a random scheme (activation unknown: pass --activation)"
    return None

def set_aside(measured: list[Measured], rules: list[rulebook.Rule]) -> list[str]:
    """The rules that trained weights kept below the severity they would have on fresh ones."""
    rank = {None: -1, **{s: i for i, s in enumerate(rulebook.SEVERITIES)}}
    names = []
    for m in measured:
        if m.facts.get("state") != "trained":
            continue
        for rule in rules:
            if rule.name not in names and rank[rule.verdict({**m.facts, "state": "fresh"})] > rank[rule.verdict(m.facts)]:
                names.append(rule.name)
    return names


def layer_rows(measured: list[Measured]) -> list[LayerRow]:
    """The report's row of every measured weight."""
    rows = []
    for m in measured:
        if not m.param.is_weight:
            continue
        rows.append(LayerRow(
            name=m.layer.name, kind=m.layer.kind, fan_in=m.param.fan_in, fan_out=m.param.fan_out,
            activation=str(m.layer.activation), std=m.stats.std, expected_std=m.facts["expected_std"],
            scheme=m.fingerprint.scheme if m.fingerprint else "unknown", tensor=m.param.key,
            norm_after=m.layer.norm_after, run_depth=m.layer.run_depth, state=m.facts.get("layer_state", "unknown"),
            fit=_fit_evidence(m.fingerprint),
            predicted_gain=m.facts.get("predicted_gain"), predicted_scale=m.facts.get("predicted_scale"),
            predicted_grad_scale=m.facts.get("predicted_grad_scale"), effective_scale=m.facts["effective_scale"],
            parametrization=m.param.parametrization))
    return rows


def _fit_evidence(fp: schemes.Fingerprint | None) -> dict[str, Any] | None:
    """Why the fingerprint names what it names: the shape, implied std and std z-score of the named scheme,
    the runner-up's, and a near-tie's names (JSON-safe: no NaN)."""
    if fp is None:
        return None
    out = {"shape": fp.shape, "implied_std": fp.implied_std, "gain": fp.gain, "fan": fp.fan, **fp.evidence}
    return {k: v for k, v in out.items() if v not in ("", None) and not (isinstance(v, float) and not math.isfinite(v))}
