"""Fresh or trained: does a weight still look like one iid draw of an init family, or has training moved it?

A fresh draw fits an iid sample of one known family (normal, uniform, or normal truncated at ±2σ,
at its measured std) to within sampling error; training leaves traces that such a draw cannot
have. Five tests, each with its tolerance from the sample size at hand:

- shape: the Kolmogorov–Smirnov distance of a (strided) sample to the best family, standardized
  by the sample's own mean and std, against Z_KS/sqrt(n);
- tails: the excess kurtosis against the family's, in units of its standard error sqrt(24/n);
- per-unit scale: the spread of the units' mean squares against what iid draws give
  ((kurtosis + 2)/width relative variance; chi-square-like spread over the units);
- per-unit offset: the spread of the units' sums against width·σ²;
- spectrum: the largest singular value against the edge σ(√rows + √cols) of iid matrices.

All hold → `fresh` (given enough values to have seen training); any fails → `trained`;
too few values, or a degenerate (constant, all-NaN) tensor → `unknown`, with the reason. Exact
zeros, all-zero units and values exactly on a truncation bound are left out: they are faults (or
rounding) of their own (zero-weights, dead-units, truncation-edge) and must not make a fresh layer
look trained.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from initaudit.common.errors import InputError
from initaudit.measure.samples import Samples
from initaudit.measure.schemes import EXCESS_KURTOSIS, TRUNC_2SIGMA_STD, without_edges
from initaudit.measure.stats import TensorStats, compute

STATES = ("fresh", "trained", "unknown")
OVERRIDES = ("auto", "fresh", "trained")
MIN_VALUES = 64          # below this no test has any power: unknown
MIN_FRESH_VALUES = 512   # passing every test with fewer values does not rule out training
MIN_UNITS = 8            # the per-unit tests need this many units
SPECTRUM_BLOCK = 512     # rows and columns of the strided block whose top singular value is measured
POWER_ITERATIONS = 40
Z = 6.0                  # tolerance in standard errors (a fresh layer is called trained ~never)
Z_UNITS = 5.0            # per-unit tests: chi-square upper quantile at this many standard normal deviates
Z_KS = 2.0               # KS tolerance, × 1/sqrt(n): P(fresh fails) < 1e-3 with known, far less with fitted parameters
FAMILIES = EXCESS_KURTOSIS  # the init families a fresh draw is fitted to


@dataclass(frozen=True)
class TensorState:
    """The verdict on one weight tensor and the statistics behind it."""

    state: str
    reason: str
    values: int = 0
    family: str | None = None        # the best-fitting init family
    ks: float | None = None          # KS distance to it
    ks_limit: float | None = None
    kurtosis_z: float | None = None  # |excess kurtosis - the family's| / standard error
    spread_ratio: float | None = None  # per-unit scale variance / its iid expectation
    spread_limit: float | None = None
    offset_ratio: float | None = None  # per-unit sum variance / its iid expectation
    offset_limit: float | None = None
    top_singular_ratio: float | None = None  # largest singular value / the iid (Marchenko-Pastur) edge
    top_singular_limit: float | None = None

    def evidence(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None}


def classify(stats: TensorStats, tensor: torch.Tensor | Samples, unit_axis: int = 0) -> TensorState:
    """fresh / trained / unknown for one weight tensor, from its stats and strided samples of it (a lone entry that
    holds most of the variance, a spike, is left out: it is weight-spike's to judge, not evidence of training)."""
    samples = tensor if isinstance(tensor, Samples) else Samples.of(tensor, unit_axis)
    stats, samples = _without_spike(stats, samples, unit_axis)
    n = stats.finite
    if n == 0:
        return TensorState("unknown", "no finite values")
    if stats.constant:
        return TensorState("unknown", "constant: no distribution to fit", n)
    nonzero = round(n * (1 - stats.zero_fraction))
    if nonzero < MIN_VALUES:
        return TensorState("unknown", f"only {nonzero} non-zero values: too few to tell", n)
    family, ks, ks_limit, kz = _shape_fit(stats, samples, nonzero)
    spread, spread_limit = _unit_spread(stats)
    offset, offset_limit = _unit_offsets(stats)
    edge, edge_limit = _spectrum(stats, samples)
    failed = [name for name, bad in (("shape", ks is not None and ks > ks_limit), ("tails", kz > Z),
                                     ("per-unit scale", spread is not None and spread > spread_limit),
                                     ("per-unit offset", offset is not None and offset > offset_limit),
                                     ("spectrum", edge is not None and edge > edge_limit)) if bad]
    common = dict(values=n, family=family, ks=ks, ks_limit=ks_limit, kurtosis_z=kz, spread_ratio=spread,
                  spread_limit=spread_limit, offset_ratio=offset, offset_limit=offset_limit,
                  top_singular_ratio=edge, top_singular_limit=edge_limit)
    if failed:
        return TensorState("trained", f"no iid init draw: {', '.join(failed)} beyond sampling error", **common)
    if nonzero < MIN_FRESH_VALUES:
        return TensorState("unknown", f"fits an iid {family} draw, but {nonzero} values are too few to rule out training",
                           **common)
    return TensorState("fresh", f"fits an iid {family} draw within sampling error", **common)


def _without_spike(stats: TensorStats, samples: Samples, unit_axis: int) -> tuple[TensorStats, Samples]:
    """The stats and samples with a spike (one entry holding half the squared deviations or more) set to the mean,
    where the tensor's values are at hand (a merged summary of a large tensor keeps its spike)."""
    peak = max(abs(stats.max - stats.mean), abs(stats.min - stats.mean)) if stats.finite else 0.0
    tensor = samples.source if samples.source is not None else samples.values
    if tensor is None or not (stats.std > 0 and stats.finite >= MIN_VALUES and peak * peak >= 0.5 * stats.finite * stats.std ** 2):
        return stats, samples
    flat = tensor.detach().float().flatten().clone()
    flat[(flat - stats.mean).abs().nan_to_num(0.0).argmax()] = stats.mean
    rest = flat.view(tensor.shape)
    return compute(rest, unit_axis, split=False), Samples.of(rest, unit_axis)


def _shape_fit(stats: TensorStats, samples: Samples, nonzero: int) -> tuple[str, float | None, float | None, float]:
    """The family fitting best (KS distance and kurtosis together), its KS distance, the KS limit, the kurtosis z."""
    p = stats.zero_fraction
    # moments of the non-zero values (mean ≈ 0): var/(1-p), fourth moment/(1-p)
    kurt = (stats.excess_kurtosis + 3) * (1 - p) - 3 if p else stats.excess_kurtosis
    se_k = math.sqrt(24.0 / nonzero)
    sample = _sample(samples)
    ks = {}
    if sample.numel() >= MIN_VALUES:
        z = (sample - sample.mean()) / sample.std(correction=0)  # sorted, as the sample is
        ks = {name: _ks_distance(z, name) for name in FAMILIES}
    limit = Z_KS / math.sqrt(sample.numel()) if ks else None

    def badness(name: str) -> float:
        return max(ks[name] / limit if ks else 0.0, abs(kurt - FAMILIES[name]) / se_k / Z)

    best = min(FAMILIES, key=badness)
    return best, ks.get(best), limit, abs(kurt - FAMILIES[best]) / se_k


def _sample(samples: Samples) -> torch.Tensor:
    """The finite, non-zero values of the tensor's strided sample, sorted, in float64."""
    flat = samples.ordered.to(torch.float64)
    return flat[torch.isfinite(flat) & (flat != 0)]


def _ks_distance(z: torch.Tensor, family: str) -> float:
    """sup |F_n - F| of sorted standardized values against a standardized family."""
    if family == "normal":
        cdf = torch.special.ndtr(z)
    elif family == "uniform":
        cdf = ((z + math.sqrt(3)) / (2 * math.sqrt(3))).clamp(0, 1)
    else:
        t = (z * TRUNC_2SIGMA_STD).clamp(-2, 2)
        lo = torch.special.ndtr(torch.tensor(-2.0, dtype=z.dtype))
        cdf = (torch.special.ndtr(t) - lo) / (1 - 2 * lo)
    n = z.numel()
    i = torch.arange(1, n + 1, dtype=z.dtype)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def _unit_spread(stats: TensorStats) -> tuple[float | None, float | None]:
    """The units' (rows') or the inputs' (columns') mean squares, whichever strays further from an iid draw's."""
    if stats.unit_norms is None:
        return None, None
    rows = _drop_zero_units(stats, stats.unit_norms)
    live = stats.n_units - len(stats.zero_units)
    inputs = stats.input_norms
    if inputs is not None:
        inputs = inputs[inputs > 0]  # inputs no unit reads (a masked conv's future positions): a mask, not training
    tests = [_spread(rows, stats.numel // max(stats.n_units, 1), stats.excess_kurtosis),
             _spread(inputs, live, stats.excess_kurtosis)]
    tests = [t for t in tests if t is not None]
    return max(tests, key=lambda t: t[0] / t[1]) if tests else (None, None)


def _spread(norms: torch.Tensor | None, width: int, kurtosis: float) -> tuple[float, float] | None:
    """Variance of mean squares over `width` values each, relative to an iid draw's ((kurtosis + 2)/width)."""
    if norms is None or norms.numel() < MIN_UNITS or width < 2:
        return None
    ms = norms.to(torch.float64) ** 2 / width
    mean = float(ms.mean())
    kurt = max(kurtosis, -1.2) if math.isfinite(kurtosis) else 0.0
    if mean <= 0 or kurt + 2 <= 0:
        return None
    units = norms.numel()
    ratio = float(ms.var(correction=1)) / mean ** 2 / ((kurt + 2) / width)
    # a sample variance over `units` draws whose own excess kurtosis is about 12/width (a chi-square's)
    dof = 2 / (2 / (units - 1) + 12 / (width * units))
    return ratio, _chi2_limit(dof)


def _unit_offsets(stats: TensorStats) -> tuple[float | None, float | None]:
    """Variance of the units' sums relative to an iid draw's (width·σ²)."""
    if stats.unit_sums is None or stats.zero_fraction >= 1:
        return None, None
    sums = _drop_zero_units(stats, stats.unit_sums)
    width = stats.numel // max(stats.n_units, 1)
    var = stats.std ** 2 / (1 - stats.zero_fraction)
    if sums.numel() < MIN_UNITS or width < 2 or not var > 0:
        return None, None
    ratio = float(sums.var(correction=1)) / (width * var)
    return ratio, _chi2_limit(sums.numel() - 1)


def _spectrum(stats: TensorStats, samples: Samples) -> tuple[float | None, float | None]:
    """The largest singular value of a strided block of the weight (samples.spectrum) over the edge σ(√rows + √cols)
    that iid draws of any family reach: the low-rank updates of training stand out above it.

    All-zero units and copies (faults of their own) and all-zero inputs (a mask's) are left out of the block; the
    limit allows Z times the edge's Tracy-Widom scale, (1/√rows + 1/√cols)^(1/3) / (2(√rows + √cols)) relative to
    it.
    """
    if samples.spectrum is None:
        return None, None
    block = samples.spectrum
    drop = stats.zero_units + [u for g in stats.duplicate_groups for u in g[1:]]
    if drop:
        block = block[~torch.isin(samples.spectrum_rows, torch.tensor(drop, dtype=torch.long))]
    block = block.to(torch.float64)
    if stats.finite < stats.numel:
        block = torch.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
    if stats.zero_fraction > 0:
        block = block[:, (block != 0).any(dim=0)]  # inputs no unit reads, as in the per-unit test
    m, k = block.shape
    if min(m, k) < MIN_UNITS:
        return None, None
    block = block - block.mean()
    sigma = float(block.std(correction=0))
    if not sigma > 0:
        return None, None
    block = (block / sigma).to(torch.float32)  # iterated in float32: half the memory traffic, rounding far below Z·TW
    block_t = block.T.contiguous()
    v = torch.randn(k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(torch.float32)
    u = torch.empty(m, dtype=torch.float32)
    norm = torch.linalg.vector_norm
    for _ in range(POWER_ITERATIONS):  # converges from below: an unconverged estimate only errs toward fresh
        torch.mv(block, v, out=u)
        u /= norm(u)
        torch.mv(block_t, u, out=v)
        top = norm(v)
        v /= top
    top = float(top)  # read once: the iterations run without waiting on Python
    edge = math.sqrt(m) + math.sqrt(k)
    tracy_widom = (1 / math.sqrt(m) + 1 / math.sqrt(k)) ** (1 / 3) / (2 * edge)  # relative scale of the edge's spread
    return top / edge, 1 + Z * tracy_widom


def _drop_zero_units(stats: TensorStats, per_unit: torch.Tensor) -> torch.Tensor:
    if not stats.zero_units:
        return per_unit
    keep = torch.ones(per_unit.numel(), dtype=torch.bool)
    keep[stats.zero_units] = False
    return per_unit[keep]


def _chi2_limit(dof: float) -> float:
    """Upper Z_UNITS quantile of chi-square(dof)/dof (Wilson–Hilferty)."""
    c = 2 / (9 * dof)
    return (1 - c + Z_UNITS * math.sqrt(c)) ** 3


# ---------------------------------------------------------------- the model

@dataclass
class ModelState:
    """The model's verdict, each layer's own verdict, and the evidence (the JSON `state_evidence`)."""

    state: str
    layers: dict[str, str] = field(default_factory=dict)        # layer -> its own state
    tensors: dict[str, TensorState] = field(default_factory=dict)  # weight key -> its verdict
    file_signs: list[str] = field(default_factory=list)
    override: str = "auto"

    def effective(self, layer: str) -> str:
        """The state rules see for a layer: the override; trained in a trained model; else its own verdict,
        else the model's."""
        if self.override != "auto":
            return self.override
        if self.state == "trained":  # a layer training barely moved is still part of a trained model
            return "trained"
        own = self.layers.get(layer, "unknown")
        if own != "unknown":
            return own
        return self.state if self.state in ("fresh", "trained") else "unknown"

    def evidence(self) -> dict[str, Any]:
        counts = Counter(self.layers.values())
        return {"layers": {s: counts.get(s, 0) for s in STATES}, "override": self.override,
                "file_signs": self.file_signs, "tensors": {k: v.evidence() for k, v in self.tensors.items()}}


def layer_state(states: list[str]) -> str:
    """A layer is trained when any of its weights is, fresh when the rest are fresh, else unknown."""
    if "trained" in states:
        return "trained"
    return "fresh" if "fresh" in states else "unknown"


def model_state(layers: dict[str, str], sizes: dict[str, int], file_signs: list[str]) -> str:
    """fresh / trained / mixed from the layers' verdicts; with none, the file's own signs of training decide.

    A `trained` verdict is proof (no iid draw does that), a `fresh` one only the absence of proof
    (a layer training barely moved passes), so layers seen trained that hold most of the
    classified values make the model trained; fewer make it mixed.
    """
    counts = Counter(layers.values())
    if counts["trained"]:
        trained = sum(sizes[n] for n, s in layers.items() if s == "trained")
        judged = sum(sizes[n] for n, s in layers.items() if s != "unknown")
        return "trained" if not counts["fresh"] or 2 * trained >= judged else "mixed"
    if counts["fresh"]:
        return "fresh"
    return "trained" if file_signs else "unknown"


def assess(tensors: Any, measured: list, file_signs: list[str], override: str = "auto") -> ModelState:
    """Classify every weighted layer's weights of an audited model, then the model.

    Embeddings are left out: fixed tables (sinusoidal positions) and zeroed padding rows are
    fresh by design, and their size would swamp the verdict.
    """
    if override not in OVERRIDES:
        raise InputError(f"--state must be one of {', '.join(OVERRIDES)}, not {override!r}")
    verdicts, per_layer = {}, {}
    for m in measured:
        if not m.param.is_weight or m.param.shared_with is not None or not m.layer.weighted:
            continue
        verdict = m.verdict or classify_any(m.stats, tensors[m.param.key], m.param.unit_axis)
        verdicts[m.param.key] = verdict
        per_layer.setdefault(m.layer.name, []).append(verdict.state)
    layers = {name: layer_state(states) for name, states in per_layer.items()}
    sizes = {name: 0 for name in layers}
    for m in measured:
        if m.param.key in verdicts:
            sizes[m.layer.name] += m.stats.numel
    return ModelState(model_state(layers, sizes, file_signs), layers, verdicts, file_signs, override)


def classify_any(stats: TensorStats, tensor: torch.Tensor | Samples, unit_axis: int) -> TensorState:
    """classify() on any dtype torch holds (the rarer ones, float8..., are upcast first), or on its samples."""
    try:
        if not isinstance(tensor, Samples):
            if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                tensor = tensor.to(torch.float32)
            tensor = Samples.of(tensor, unit_axis)
        return classify(*without_edges(stats, tensor, unit_axis, units=stats.unit_norms is not None), unit_axis)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # sparse, quantized, meta: nothing to fit
        return TensorState("unknown", f"values not readable as floats ({type(exc).__name__})", stats.finite)


def apply(measured: list, model: ModelState) -> None:
    """Give every tensor's facts its layer's own state and the state its rules see."""
    for m in measured:
        m.facts["layer_state"] = model.layers.get(m.layer.name, "unknown")
        m.facts["state"] = model.effective(m.layer.name)


def note(model: ModelState, aside: list[str]) -> str | None:
    """One line for the text report: the weights look trained, and which rules were set aside."""
    if "trained" not in (model.state, model.override) and model.state != "mixed":
        return None
    counts = Counter(model.layers.values())
    how = "look trained" if model.state == "trained" else "look partly trained" if model.state == "mixed" else "are taken as trained"
    why = f"{counts['trained']} of {len(model.layers)} layers fit no iid init draw"
    if model.override != "auto":
        why = f"--state {model.override}"
    elif model.file_signs:
        signs = ", ".join(model.file_signs)
        why = f"{why}; {signs}" if model.layers else signs
    rules = ", ".join(aside) if aside else "none fired"
    return f"the weights {how} ({why}): init-scheme rules set aside (kept at info on trained layers): {rules}"
