"""Scheme fingerprinting: which init most likely drew a weight, and the std each scheme implies.

Every scheme torch.nn.init draws (Kaiming and Xavier at each gain `calculate_gain` knows and both
fan modes, LeCun, torch's module defaults, fixed stds, orthogonal) is a candidate distribution of
known shape and std. Each is judged on the tensor at hand with tolerances from its own sampling
error: the std against the family's standard error (from its kurtosis), the extremes against the
bound a uniform or truncated normal cannot pass (and an order-statistics test of how close the
largest value comes to it), the kurtosis against the family's. Of the candidates that fit, the
likelihood (from the sufficient statistics n, Σw², max|w|) ranks them: those within
TIE_NATS of the best are a near-tie, named `a|b`. Kaiming at a leaky_relu slope other than torch's
named ones has its slope fitted to the measured scale (`kaiming-normal(a=0.2)`). Orthogonal weights
are recognised by a sampled Gram test. Where no candidate fits, the scheme is `unknown`.

Values exactly on a truncation bound beyond what a correct draw leaves there (`truncation_edges`) are
left out of the fit: rounding's handful (trunc_normal_'s lone -2.0 at 100σ) is no tail of the draw.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from initaudit.flow.activations import Activation
from initaudit.measure.samples import Samples
from initaudit.measure.stats import DISTINCT_SAMPLE, TensorStats, compute

GAINS = {name: torch.nn.init.calculate_gain(name) for name in ("relu", "linear", "tanh", "selu")}
"""torch.nn.init.calculate_gain's gains: linear, conv and sigmoid 1; leaky_relu at its default slope 0.01 is
ReLU's gain to 0.005 % (Kaiming's default nonlinearity), and at slope √5 torch's module default, a candidate
of its own. Other slopes are a continuum no list covers: within sampling error of ReLU's they are named so,
beyond it the slope is fitted (`_leaky_fits`)."""
MAX_SLOPE = 0.5  # leaky slopes fitted: up to 0.5 (GANs' 0.2, PReLU's 0.25, 1/√5); beyond, the gain nears LeCun's
TRUNC_BOUND = 2.0  # trunc-normal schemes cut at ±2σ


def _trunc_moments(a: float) -> dict[int, float]:
    """Even moments of a standard normal truncated at ±a (integration by parts)."""
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    m, raw = {0: 1.0}, {0: mass}
    for k in (2, 4, 6, 8):
        raw[k] = (k - 1) * raw[k - 2] - 2 * a ** (k - 1) * phi
        m[k] = raw[k] / mass
    return m


_TM = _trunc_moments(TRUNC_BOUND)
# Measured std of a normal truncated at ±2σ, as a fraction of σ.
TRUNC_2SIGMA_STD = math.sqrt(_TM[2])
# Excess kurtosis of each init family's distribution.
EXCESS_KURTOSIS = {"normal": 0.0, "uniform": -1.2, "trunc-normal": _TM[4] / _TM[2] ** 2 - 3}


def _kurtosis_variance(b4: float, b6: float, b8: float) -> float:
    """n·Var(sample kurtosis) of a symmetric family with standardized moments b4, b6, b8 (delta method)."""
    return 4 * b4 * b4 * (b4 - 1) - 4 * b4 * (b6 - b4) + b8 - b4 * b4


_KURT_VAR = {"normal": 24.0, "uniform": _kurtosis_variance(9 / 5, 27 / 7, 9.0),
             "trunc-normal": _kurtosis_variance(_TM[4] / _TM[2] ** 2, _TM[6] / _TM[2] ** 3, _TM[8] / _TM[2] ** 4)}
# The density at the bound, per unit of the bound, on both sides (the chance that the largest of n draws
# stays below bound·(1-δ) is about exp(-EDGE·n·δ)).
_EDGE = {"uniform": 1.0, "trunc-normal": 2 * TRUNC_BOUND * math.exp(-TRUNC_BOUND ** 2 / 2) / math.sqrt(2 * math.pi)
         / math.erf(TRUNC_BOUND / math.sqrt(2))}
_BOUND = {"uniform": math.sqrt(3.0), "trunc-normal": TRUNC_BOUND / TRUNC_2SIGMA_STD}  # bound / std

Z_STD = 4.5        # standard errors a scheme's std may be off and still fit
Z_KURTOSIS = 5.0   # standard errors of the kurtosis
TAIL_NATS = 13.8   # an order statistic this unlikely (e^-13.8 ≈ 1e-6) under a family rules it out
TIE_NATS = 5.0     # candidates whose likelihood is within this of the best are a near-tie (odds < e^5 ≈ 150:1)
ALIAS = 1e-4       # candidates whose stds differ by less than this (relative) draw the same distribution
MAX_TIE = 4        # a near-tie of more names than this is reported as unknown
LEAKY_Z = 2.0      # a scale this many standard errors below ReLU's gain is fitted a leaky slope
MIN_ORTHO_LENGTH = 4

# Which schemes (family, gain, fan mode; "" for either) suit which activation family, in order of
# preference. Where several schemes draw the very same distribution on a layer (Kaiming fan_out and LeCun
# fan_in wherever a conv doubles its channels; Xavier and LeCun on a square layer), that distribution is
# named after a scheme paired with the activation if one of them is: the verdict is on the distribution.
PAIRED = {
    "relu": [("kaiming", "relu", ""), ("xavier", "relu", "")],
    "saturating": [("xavier", "tanh", ""), ("xavier", "linear", ""), ("kaiming", "tanh", "fan_in"),
                   ("lecun", "linear", "fan_in")],
    "selu": [("lecun", "linear", "fan_in"), ("kaiming", "selu", "fan_in"), ("xavier", "selu", "")],
    "identity": [("lecun", "linear", "fan_in"), ("xavier", "linear", ""), ("torch-default", "", ""),
                 ("orthogonal", "", "")],
    "recurrent": [("torch-default", "", ""), ("orthogonal", "", "")],
}


@dataclass(frozen=True)
class Alternative:
    """One scheme of a near-tie, as the rules see it."""

    scheme: str
    family: str
    gain: str
    fan: str
    implied_std: float


@dataclass(frozen=True)
class Fingerprint:
    scheme: str            # e.g. kaiming-normal, xavier-uniform, torch-default, normal-0.02, unknown; a near-tie "a|b"
    family: str            # kaiming | xavier | lecun | torch-default | fixed | orthogonal | constant | zeros | unknown ("a|b" for a tie)
    shape: str             # normal | uniform | trunc-normal | any
    implied_std: float     # the std the named scheme gives this tensor (nan when unknown)
    fit: float             # measured std / implied std
    nearest: str = ""      # for unknown: the closest named scheme
    gain: str = ""         # the calculate_gain nonlinearity of the scheme (linear, relu, tanh, selu)
    fan: str = ""          # fan_in | fan_out | both (Xavier) | "" (fixed stds, defaults, orthogonal)
    alternatives: tuple[Alternative, ...] = ()   # the names of a near-tie, best first (empty when one name)
    slope: float | None = None   # the fitted leaky_relu slope `a` where the gain is "leaky_relu"
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ambiguous(self) -> bool:
        return len(self.alternatives) > 1


@dataclass(frozen=True)
class _Candidate:
    scheme: str
    family: str
    shape: str       # the distribution shape the scheme draws
    std: float
    gain: str = ""
    fan: str = ""
    slope: float | None = None

    def alternative(self) -> Alternative:
        return Alternative(self.scheme, self.family, self.gain, self.fan, self.std)


# How a scheme's name says its gain, where it is not the family's own (Kaiming: ReLU's; Xavier and LeCun: 1).
GAIN_TAG = {"linear": "", "relu": "-relu-gain", "tanh": "-tanh-gain", "selu": "-selu-gain"}


def _kaiming_name(gain: str, shape: str, fan: str) -> tuple[str, str]:
    """(scheme, family) of kaiming_{shape}_(mode=fan, nonlinearity=gain): LeCun where the gain is 1."""
    family = "lecun" if gain == "linear" else "kaiming"
    suffix = "" if gain in ("linear", "relu") else GAIN_TAG[gain]
    return f"{family}-{shape}{'-fan-out' if fan == 'fan_out' else ''}{suffix}", family


def _candidates(fan_in: int, fan_out: int, kind: str, hidden: int | None, repeats: int = 1) -> list[_Candidate]:
    out = []
    if kind == "embedding":
        out.append(_Candidate("torch-default", "torch-default", "normal", 1.0))
    elif kind == "recurrent" and hidden:
        out.append(_Candidate("torch-default", "torch-default", "uniform", 1 / math.sqrt(3 * hidden)))
    else:
        out.append(_Candidate("torch-default", "torch-default", "uniform", 1 / math.sqrt(3 * fan_in), fan="fan_in"))
    for shape in ("normal", "uniform"):
        for gain, g in GAINS.items():
            out.append(_Candidate(f"xavier-{shape}{GAIN_TAG[gain]}", "xavier", shape, g * math.sqrt(2 / (fan_in + fan_out)),
                                  gain, "both"))
            for fan, n in (("fan_in", fan_in), ("fan_out", fan_out)):
                name, family = _kaiming_name(gain, shape, fan)
                out.append(_Candidate(name, family, shape, g / math.sqrt(n), gain, fan))
    for std in (0.02, 0.01, 0.001):
        out.append(_Candidate(f"normal-{std:g}", "fixed", "normal", std))
        out.append(_Candidate(f"trunc-normal-{std:g}", "fixed", "trunc-normal", std * TRUNC_2SIGMA_STD))
    if repeats > 1:  # GPT-2's residual projections: 0.02/sqrt(2·n_layer), n_layer = how often the layer repeats
        out.append(_Candidate("normal-0.02-scaled", "fixed", "normal", 0.02 / math.sqrt(2 * repeats)))
    return out


# The gains calculate_gain gives, from SELU's 3/4 to tanh's 5/3.
GAIN_RANGE = (min(GAINS.values()), max(GAINS.values()))


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
    """Every std a layer could legitimately have with its activation unknown: torch's default, Kaiming and
    LeCun at any calculate_gain gain from SELU's to tanh's (either fan), Xavier at the same gains,
    transformers' normal/trunc-normal 0.02 (0.01 and heads' 0.001 too) and GPT-2/timm depth-scaled
    0.02/sqrt(2·n_layer)."""
    fan_in, fan_out = max(fan_in, 1), max(fan_out, 1)
    lo_gain, hi_gain = GAIN_RANGE
    stds = {"torch-default": 1 / math.sqrt(3 * (hidden if kind == "recurrent" and hidden else fan_in)),
            "kaiming-normal-fan-out-tanh-gain" if fan_out < fan_in else "kaiming-normal-tanh-gain":
                hi_gain / math.sqrt(min(fan_in, fan_out)),
            "lecun-normal (gain 3/4)": lo_gain / math.sqrt(max(fan_in, fan_out)),
            "xavier-normal (gain 5/3)": hi_gain * math.sqrt(2 / (fan_in + fan_out)),
            "normal-0.001": 0.001, "normal-0.01": 0.01, "trunc-normal-0.02": 0.02 * TRUNC_2SIGMA_STD, "normal-0.02": 0.02}
    if repeats > 1:
        stds["normal-0.02-scaled"] = 0.02 / math.sqrt(2 * repeats)
    low = min(stds, key=stds.get)
    high = max(stds, key=stds.get)
    return Envelope(stds[low], low, stds[high], high)


@dataclass(frozen=True)
class _Judged:
    candidate: _Candidate
    fits: bool
    std_z: float       # (log measured std − log the scheme's std) / its standard error
    loglik: float      # log-likelihood of the tensor under the scheme (−inf where a bound is passed)


def _roundoff(weight: Samples | None) -> float:
    """The unit roundoff of the tensor's dtype (fp32 when unknown): how far rounding may move a value, relatively."""
    dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------- values on a truncation bound

