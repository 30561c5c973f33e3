"""Options: `[tool.initaudit]` in pyproject.toml, overridden by command-line flags.

    [tool.initaudit]
    fail-on = "warning"                    # error | warning | info | never
    activation = "relu"                    # default for layers whose activation is not known
    select = ["IA1", "init-activation-mismatch"]
    ignore = ["nonzero-bias"]
    exclude = ["old-runs"]                 # replaces the default exclusions of folder walks (ruff's)
    extend-exclude = ["*.tmp.pt"]          # adds to them
    signal-band = [0.01, 100]              # the RMS scale the signal must keep through depth (initaudit.depth)
    expect = "trained"                     # the state the weights must be in (or a table, below)
    baseline = "initaudit-baseline.json"   # findings recorded by --write-baseline do not fail (relative to this file)

    [tool.initaudit.expect]                # per layer: glob patterns over layer names, the most specific wins
    "backbone.*" = "trained"
    "head.*" = "fresh"

    [tool.initaudit.recipe]                # the declared init, per tensor: glob patterns over tensor names
    "*.weight" = "normal(0.02)"            # torch.nn.init names: normal(std), trunc_normal(std, a, b), uniform(a, b),
    "*.bias" = "zeros"                     # kaiming_normal(mode=fan_out, nonlinearity=relu), xavier_uniform(gain=1),
    "*.c_proj.weight" = "normal(0.0029)"   # orthogonal(gain=1), zeros, ones, constant(val)

    [tool.initaudit.activations]           # per-layer activations, glob patterns over layer names
    "head.*" = "identity"
    "encoder.*.fc1" = "gelu"

    [tool.initaudit.per-layer-ignores]     # checkpoints hold no comments: this stands in for `# noqa`
    "classifier" = ["zero-weights"]

`--config FILE` reads any TOML file: its `[tool.initaudit]` table, else its top-level keys. Every value
is checked against the schema below (an error names the file and the key). A config file can never
make initaudit run code: `--trust-pickle` is a command-line flag only.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initaudit.judge import rules as rulebook
from initaudit.flow.activations import Activation, parse
from initaudit.load.bounded import MAX_TOML_BYTES, Unreadable, loads_toml, read_regular
from initaudit.common.errors import InputError
from initaudit.judge.report import FAIL_ON
from initaudit.measure.recipes import Recipe, parse as parse_recipe

MAX_PATTERNS = 1000  # glob patterns per table: each is matched against every layer (and finding)
SIGNAL_BAND = (1e-2, 1e2)  # the RMS scale, relative to the input's, the signal must keep through depth
_KEYS = ("fail-on", "activation", "activations", "select", "ignore", "per-layer-ignores", "exclude", "extend-exclude",
         "signal-band", "expect", "recipe", "baseline")
STATES = ("trained", "fresh")
_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
               dict: "a table"}


@dataclass
class Options:
    fail_on: str = "error"
    activation: Activation | None = None
    activations: dict[str, Activation] = field(default_factory=dict)
    select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    per_layer_ignores: dict[str, list[str]] = field(default_factory=dict)
    state: str = "auto"  # fresh/trained verdict on the weights: auto, or forced (--state)
    exclude: list[str] | None = None  # folder-walk exclusions replacing the defaults (initaudit.discover)
    extend_exclude: list[str] = field(default_factory=list)
    signal_band: tuple[float, float] = SIGNAL_BAND  # initaudit.depth: the RMS scale the signal must stay within
    expect: dict[str, str] = field(default_factory=dict)  # layer pattern -> the state its weights must be in
    recipes: dict[str, Recipe] = field(default_factory=dict)  # tensor pattern -> the declared init
    baseline: Path | None = None  # a baseline file (initaudit.judge.baseline): its findings do not fail the run

    def ignored(self, layer: str, rule: str, code: str) -> bool:
        return any((rule in names or any(code.startswith(n) for n in names)) and fnmatch.fnmatchcase(layer, pattern)
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
    raw = read_regular(path, MAX_TOML_BYTES, "a config file")  # a FIFO or /dev/zero is refused, not read
    try:
        data = loads_toml(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); a TOML file must be UTF-8") from None
    except Unreadable as exc:
        raise InputError(f"{path}: not readable TOML ({exc})") from None
    options = from_table(_initaudit_table(data, path), str(path))
    if options.baseline is not None:
        options.baseline = path.parent / options.baseline  # relative to the config file (an absolute one stays)
    return options


def _initaudit_table(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """`[tool.initaudit]`, or a non-pyproject file's top-level keys."""
    if "tool" not in data:
        return {} if path.name == "pyproject.toml" else data
    tool = data["tool"]
    if not isinstance(tool, dict):
        raise InputError(f"{path}: `tool` must be a table holding [tool.initaudit], not {_type_name(tool)}")
    table = tool.get("initaudit", {} if path.name == "pyproject.toml" else None)
    if table is None:
        raise InputError(f"{path}: no [tool.initaudit] table")
    if not isinstance(table, dict):
        raise InputError(f"{path}: [tool.initaudit] must be a table, not {_type_name(table)}")
    return table


