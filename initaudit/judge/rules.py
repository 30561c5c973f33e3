"""Rules as data: load the YAML rules, check them against the rule schema, evaluate them on facts.

A rule file holds a list of rules. Each rule:

    code: IA101                 # stable short code
    name: zero-weights          # stable kebab-case name (the public contract)
    summary: one line
    severity: error|warning|info          # the default
    applies_to: [weight]                   # tensor roles: weight, bias, norm_weight, norm_bias, parameter, optimizer_state, any
    when: {CONDITION}                      # the rule fires where this holds
    severity_by:                           # optional ladder, first match wins; severity `none` keeps quiet
      - {severity: info, when: {CONDITION}}
    message: "{layer}: ..."                # str.format over the facts
    fix: reinit|zeros|none                 # what `initaudit fix` does about it
    expected: fact;  actual: fact          # which facts the report gives as expected / actual
    why: text;  example: {bad: ..., good: ...};  metadata: {free annotations}

A CONDITION maps fact names to a value (equality), a list (membership) or an operator map
({lt, le, gt, ge, ne, in, not_in, between: [lo, hi], outside: [lo, hi]}); `any`, `all` and `not`
combine conditions. Unknown keys and unknown fact names are rejected, naming the file and rule.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from initaudit.common.errors import InputError, did_you_mean
from initaudit.judge.catalogue import ALTERNATIVES, FACTS

SEVERITIES = ("info", "warning", "error")
ROLES = frozenset({"weight", "bias", "norm_weight", "norm_bias", "parameter", "optimizer_state", "any"})
FIXES = frozenset({"reinit", "zeros", "none"})
_RULE_KEYS = frozenset({"code", "name", "summary", "severity", "applies_to", "when", "severity_by", "message",
                        "fix", "expected", "actual", "why", "example", "metadata"})
_REQUIRED = ("code", "name", "summary", "severity", "when", "message", "why")
_OPERATORS = frozenset({"lt", "le", "gt", "ge", "ne", "in", "not_in", "between", "outside"})



@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    summary: str
    severity: str
    when: dict
    message: str
    why: str
    applies_to: tuple[str, ...] = ("weight",)
    severity_by: tuple[tuple[str, dict], ...] = ()
    fix: str = "none"
    expected: str | None = None
    actual: str | None = None
    example: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    source: str = ""

    def applies(self, role: str) -> bool:
        return "any" in self.applies_to or role in self.applies_to

    def verdict(self, facts: dict[str, Any]) -> str | None:
        """The severity this rule gives these facts, or None when it does not fire.

        A near-tie of schemes (facts[ALTERNATIVES]: each name's scheme facts) is judged once per name: a
        verdict every name gives stands (the mildest severity they share); one that depends on the pick is info.
        """
        alternatives = facts.get(ALTERNATIVES) or ()
        if len(alternatives) < 2:
            return self._verdict(facts)
        verdicts = {self._verdict({**facts, **alt}) for alt in alternatives}
        if None in verdicts:
            return None if verdicts == {None} else "info"
        return min(verdicts, key=SEVERITIES.index)

    def _verdict(self, facts: dict[str, Any]) -> str | None:
        if not self.applies(facts.get("role", "")) or not holds(self.when, facts):
            return None
        for severity, cond in self.severity_by:
            if holds(cond, facts):
                return None if severity == "none" else severity
        return self.severity

    def render(self, facts: dict[str, Any]) -> str:
        return self.message.format_map(_Facts(facts))


class _Facts(dict):
    """Facts for str.format: a missing or None fact prints as '?', not a KeyError."""

    def __missing__(self, key):
        return _Missing()


class _Missing:
    def __format__(self, spec):
        return "?"


# ---------------------------------------------------------------- evaluation

def holds(cond: dict, facts: dict[str, Any]) -> bool:
    for key, want in cond.items():
        if key == "any":
            ok = any(holds(c, facts) for c in want)
        elif key == "all":
            ok = all(holds(c, facts) for c in want)
        elif key == "not":
            ok = not holds(want, facts)
        else:
            ok = _matches(facts.get(key), want)
        if not ok:
            return False
    return True


def _matches(have: Any, want: Any) -> bool:
    if have is None or (isinstance(have, float) and math.isnan(have)):
        return False
    if isinstance(want, list):
        return have in want
    if isinstance(want, dict):
        return all(_compare(have, op, arg) for op, arg in want.items())
    return have == want


def _compare(have: Any, op: str, arg: Any) -> bool:
    if op == "in":
        return have in arg
    if op == "not_in":
        return have not in arg
    if op == "ne":
        return have != arg
    if op == "between":
        return arg[0] <= have <= arg[1]
    if op == "outside":
        return have < arg[0] or have > arg[1]
    return {"lt": have < arg, "le": have <= arg, "gt": have > arg, "ge": have >= arg}[op]


# ---------------------------------------------------------------- loading and the schema

def _check_condition(cond: Any, where: str) -> None:
    if not isinstance(cond, dict):
        raise InputError(f"{where}: a condition must be a mapping, not {type(cond).__name__}")
    for key, want in cond.items():
        if key in ("any", "all"):
            if not isinstance(want, list) or not want:
                raise InputError(f"{where}: '{key}' takes a non-empty list of conditions")
            for c in want:
                _check_condition(c, where)
        elif key == "not":
            _check_condition(want, where)
        elif key not in FACTS:
            raise InputError(f"{where}: unknown fact '{key}' (known: {', '.join(sorted(FACTS))})")
        elif isinstance(want, dict):
            bad = set(want) - _OPERATORS
            if bad:
                raise InputError(f"{where}: unknown operator(s) {sorted(bad)} for '{key}'")
            for op in ("between", "outside"):
                if op in want and (not isinstance(want[op], list) or len(want[op]) != 2):
                    raise InputError(f"{where}: '{op}' takes [low, high]")


def parse_rule(raw: Any, source: str) -> Rule:
    """Check one rule's mapping against the schema and build it."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: each rule must be a mapping")
    where = f"{source}: rule {raw.get('code') or raw.get('name') or '?'}"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; free annotations go under 'metadata'")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise InputError(f"{where}: missing {missing}")
    if not re.fullmatch(r"[A-Z]{2,4}\d{3}", str(raw["code"])):
        raise InputError(f"{where}: code must look like IA101")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", str(raw["name"])):
        raise InputError(f"{where}: name must be kebab-case")
    if raw["severity"] not in SEVERITIES:
        raise InputError(f"{where}: severity must be one of {SEVERITIES}")
    applies = raw.get("applies_to", ["weight"])
    applies = [applies] if isinstance(applies, str) else applies
    if not set(applies) <= ROLES:
        raise InputError(f"{where}: applies_to takes {sorted(ROLES)}")
    if raw.get("fix", "none") not in FIXES:
        raise InputError(f"{where}: fix must be one of {sorted(FIXES)}")
    _check_condition(raw["when"], where)
    for key in ("expected", "actual"):
        if key in raw and raw[key] not in FACTS:
            raise InputError(f"{where}: '{key}' names unknown fact '{raw[key]}'")
    ladder = []
    for step in raw.get("severity_by", []):
        if not isinstance(step, dict) or set(step) != {"severity", "when"}:
            raise InputError(f"{where}: each severity_by step is {{severity, when}}")
        if step["severity"] not in SEVERITIES + ("none",):
            raise InputError(f"{where}: severity_by severity must be one of {SEVERITIES + ('none',)}")
        _check_condition(step["when"], where)
        ladder.append((step["severity"], step["when"]))
    for key in ("example", "metadata"):
        if not isinstance(raw.get(key, {}), dict):
            raise InputError(f"{where}: '{key}' must be a mapping")
    return Rule(code=raw["code"], name=raw["name"], summary=str(raw["summary"]).strip(), severity=raw["severity"],
                when=raw["when"], message=raw["message"], why=str(raw["why"]).strip(), applies_to=tuple(applies),
                severity_by=tuple(ladder), fix=raw.get("fix", "none"),
                expected=raw.get("expected"), actual=raw.get("actual"), example=raw.get("example", {}),
                metadata=raw.get("metadata", {}), source=source)


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: the same safe subset, 10x faster


def load_file(path: Path, label: str | None = None) -> list[Rule]:
    label = label or str(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise InputError(f"{label}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, list):
        raise InputError(f"{label}: a rule file holds a list of rules")
    return [parse_rule(raw, label) for raw in data]


def rules_dir() -> Path:
    """The shipped rules: inside the installed wheel, or the checkout's rules/ folder (editable installs)."""
    packaged = Path(__file__).parents[1] / "builtin_rules"
    return packaged if packaged.is_dir() else Path(__file__).parents[2] / "rules"


def builtin_rules() -> list[Rule]:
    """The rules shipped with initaudit."""
    return list(_shipped())


@functools.cache
def _shipped() -> tuple[Rule, ...]:
    """The shipped rule files, parsed once per process (a check consults them several times)."""
    files = sorted(rules_dir().glob("*.yaml"))
    return tuple(check_unique([rule for f in files for rule in load_file(f, f"rules/{f.name}")]))


def check_unique(rules: list[Rule]) -> list[Rule]:
    seen: dict[str, str] = {}
    for rule in rules:
        for key in (rule.code, rule.name):
            if key in seen:
                raise InputError(f"{rule.source}: rule {key} is defined twice (also in {seen[key]})")
            seen[key] = rule.source
    return rules


def check_names(rules: list[Rule], names: list[str], where: str = "") -> None:
    """Refuse a name that is no rule's name, code or code prefix ('IA1'), suggesting the closest ones."""
    known = sorted({r.name for r in rules} | {r.code for r in rules})
    for n in names:
        if n in known or (n.startswith("IA") and any(r.code.startswith(n) for r in rules)):
            continue
        raise InputError(f"{where}unknown rule {n!r}{did_you_mean(n, known)} (see `initaudit rules`)")


def select(rules: list[Rule], select: list[str] | None = None, ignore: list[str] | None = None) -> list[Rule]:
    """Keep the rules named (by code, code prefix like 'IA1', or name) in `select`, minus `ignore`."""
    def named(rule: Rule, names: list[str]) -> bool:
        return any(n == rule.name or rule.code.startswith(n) for n in names)

    check_names(rules, [*(select or []), *(ignore or [])])
    return [r for r in rules if (not select or named(r, select)) and not named(r, ignore or [])]