ABSOLUTE_BOUND = 2.0     # trunc_normal_'s default bounds a=-2, b=2 are absolute (torch's and timm's): 100σ at std 0.02
EDGE_ARTIFACT = 2.0 ** -22  # per value and bound: trunc_normal_ lands exactly on a bound where its uniform draw hits an end
HANDFUL = 8              # values float rounding may leave on a bound beyond that
Z_EDGE = 6.0             # standard errors of a Poisson count
BOUND_REACH = 0.05       # how far (relative) from 2σ (or a uniform's bound) a repeated extreme still sits on it


@dataclass(frozen=True)
class Edges:
    """Values exactly on a truncation bound, against what a correct draw leaves there."""

    values: tuple[float, ...]  # the bounds held: the minimum and/or the maximum
    count: int                 # entries exactly on them
    bound: float               # the largest bound's magnitude
    natural: float             # what the draw's own density puts there at the dtype's (or grid's) resolution
    allowance: float           # that, its Poisson spread, and the handful rounding leaves: more is a pile

    @property
    def pile(self) -> bool:
        return self.count > self.allowance


def truncation_edges(stats: TensorStats) -> Edges | None:
    """Entries sitting exactly on a truncation bound beyond what the draw's density puts on that value, or None.

    An extreme is a bound where it is ±2 exactly (trunc_normal_'s default, absolute), where both extremes are
    equal in magnitude and repeated (a symmetric clamp), or where it repeats at 2σ of a normal truncated there
    (trunc_normal_(std=σ, a=-2σ, b=2σ), timm's trunc_normal_tf_ and lecun_normal_)."""
    if not stats.finite or stats.constant or not stats.std > 0:
        return None
    ends = ((stats.min, stats.min_count), (stats.max, stats.max_count))
    symmetric = stats.min == -stats.max and min(stats.min_count, stats.max_count) >= 2
    on = [(v, k) for v, k in ends if v != 0 and (symmetric or abs(v) == ABSOLUTE_BOUND or k >= 2 and _at_two_sigma(v, stats))]
    if not on:
        return None
    n, count = stats.finite, sum(k for _, k in on)
    natural = sum(n * _density(abs(v), stats) * _resolution(v, stats) for v, _ in on)
    beyond = natural + Z_EDGE * math.sqrt(natural)
    if count <= beyond:
        return None  # the dtype's resolution puts this many there (bf16's top bin)
    allowance = beyond + HANDFUL + n * EDGE_ARTIFACT * len(on)
    return Edges(tuple(v for v, _ in on), count, max(abs(v) for v, _ in on), natural, allowance)


