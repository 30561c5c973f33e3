"""Options: `[tool.initaudit]` in pyproject.toml, overridden by command-line flags.

    [tool.initaudit]
    fail-on = "warning"                    # error | warning | info | never
    activation = "relu"                    # default for layers whose activation is not known
    select = ["IA1", "init-activation-mismatch"]
    ignore = ["nonzero-bias"]
    trust-pickle = false

    [tool.initaudit.activations]           # per-layer activations, glob patterns over layer names
    "head.*" = "identity"
    "encoder.*.fc1" = "gelu"

    [tool.initaudit.per-layer-ignores]     # checkpoints hold no comments: this stands in for `# noqa`
    "classifier" = ["zero-weights"]
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activations import Activation, parse
from .errors import InputError
from .report import FAIL_ON

_KEYS = frozenset({"fail-on", "activation", "activations", "select", "ignore", "per-layer-ignores", "trust-pickle"})


@dataclass
class Options:
    fail_on: str = "error"
    activation: Activation | None = None
    activations: dict[str, Activation] = field(default_factory=dict)
    select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    per_layer_ignores: dict[str, list[str]] = field(default_factory=dict)
    trust_pickle: bool = False
    state: str = "auto"  # fresh/trained verdict on the weights: auto, or forced (--state)

    def ignored(self, layer: str, rule: str, code: str) -> bool:
        return any(fnmatch.fnmatchcase(layer, pattern) and (rule in names or any(code.startswith(n) for n in names))
                   for pattern, names in self.per_layer_ignores.items())


def find_pyproject(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load(path: Path | None = None, start: Path | None = None) -> Options:
    """Options from an explicit config file, or the nearest pyproject.toml above `start` (default: cwd)."""
    path = path or find_pyproject(start or Path.cwd())
    if path is None:
        return Options()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read config ({exc})") from None
    table = data.get("tool", {}).get("initaudit", {}) if path.name == "pyproject.toml" else data
    return from_table(table, str(path))


def from_table(table: dict[str, Any], where: str = "config") -> Options:
    unknown = set(table) - _KEYS
    if unknown:
        raise InputError(f"{where}: unknown [tool.initaudit] key(s) {sorted(unknown)} (known: {sorted(_KEYS)})")
    fail_on = table.get("fail-on", "error")
    if fail_on not in FAIL_ON:
        raise InputError(f"{where}: fail-on must be one of {FAIL_ON}")
    try:
        return Options(
            fail_on=fail_on,
            activation=parse(table["activation"]) if "activation" in table else None,
            activations={pattern: parse(spec) for pattern, spec in table.get("activations", {}).items()},
            select=list(table.get("select", [])), ignore=list(table.get("ignore", [])),
            per_layer_ignores={p: list(v) for p, v in table.get("per-layer-ignores", {}).items()},
            trust_pickle=bool(table.get("trust-pickle", False)))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    except (AttributeError, TypeError) as exc:
        raise InputError(f"{where}: malformed [tool.initaudit] table ({exc})") from None
