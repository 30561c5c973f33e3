"""Declared init recipes: `normal(0.02)`, `trunc_normal(0.02, -0.04, 0.04)`, `uniform(-0.1, 0.1)`,
`kaiming_normal(mode=fan_out, nonlinearity=relu)`, `xavier_uniform(gain=1)`, `orthogonal(gain=1)`, `zeros`, `ones`,
`constant(0.5)` — the torch.nn.init function names (a trailing `_` is allowed) with their arguments — and whether a
measured tensor contradicts one.

A recipe is parsed as a Python call expression holding only literals and bare words (no name is looked up, nothing
is evaluated). A tensor contradicts it when its distribution's shape (excess kurtosis: normal 0, uniform -1.2, a
truncated normal its own) or its std departs from the recipe's beyond sampling error, or, for zeros/ones/constant,
when it is not that constant."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from functools import lru_cache

from initaudit.common.errors import InputError

_ARGS = {  # recipe name -> its parameters in torch.nn.init's order, with their defaults
    "normal": (("mean", 0.0), ("std", 1.0)), "trunc_normal": (("mean", 0.0), ("std", 1.0), ("a", -2.0), ("b", 2.0)),
    "uniform": (("a", 0.0), ("b", 1.0)), "constant": (("val", None),), "zeros": (), "ones": (),
    "orthogonal": (("gain", 1.0),), "xavier_normal": (("gain", 1.0),), "xavier_uniform": (("gain", 1.0),),
    "kaiming_normal": (("a", 0.0), ("mode", "fan_in"), ("nonlinearity", "leaky_relu")),
    "kaiming_uniform": (("a", 0.0), ("mode", "fan_in"), ("nonlinearity", "leaky_relu")),
}
# normal(std) and trunc_normal(std, a, b) are how configs write them: one number is the std, not the mean.
_STD_FIRST = {"normal": ("std", "mean"), "trunc_normal": ("std", "a", "b", "mean")}
_WORDS = {"mode": ("fan_in", "fan_out"),  # the arguments that take a word, and the words torch.nn.init knows
          "nonlinearity": ("linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu", "conv1d", "conv2d", "conv3d")}
UNIFORM_KURTOSIS = -1.2
MIN_SHAPE_VALUES = 512  # fewer values leave the kurtosis too loose to tell a uniform from a normal draw


@dataclass(frozen=True)
class Recipe:
    """One declared init: torch.nn.init's function name (no trailing `_`) and its arguments."""

    text: str
    name: str
    args: dict = field(hash=False)

    def expected(self, fan_in: int, fan_out: int) -> tuple[str, float, float]:
        """(shape, std, mean) the recipe draws for a weight of these fans (shape: normal, uniform, trunc, constant)."""
        a = self.args
        if self.name in ("zeros", "ones", "constant"):
            value = {"zeros": 0.0, "ones": 1.0}.get(self.name, a.get("val"))
            return "constant", 0.0, float(value)
        if self.name == "normal":
            return "normal", float(a["std"]), float(a["mean"])
        if self.name == "trunc_normal":
            std, mean = truncated_moments(float(a["mean"]), float(a["std"]), float(a["a"]), float(a["b"]))[:2]
            return "trunc", std, mean
        if self.name == "uniform":
            return "uniform", (a["b"] - a["a"]) / math.sqrt(12), (a["a"] + a["b"]) / 2
        gain = float(a.get("gain", 1.0))
        if self.name.startswith("kaiming"):
            from torch.nn.init import calculate_gain  # here: parsing a config must not import torch

            gain = calculate_gain(a["nonlinearity"], a["a"])
            std = gain / math.sqrt(fan_out if a["mode"] == "fan_out" else fan_in)
        elif self.name.startswith("xavier"):
            std = gain * math.sqrt(2 / (fan_in + fan_out))
        else:  # orthogonal: each entry's variance is gain²/max(rows, cols)
            std = gain / math.sqrt(max(fan_in, fan_out))
        return ("uniform" if self.name.endswith("uniform") else "normal"), std, 0.0

    def recommendation(self, fan_in: int, fan_out: int):
        """The recipe as the torch.nn.init call that draws it (a schemes.Recommendation, for `fix`)."""
        from initaudit.measure.schemes import Recommendation  # here: parsing a config must not import torch

        std = self.expected(max(fan_in, 1), max(fan_out, 1))[1]
        return Recommendation(self.text, std, f"{self.name}_", tuple(self.args.items()), "the declared recipe")

    def __str__(self) -> str:
        return self.text