def _at_two_sigma(value: float, stats: TensorStats) -> bool:
    sigma = stats.std / TRUNC_2SIGMA_STD
    return abs(abs(value) / (TRUNC_BOUND * sigma) - 1) <= BOUND_REACH


def _density(x: float, stats: TensorStats) -> float:
    """The largest density at |value| x any init family at the measured std gives (0 beyond a bounded family's
    reach): normal, normal truncated at ±2σ, uniform."""
    std = stats.std
    normal = math.exp(-0.5 * (x / std) ** 2) / (std * math.sqrt(2 * math.pi))
    sigma = std / TRUNC_2SIGMA_STD
    t = min(x / sigma, TRUNC_BOUND)
    trunc = math.exp(-0.5 * t * t) / (sigma * math.sqrt(2 * math.pi)) / math.erf(TRUNC_BOUND / math.sqrt(2))
    half_width = _BOUND["uniform"] * std
    uniform = 1 / (2 * half_width)
    return max(normal, trunc if x <= TRUNC_BOUND * sigma * (1 + BOUND_REACH) else 0.0,
               uniform if x <= half_width * (1 + BOUND_REACH) else 0.0)


def _resolution(value: float, stats: TensorStats) -> float:
    """The width of values that round to `value`: the dtype's spacing there, or a coarse grid's (quantized, fp8)."""
    dtype = stats.dtype if stats.dtype is not None and stats.dtype.is_floating_point else torch.float32
    spacing = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(value)))
    seen = min(stats.numel, DISTINCT_SAMPLE)
    if 1 < stats.distinct < seen / 4:  # few distinct values: a grid
        spacing = max(spacing, (stats.max - stats.min) / (stats.distinct - 1))
    return spacing