def from_table(table: dict[str, Any], where: str = "config") -> Options:
    """Options from a `[tool.initaudit]` table, every key and value checked against the schema."""
    if "trust-pickle" in table:
        raise InputError(f"{where}: trust-pickle cannot be set in a config file (a file in a repository must "
                         "never make initaudit run code); pass --trust-pickle on the command line")
    for key in table:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(f"{where}: unknown [tool.initaudit] key {key!r} ({hint}known: {', '.join(_KEYS)})")
    fail_on = _typed(table, "fail-on", str, where, "error")
    if fail_on not in FAIL_ON:
        raise InputError(f"{where}: fail-on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
    activation = _typed(table, "activation", str, where, None)
    activations = _typed(table, "activations", dict, where, {})
    per_layer = _typed(table, "per-layer-ignores", dict, where, {})
    recipes = _typed(table, "recipe", dict, where, {})
    for key, patterns in (("activations", activations), ("per-layer-ignores", per_layer), ("recipe", recipes)):
        if len(patterns) > MAX_PATTERNS:
            raise InputError(f"{where}: {key} holds {len(patterns):,} patterns, more than the {MAX_PATTERNS:,} "
                             "initaudit matches layer names against")
    try:
        return Options(
            fail_on=fail_on,
            activation=parse(activation) if activation is not None else None,
            activations={pattern: parse(_typed(activations, pattern, str, where, None, "activations"))
                         for pattern in activations},
            select=_rule_list(table, "select", where), ignore=_rule_list(table, "ignore", where),
            per_layer_ignores={pattern: _rule_list(per_layer, pattern, where, "per-layer-ignores")
                               for pattern in per_layer},
            exclude=_string_list(table, "exclude", where) if "exclude" in table else None,
            extend_exclude=_string_list(table, "extend-exclude", where),
            signal_band=_band(table, where), expect=_expect(table, where), baseline=_baseline(table, where),
            recipes={pattern: parse_recipe(_typed(recipes, pattern, str, where, None, "recipe")) for pattern in recipes})
    except InputError as exc:
        if str(exc).startswith(where):
            raise
        raise InputError(f"{where}: {exc}") from None


def _type_name(value: Any) -> str:
    """'a string ('relu')': the TOML type of a value, with the value itself when it is a scalar."""
    name = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{name} ({value!r})" if isinstance(value, (str, int, float)) else name


def _typed(table: dict[str, Any], key: str, kind: type, where: str, default: Any, within: str = "") -> Any:
    """table[key] if it is of `kind` (a bool is no integer), else an error naming the file and the key."""
    if key not in table:
        return default
    value = table[key]
    if type(value) is not kind:
        name = f"{within}.{key!r}" if within else key
        raise InputError(f"{where}: {name} must be {_TYPE_NAMES[kind]}, not {_type_name(value)}")
    return value


def _string_list(table: dict[str, Any], key: str, where: str) -> list[str]:
    values = _typed(table, key, list, where, [])
    for value in values:
        if not isinstance(value, str):
            raise InputError(f"{where}: {key} must list glob patterns as strings, not {_type_name(value)}")
    return list(values)


def _band(table: dict[str, Any], where: str) -> tuple[float, float]:
    """`signal-band = [low, high]`: positive numbers around 1."""
    band = _typed(table, "signal-band", list, where, list(SIGNAL_BAND))
    if (len(band) != 2 or not all(type(v) in (int, float) for v in band)
            or not 0 < band[0] < 1 < band[1] < float("inf")):
        raise InputError(f"{where}: signal-band must be [low, high] with 0 < low < 1 < high, not {band!r}")
    return float(band[0]), float(band[1])


def _baseline(table: dict[str, Any], where: str) -> Path | None:
    name = _typed(table, "baseline", str, where, None)
    if name is not None and not name.strip():
        raise InputError(f"{where}: baseline must name a file, not an empty string")
    return Path(name) if name is not None else None


def expect_table(value: Any, where: str) -> dict[str, str]:
    """`expect = "trained"` (every layer) or a table of layer patterns to trained/fresh."""
    table = {"*": value} if isinstance(value, str) else value
    if not isinstance(table, dict) or len(table) > MAX_PATTERNS:
        raise InputError(f"{where}: expect must be trained, fresh or a table of layer patterns to them")
    for pattern, state in table.items():
        if state not in STATES:
            raise InputError(f"{where}: expect {pattern!r} must be one of {', '.join(STATES)}, not {state!r}")
    return dict(table)


def _expect(table: dict[str, Any], where: str) -> dict[str, str]:
    return expect_table(table["expect"], where) if "expect" in table else {}


def _rule_list(table: dict[str, Any], key: str, where: str, within: str = "") -> list[str]:
    """A list of known rule names, codes or code prefixes."""
    names = _typed(table, key, list, where, [], within)
    name = f"{within}.{key!r}" if within else key
    for n in names:
        if not isinstance(n, str):
            raise InputError(f"{where}: {name} must list rule names or codes as strings, not {_type_name(n)}")
    rulebook.check_names(rulebook.builtin_rules(), names, f"{where}: {name}: ")
    return list(names)