def parse(text: str) -> Recipe:
    """A recipe from its text; an InputError says what is wrong with it."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise InputError(f"recipe {text!r}: write it as a torch.nn.init call, e.g. normal(0.02) or "
                         "kaiming_normal(mode=fan_out, nonlinearity=relu)") from None
    func, positional, keywords = (node.func, node.args, node.keywords) if isinstance(node, ast.Call) else (node, [], [])
    if not isinstance(func, ast.Name) or func.id.rstrip("_") not in _ARGS:
        raise InputError(f"recipe {text!r}: unknown init; use one of {', '.join(_ARGS)}")
    name = func.id.rstrip("_")
    order = _STD_FIRST.get(name, tuple(k for k, _ in _ARGS[name]))
    if len(positional) > len(order):
        raise InputError(f"recipe {text!r}: {name} takes at most {len(order)} positional arguments")
    given = {**dict(zip(order, map(_literal, positional))), **{k.arg: _literal(k.value) for k in keywords}}
    unknown = set(given) - {k for k, _ in _ARGS[name]}
    if unknown:
        raise InputError(f"recipe {text!r}: {name} has no argument {sorted(unknown)[0]!r}")
    args = {**dict(_ARGS[name]), **given}
    for key, value in args.items():
        allowed = _WORDS.get(key)
        if allowed is not None and value not in allowed:
            raise InputError(f"recipe {text!r}: {key} must be one of {', '.join(allowed)}")
        if allowed is None and not isinstance(value, (int, float)):
            raise InputError(f"recipe {text!r}: {key} must be a number" + (", e.g. constant(0.5)" if key == "val" else ""))
    return Recipe(text.strip(), name, args)


def _literal(node: ast.expr):
    """A number, a string or a bare word (fan_out, relu) of a recipe's arguments."""
    if isinstance(node, ast.Name):
        return node.id
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise InputError(f"recipe argument {ast.unparse(node)!r}: give a number or a word") from None
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        raise InputError(f"recipe argument {ast.unparse(node)!r}: give a number or a word")
    return value


@lru_cache(maxsize=256)
def truncated_moments(mean: float, std: float, a: float, b: float) -> tuple[float, float, float]:
    """(std, mean, excess kurtosis) of normal(mean, std) truncated to [a, b], on a fine grid."""
    import torch

    lo, hi = max(a, mean - 12 * std), min(b, mean + 12 * std)
    x = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    p = torch.exp(-((x - mean) / std) ** 2 / 2)
    p /= p.sum()
    m = float((x * p).sum())
    var = float(((x - m) ** 2 * p).sum())
    return math.sqrt(var), m, float(((x - m) ** 4 * p).sum()) / var ** 2 - 3


def contradiction(recipe: Recipe, *, std: float, mean: float, kurtosis: float, values: int, constant: bool,
                  value: float | None, fan_in: int, fan_out: int) -> str | None:
    """How the measured tensor contradicts the recipe (None: it fits)."""
    shape, want_std, want_mean = recipe.expected(max(fan_in, 1), max(fan_out, 1))
    if shape == "constant":
        if constant and math.isclose(value, want_mean, rel_tol=1e-2, abs_tol=1e-12):  # within bf16's rounding
            return None
        return f"{'hold the constant ' + format(value, '.3g') if constant else 'vary'}, not the constant {want_mean:g}"
    if constant:
        return f"hold the constant {value:.3g}, not a {shape} draw"
    if values >= MIN_SHAPE_VALUES:
        want_kurtosis = {"normal": 0.0, "uniform": UNIFORM_KURTOSIS}.get(shape)
        if want_kurtosis is None:
            want_kurtosis = truncated_moments(recipe.args["mean"], recipe.args["std"], recipe.args["a"], recipe.args["b"])[2]
        if abs(kurtosis - want_kurtosis) > max(8 * math.sqrt(24 / values), 0.3):
            return f"are not a {shape} draw (excess kurtosis {kurtosis:.2f}, the recipe's {want_kurtosis:.2f})"
    tolerance = max(6 / math.sqrt(2 * max(values, 1)), 0.1)
    if not std > 0 or not want_std > 0 or abs(math.log(std / want_std)) > math.log1p(tolerance):
        return f"have std {std:.3g}, not the recipe's {want_std:.3g}"
    return None