def without_edges(stats: TensorStats, samples: Samples | None, unit_axis: int = 0,
                  units: bool = False) -> tuple[TensorStats, Samples | None]:
    """The stats of the tensor with its values on a truncation bound left out (NaN: counted nowhere), and its samples:
    they are a finding of their own (truncation-edge), not part of the draw, nor a tail of it. Where the values are
    not at hand (a merged summary of a large tensor), they are kept."""
    edges = truncation_edges(stats)
    tensor = None if samples is None else samples.source if samples.source is not None else samples.values
    if edges is None or tensor is None:
        return stats, samples
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    on = torch.zeros(tensor.shape, dtype=torch.bool)
    for value in edges.values:
        on |= tensor == value
    masked = tensor.detach().masked_fill(on, math.nan)
    return compute(masked, unit_axis, units=units, split=False), Samples.of(masked, unit_axis)


def _judge(c: _Candidate, stats: TensorStats, u: float) -> _Judged:
    """Does the tensor fit an iid draw of this scheme within sampling error, and how likely is it under it?"""
    n, s, shape = stats.finite, c.std, c.shape
    m2 = stats.std ** 2 + stats.mean ** 2   # init schemes are zero-mean: the second moment about 0
    kappa = EXCESS_KURTOSIS[shape]
    se = math.sqrt((kappa + 2) / (4 * n) + (u / 2) ** 2)  # rounding barely moves a std: a floor for half types only
    z = math.log(math.sqrt(m2) / s) / se
    ok = abs(z) <= Z_STD and abs(stats.mean) <= Z_STD * math.sqrt(m2 / n)
    bias = -6 / (n + 1) if shape == "normal" else 0.0
    if n >= 8 and math.isfinite(stats.excess_kurtosis):
        ok &= abs(stats.excess_kurtosis - kappa - bias) <= Z_KURTOSIS * math.sqrt(_KURT_VAR[shape] / n)
    peak = stats.abs_max / s
    if shape == "normal":
        # the largest |w| of n normal draws stays under `peak` std with probability erf(peak/√2)^n
        ok &= n * math.log(max(math.erf(peak / math.sqrt(2)), 1e-300)) >= -TAIL_NATS
        loglik = -n * math.log(s) - n * m2 / (2 * s * s) - n / 2 * math.log(2 * math.pi)
    else:
        bound = _BOUND[shape]
        if peak > bound * (1 + 2 * u) + 1e-12:
            return _Judged(c, False, z, -math.inf)
        # the extremes come near the bound (rounding may move the largest value by u either way)
        ok &= _EDGE[shape] * n * max(1 - peak / bound - 2 * u, 0.0) <= TAIL_NATS
        if shape == "uniform":
            loglik = -n * math.log(2 * bound * s)
        else:
            sigma = s / TRUNC_2SIGMA_STD
            loglik = (-n * math.log(sigma) - n * m2 / (2 * sigma * sigma) - n / 2 * math.log(2 * math.pi)
                      - n * math.log(math.erf(TRUNC_BOUND / math.sqrt(2))))
    return _Judged(c, bool(ok), z, loglik)


