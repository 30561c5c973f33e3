"""Scheme fingerprinting: which init most likely drew a weight, and the std each scheme implies.

The std of thousands of draws is known to well under 1 %, and the shape of the distribution
(excess kurtosis: uniform −1.2, normal 0, normal truncated at ±2σ −0.63; its extreme values)
tells uniform from normal draws, so named schemes whose stds differ by more than a few percent
are told apart. Where two schemes give the same std for this shape (Xavier and LeCun on a square
layer, say), the one consistent with the layer's activation is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .activations import Activation
from .stats import TensorStats

# Measured std of a normal truncated at ±2σ, as a fraction of σ.
TRUNC_2SIGMA_STD = 0.8796
# Excess kurtosis of each init family's distribution.
EXCESS_KURTOSIS = {"normal": 0.0, "uniform": -1.2, "trunc-normal": -0.6344}
MAX_ORTHOGONAL_CHECK = 2048

# Which scheme families suit which activation family (for naming ties and for the fixer).
CONSISTENT = {
    "relu": {"kaiming"},
    "saturating": {"xavier"},
    "selu": {"lecun"},
    "identity": {"xavier", "lecun", "torch-default", "orthogonal"},
    "recurrent": {"torch-default", "orthogonal"},  # torch's LSTM/GRU default: uniform ±1/sqrt(hidden)
}


@dataclass(frozen=True)
class Fingerprint:
    scheme: str            # e.g. kaiming-normal, xavier-uniform, torch-default, normal-0.02, unknown
    family: str            # kaiming | xavier | lecun | torch-default | fixed | orthogonal | constant | zeros | unknown
    shape: str             # normal | uniform | trunc-normal | any
    implied_std: float     # the std the named scheme gives this tensor (nan when unknown)
    fit: float             # measured std / implied std
    nearest: str = ""      # for unknown: the closest named scheme


@dataclass(frozen=True)
class _Candidate:
    scheme: str
    family: str
    shape: str       # the distribution shape the scheme draws
    std: float


def _shape_of(stats: TensorStats) -> str:
    """normal | uniform | trunc-normal | any (too few values, or no clear shape)."""
    n, k = stats.finite, stats.excess_kurtosis
    if n < 256 or not math.isfinite(k) or stats.std == 0:
        return "any"
    se = math.sqrt(24.0 / n)
    tol = max(4 * se, 0.12)
    peak = (stats.abs_max - abs(stats.mean)) / stats.std
    if abs(k - EXCESS_KURTOSIS["uniform"]) < tol and peak < 1.8:
        return "uniform"
    if abs(k - EXCESS_KURTOSIS["trunc-normal"]) < tol and peak < 2.35:
        return "trunc-normal"
    if abs(k) < max(tol, 0.5):
        return "normal"
    return "any"


def _candidates(fan_in: int, fan_out: int, kind: str, hidden: int | None, repeats: int = 1) -> list[_Candidate]:
    out = []
    both = ("normal", "uniform")
    if kind == "embedding":
        out.append(_Candidate("torch-default", "torch-default", "normal", 1.0))
    elif kind == "recurrent" and hidden:
        out.append(_Candidate("torch-default", "torch-default", "uniform", 1 / math.sqrt(3 * hidden)))
    else:
        out.append(_Candidate("torch-default", "torch-default", "uniform", 1 / math.sqrt(3 * fan_in)))
    for shape in both:
        out.append(_Candidate(f"kaiming-{shape}", "kaiming", shape, math.sqrt(2 / fan_in)))
        out.append(_Candidate(f"kaiming-{shape}-fan-out", "kaiming", shape, math.sqrt(2 / fan_out)))
        out.append(_Candidate(f"xavier-{shape}", "xavier", shape, math.sqrt(2 / (fan_in + fan_out))))
        out.append(_Candidate(f"xavier-{shape}", "xavier", shape, 5 / 3 * math.sqrt(2 / (fan_in + fan_out))))
        out.append(_Candidate(f"lecun-{shape}", "lecun", shape, math.sqrt(1 / fan_in)))
    for std in (0.02, 0.01, 0.001):
        out.append(_Candidate(f"normal-{std:g}", "fixed", "normal", std))
        out.append(_Candidate(f"trunc-normal-{std:g}", "fixed", "trunc-normal", std * TRUNC_2SIGMA_STD))
    if repeats > 1:  # GPT-2's residual projections: 0.02/sqrt(2·n_layer), n_layer = how often the layer repeats
        out.append(_Candidate("normal-0.02-scaled", "fixed", "normal", 0.02 / math.sqrt(2 * repeats)))
    return out


# The gains calculate_gain gives the activations people use, from SELU's 3/4 to tanh's 5/3.
GAIN_RANGE = (0.75, 5 / 3)


@dataclass(frozen=True)
class Envelope:
    """The lowest and highest std some common scheme draws for a layer, whatever activation follows."""

    low: float
    low_scheme: str
    high: float
    high_scheme: str

    def nearest(self, std: float) -> tuple[float, str]:
        """The std (and its scheme) of the envelope nearest to `std`: `std` itself when inside."""
        if std < self.low:
            return self.low, self.low_scheme
        if std > self.high:
            return self.high, self.high_scheme
        return std, "a common scheme"


def envelope(fan_in: int, fan_out: int, kind: str = "linear", hidden: int | None = None, repeats: int = 1) -> Envelope:
    """Every std a layer could legitimately have with its activation unknown: torch's default, Kaiming
    for ReLU (either fan), Xavier and LeCun with any calculate_gain gain from SELU's to tanh's,
    transformers' normal/trunc-normal 0.02 (0.01 and heads' 0.001 too) and GPT-2/timm depth-scaled 0.02/sqrt(2·n_layer)."""
    fan_in, fan_out = max(fan_in, 1), max(fan_out, 1)
    lo_gain, hi_gain = GAIN_RANGE
    stds = {"torch-default": 1 / math.sqrt(3 * (hidden if kind == "recurrent" and hidden else fan_in)),
            "kaiming-normal": math.sqrt(2 / min(fan_in, fan_out)),
            "lecun-normal (gain 3/4)": lo_gain / math.sqrt(max(fan_in, fan_out)),
            "xavier-normal (gain 5/3)": hi_gain * math.sqrt(2 / (fan_in + fan_out)),
            "normal-0.001": 0.001, "normal-0.01": 0.01, "trunc-normal-0.02": 0.02 * TRUNC_2SIGMA_STD, "normal-0.02": 0.02}
    if repeats > 1:
        stds["normal-0.02-scaled"] = 0.02 / math.sqrt(2 * repeats)
    low = min(stds, key=stds.get)
    high = max(stds, key=stds.get)
    return Envelope(stds[low], low, stds[high], high)


def _is_orthogonal(weight: torch.Tensor, unit_axis: int, stats: TensorStats) -> bool:
    """Rows (or columns, whichever are fewer) orthogonal with one common norm: torch.nn.init.orthogonal_.

    Only where those rows/columns all have one norm (random draws spread by a few percent) is the
    Gram matrix computed.
    """
    if weight.dim() < 2 or not stats.norm_spread < 1e-4:
        return False
    rows = weight.detach().movedim(unit_axis, 0).reshape(weight.shape[unit_axis], -1).to(torch.float64)
    if min(rows.shape) < 2 or min(rows.shape) > MAX_ORTHOGONAL_CHECK:
        return False
    if rows.shape[0] > rows.shape[1]:
        rows = rows.T
    gram = rows @ rows.T
    scale = gram.diagonal().mean()
    if scale <= 0:
        return False
    return bool((gram / scale - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max() < 1e-3)


def fingerprint(stats: TensorStats, fan_in: int, fan_out: int, kind: str = "linear",
                activation: Activation | None = None, weight: torch.Tensor | None = None,
                unit_axis: int = 0, hidden: int | None = None, repeats: int = 1) -> Fingerprint:
    """Name the most likely init scheme of one weight tensor (`repeats`: how many blocks hold this layer)."""
    if stats.finite == 0:
        return Fingerprint("unknown", "unknown", "any", math.nan, math.nan)
    if stats.constant:
        name = "zeros" if stats.max == 0 else "constant"
        return Fingerprint(name, name, "any", 0.0, math.nan)
    shape = _shape_of(stats)
    if weight is not None and kind != "embedding" and _is_orthogonal(weight, unit_axis, stats):
        return Fingerprint("orthogonal", "orthogonal", shape, stats.std, 1.0)
    tol = max(0.06, 3 / math.sqrt(2 * stats.finite))
    preferred = CONSISTENT.get("recurrent" if kind == "recurrent" else activation.family if activation else "", set())
    scored = []
    for c in _candidates(max(fan_in, 1), max(fan_out, 1), kind, hidden, repeats):
        err = abs(math.log(stats.std / c.std)) if stats.std > 0 else math.inf
        scored.append((err, c, shape == "any" or c.shape == shape))
    fits = [(err, c) for err, c, ok in scored if ok and err <= tol]
    if not fits:
        err, c, _ = min(scored, key=lambda t: t[0])
        return Fingerprint("unknown", "unknown", shape, math.nan, math.nan, nearest=c.scheme)
    # Schemes whose stds the data cannot tell apart (within 3 standard errors of the std estimate)
    # are a tie, resolved toward the family consistent with the activation.
    margin = 3 / math.sqrt(2 * stats.finite)
    best_err = min(err for err, _ in fits)
    close = [(err, c) for err, c in fits if err <= best_err + margin]
    err, best = min(close, key=lambda t: (t[1].family not in preferred, t[0]))
    return Fingerprint(best.scheme, best.family, shape if shape != "any" else best.shape,
                       best.std, stats.std / best.std)


@dataclass(frozen=True)
class Recommendation:
    """The scheme the selection guide recommends for a layer, its std, and the torch.nn.init call that draws it."""

    scheme: str
    std: float
    fn: str                          # a torch.nn.init function
    kwargs: tuple[tuple[str, Any], ...]
    basis: str                       # why this scheme
    gain_of: str | None = None       # the activation whose calculate_gain gives `gain` (for display)

    @property
    def call(self) -> str:
        """How a user writes it: kaiming_normal_(mode='fan_in', nonlinearity='relu')."""
        args = [f"{k}=calculate_gain('{self.gain_of}')" if k == "gain" and self.gain_of else f"{k}={v!r}"
                for k, v in self.kwargs]
        return f"{self.fn}({', '.join(args)})"

    def draw(self, tensor: torch.Tensor) -> torch.Tensor:
        """Fill `tensor` (in torch's [out, in, ...] layout) in place with torch.nn.init itself."""
        return getattr(torch.nn.init, self.fn)(tensor, **dict(self.kwargs))


def recommend(activation: Activation, fan_in: int, fan_out: int, kind: str = "linear",
              hidden: int | None = None, role: str = "weight") -> Recommendation | None:
    """Kaiming for ReLU-family, Xavier (with calculate_gain's gain) for tanh/sigmoid, LeCun for SELU
    and for linear (identity) layers, orthogonal for recurrent hidden-to-hidden weights (Xavier for
    their input weights); None when the activation is unknown."""
    fan_in, fan_out = max(fan_in, 1), max(fan_out, 1)
    if kind == "embedding":
        return None
    if kind == "recurrent":
        if role == "weight_hh":  # orthogonal_ on [gates·h, h]: each entry has variance 1/max(rows, cols)
            return Recommendation("orthogonal", 1 / math.sqrt(max(fan_in, fan_out)), "orthogonal_", (),
                                  "orthogonal for recurrent hidden-to-hidden weights")
        return Recommendation("xavier-uniform", math.sqrt(2 / (fan_in + fan_out)), "xavier_uniform_", (),
                              "Xavier for recurrent input weights (sigmoid/tanh gates)")
    family = activation.family
    if family == "relu":
        kwargs = (("mode", "fan_in"), ("nonlinearity", activation.torch_nonlinearity))
        if activation.torch_nonlinearity == "leaky_relu":
            kwargs = (("a", activation.param if activation.param is not None else 0.01),) + kwargs
        return Recommendation("kaiming-normal", activation.gain / math.sqrt(fan_in), "kaiming_normal_", kwargs,
                              f"Kaiming (He) for {activation}")
    if family == "saturating":
        gain_of = activation.name if activation.name in ("tanh", "sigmoid") else "tanh"
        return Recommendation("xavier-uniform", activation.gain * math.sqrt(2 / (fan_in + fan_out)), "xavier_uniform_",
                              (("gain", activation.gain),), f"Xavier (Glorot) for {activation}", gain_of)
    if family in ("selu", "identity"):
        return Recommendation("lecun-normal", 1 / math.sqrt(fan_in), "kaiming_normal_",
                              (("mode", "fan_in"), ("nonlinearity", "linear")),
                              "LeCun for SELU" if family == "selu" else "LeCun (variance-preserving) for a linear layer")
    return None