def _preference(c: _Candidate, index: int, paired: list[tuple[str, str, str]]) -> tuple[int, bool, bool, int]:
    """How to name an exact alias: a scheme paired with the activation, then fan_in (torch's default mode)
    before fan_out, then a plain name, then list order."""
    rank = next((i for i, (family, gain, fan) in enumerate(paired)
                 if (family, gain) == (c.family, c.gain) and fan in ("", c.fan)), len(paired))
    plain = c.gain in ("", "linear") or (c.family == "kaiming" and c.gain == "relu")
    return rank, c.fan == "fan_out", not plain, index


def _distinct(candidates: list[_Candidate], paired: list[tuple[str, str, str]]) -> list[_Candidate]:
    """One candidate per distribution: where schemes draw the same one (Xavier and LeCun on a square layer),
    the preferred name."""
    ranked = sorted(enumerate(candidates), key=lambda ic: _preference(ic[1], ic[0], paired))
    kept: list[_Candidate] = []
    for _, c in ranked:
        if not any(k.shape == c.shape and abs(math.log(k.std / c.std)) < ALIAS for k in kept):
            kept.append(c)
    return kept


def _orthogonality(weight: Samples) -> dict[str, float] | None:
    """How far the rows (or columns, whichever are fewer) of the weight flattened as torch.nn.init.orthogonal_
    flattens it are from orthogonal with one common norm, in units of what iid draws give (≈ 1 each).

    A sampled Gram test (at most COLUMN_SAMPLE vectors, `Samples.ortho`: cost linear in the tensor): `gram` is the
    mean squared cosine between the sampled vectors × their length, `norms` the variance of their relative norms ×
    2·length. `limit` is what the dtype's rounding allows an orthogonal matrix (100 × its unit roundoff squared).
    Both come from the vectors' Gram matrix, in float32 where that already rules orthogonality out (iid draws give
    ≈ 1, far above float32's rounding), else in float64.
    """
    vectors = weight.ortho
    if vectors is None or min(weight.shape[0], weight.numel // weight.shape[0]) < 2 \
            or max(weight.shape[0], weight.numel // weight.shape[0]) < MIN_ORTHO_LENGTH:
        return None
    u = _roundoff(weight)
    limit = max(100 * u * u, 1e-9)
    found = _gram_test(vectors.to(torch.float32))
    if found is None or min(found[:2]) <= _FLOAT32_DECISIVE + 4 * limit:  # None: float32 overflowed, perhaps
        found = _gram_test(vectors.to(torch.float64))
    if found is None:
        return None
    cosines, spread, gain = found
    length = vectors.shape[1]
    return {"gram": cosines, "norms": spread, "limit": limit, "gain": gain, "std": gain / math.sqrt(length)}


_FLOAT32_DECISIVE = 0.1  # Gram statistics above this (iid draws: ≈ 1) rule orthogonality out whatever float32 rounded


def _gram_test(vectors: torch.Tensor) -> tuple[float, float, float] | None:
    """(mean squared cosine × length, variance of the relative norms × 2·length, mean norm) of [k, length]
    vectors, from their Gram matrix; None where a norm is 0 or not finite."""
    k, length = vectors.shape
    gram = vectors @ vectors.T
    norms = gram.diagonal().sqrt()
    if not bool(torch.isfinite(norms).all()) or float(norms.min()) <= 0:
        return None
    mean = norms.mean()
    spread = float(((norms / mean - 1) ** 2).mean()) * 2 * length
    cos = gram / norms[:, None] / norms[None, :]
    cos.diagonal().zero_()
    return float((cos * cos).sum()) / (k * (k - 1)) * length, spread, float(mean)


def fingerprint(stats: TensorStats, fan_in: int, fan_out: int, kind: str = "linear",
                activation: Activation | None = None, weight: torch.Tensor | Samples | None = None,
                hidden: int | None = None, repeats: int = 1) -> Fingerprint:
    """Name the most likely init scheme of one weight tensor (`repeats`: how many blocks hold this layer).

    `weight` (the tensor itself) allows the orthogonality test and gives the dtype whose rounding sets
    the floor of the tolerances (the orthogonality test flattens from dim 0, as torch's orthogonal_ does).
    """
    if isinstance(weight, torch.Tensor):
        weight = Samples.of(weight)
    stats, weight = without_edges(stats, weight)
    if stats.finite == 0:
        return Fingerprint("unknown", "unknown", "any", math.nan, math.nan)
    if stats.constant:
        name = "zeros" if stats.max == 0 else "constant"
        return Fingerprint(name, name, "any", 0.0, math.nan)
    ortho = _orthogonality(weight) if weight is not None and stats.finite == stats.numel else None
    if ortho is not None and ortho["gram"] < ortho["limit"] and ortho["norms"] < ortho["limit"]:
        return Fingerprint("orthogonal", "orthogonal", "normal", ortho["std"], stats.std / ortho["std"],
                           evidence={"values": stats.finite, **{k: _round(v) for k, v in ortho.items()}})
    if not stats.std > 0:
        return Fingerprint("unknown", "unknown", "any", math.nan, math.nan)
    family = "recurrent" if kind == "recurrent" else activation.family if activation else ""
    candidates = _candidates(max(fan_in, 1), max(fan_out, 1), kind, hidden, repeats)
    u = _roundoff(weight)
    judged = [_judge(c, stats, u) for c in _distinct(candidates, PAIRED.get(family, []))]
    if kind not in ("embedding", "recurrent"):
        judged += _leaky_fits(stats, max(fan_in, 1), max(fan_out, 1), judged, u)
    evidence: dict[str, Any] = {"values": stats.finite}
    if ortho is not None:
        evidence["orthogonality"] = _round(ortho["gram"])
    return _best_named(stats, judged, evidence)


def _leaky_fits(stats: TensorStats, fan_in: int, fan_out: int, judged: list[_Judged], u: float) -> list[_Judged]:
    """Kaiming at a leaky_relu slope in (0, MAX_SLOPE], the gain fitted to the measured scale (per shape
    and fan mode), where the scale sets the slope apart from ReLU's 0 (Kaiming at ReLU's gain is off by LEAKY_Z
    standard errors or more). Its likelihood pays ½·ln n nats for the fitted slope (BIC): a named scheme that
    draws the same std (Xavier where fan_out ≤ fan_in/4) keeps its name, a near-tie where n is small."""
    n = stats.finite
    se = math.sqrt(1 / (2 * n) + (u / 2) ** 2)  # a normal's relative std error (a uniform's scale is surer)
    # the scale's maximum-likelihood estimate: a normal's RMS, a uniform's largest |w| (its bound) / √3
    scales = {"normal": math.sqrt(stats.std ** 2 + stats.mean ** 2),
              "uniform": stats.abs_max * (1 + 1 / n) / _BOUND["uniform"]}
    low, high = torch.nn.init.calculate_gain("leaky_relu", MAX_SLOPE), GAINS["relu"]
    fans = {"fan_in": fan_in} if fan_in == fan_out else {"fan_in": fan_in, "fan_out": fan_out}
    out = []
    for shape, scale in scales.items():
        for fan, size in fans.items():
            gain = scale * math.sqrt(size)
            if not low * (1 - Z_STD * se) <= gain < high or _near_relu(judged, shape, GAINS["relu"] / math.sqrt(size)):
                continue
            gain = max(gain, low)
            slope = math.sqrt(2 / gain ** 2 - 1)
            name, _ = _kaiming_name("relu", shape, fan)
            c = _Candidate(f"{name}(a={slope:.2g})", "kaiming", shape, gain / math.sqrt(size), "leaky_relu", fan, slope)
            j = _judge(c, stats, u)
            out.append(dataclasses.replace(j, loglik=_rounded_alike(j, judged, u) - 0.5 * math.log(n)))
    return out


def _rounded_alike(fitted: _Judged, judged: list[_Judged], u: float) -> float:
    """The fitted candidate's log-likelihood, or a named scheme's of its shape whose std the dtype's rounding cannot
    tell from it (bf16 moves a uniform's extremes by up to 2u either way): a bound fitted closer than that wins
    nothing over it."""
    c = fitted.candidate
    close = [j.loglik for j in judged if j.fits and j.candidate.shape == c.shape
             and abs(math.log(j.candidate.std / c.std)) <= 4 * u]
    return max(close) if close else fitted.loglik


def _near_relu(judged: list[_Judged], shape: str, relu_std: float) -> bool:
    """A candidate at ReLU's std of this shape fits (a normal's within LEAKY_Z standard errors): no slope to tell
    from 0. A uniform's bound tells slopes apart far better than its std: where ReLU's bound fits, none is seen."""
    return any(j.fits and (shape == "uniform" or abs(j.std_z) <= LEAKY_Z) and j.candidate.shape == shape
               and abs(math.log(j.candidate.std / relu_std)) < ALIAS for j in judged)


def _best_named(stats: TensorStats, judged: list[_Judged], evidence: dict[str, Any]) -> Fingerprint:
    """The scheme the judged candidates name: the likeliest that fits, a near-tie of a few, else unknown with the
    nearest; `evidence` gets how close the runner-up came."""
    fits = sorted((j for j in judged if j.fits), key=lambda j: -j.loglik)
    # the likeliest schemes first (those whose bound the tensor passes last, nearest std first)
    ranked = sorted(judged, key=lambda j: (-j.loglik, abs(j.std_z)))
    if not fits:
        near = ranked[0]
        evidence.update(nearest_std_z=_round(near.std_z))
        return Fingerprint("unknown", "unknown", "any", math.nan, math.nan, nearest=near.candidate.scheme,
                           evidence=evidence)
    best = fits[0]
    tie = [j for j in fits if j.loglik >= best.loglik - TIE_NATS]
    rest = [j for j in ranked if j not in tie]
    evidence.update(std_z=_round(best.std_z))
    if rest:
        evidence.update(runner_up=rest[0].candidate.scheme, runner_up_std_z=_round(rest[0].std_z))
        if math.isfinite(rest[0].loglik):
            evidence["log_likelihood_ratio"] = _round(best.loglik - rest[0].loglik)
    if len(tie) > MAX_TIE:
        evidence["candidates"] = [j.candidate.scheme for j in tie]
        return Fingerprint("unknown", "unknown", best.candidate.shape, math.nan, math.nan,
                           nearest=best.candidate.scheme, evidence=evidence)
    c = best.candidate
    if c.slope is not None:
        evidence["slope"] = _round(c.slope)
    if len(tie) == 1:
        return Fingerprint(c.scheme, c.family, c.shape, c.std, stats.std / c.std, gain=c.gain, fan=c.fan,
                           slope=c.slope, evidence=evidence)
    return _near_tie(stats, best, tie, evidence)


def _near_tie(stats: TensorStats, best: _Judged, tie: list[_Judged], evidence: dict[str, Any]) -> Fingerprint:
    """A few schemes the tensor fits about as well as the best: named `a|b`, each an alternative."""
    c = best.candidate
    evidence["tie"] = {j.candidate.scheme: {"std_z": _round(j.std_z), "log_likelihood_ratio":
                                            _round(best.loglik - j.loglik)} for j in tie}
    families = list(dict.fromkeys(j.candidate.family for j in tie))
    return Fingerprint("|".join(j.candidate.scheme for j in tie), "|".join(families), c.shape, c.std,
                       stats.std / c.std, gain=c.gain, fan=c.fan, slope=c.slope,
                       alternatives=tuple(j.candidate.alternative() for j in tie), evidence=evidence)


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


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
    if family == "periodic":  # SIREN: hidden weights U(±√(6/n)/ω0), that is U(±√(6/n)) once ω0 is folded in
        bound = activation.gain * math.sqrt(3 / fan_in)
        return Recommendation("siren-uniform", activation.gain / math.sqrt(fan_in), "uniform_",
                              (("a", -bound), ("b", bound)), f"SIREN (Sitzmann et al.) for {activation}")
    if family in ("selu", "identity"):
        return Recommendation("lecun-normal", 1 / math.sqrt(fan_in), "kaiming_normal_",
                              (("mode", "fan_in"), ("nonlinearity", "linear")),
                              "LeCun for SELU" if family == "selu" else "LeCun (variance-preserving) for a linear layer")
    return None
