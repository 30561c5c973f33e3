"""The facts the rules test, made in one place (their names and meanings: catalogue.py, beside this file):
per tensor from what the measuring pass found, per layer from the depth analysis, and the model-wide share of
layers drawn at a fixed std. The fresh/trained facts (`state`, `layer_state`) are set by `weight_state.apply`."""

from __future__ import annotations

import math
import re
from typing import Any

from initaudit.flow.layer import Layer, LayerGraph
from initaudit.judge.catalogue import ALTERNATIVES
from initaudit.measure import schemes
from initaudit.measure.depth import LayerDepth, detail
from initaudit.measure.stats import TensorStats
from initaudit.measure.tensors import Measured


def tensor_facts(graph: LayerGraph, m: Measured) -> dict[str, Any]:
    """Everything a rule may test about one measured tensor in its context.

    With the activation unknown a weight is held to the envelope of every common scheme (schemes.envelope):
    its expected std is the envelope's nearest edge, its own std when inside.
    """
    layer, param, st, rec = m.layer, m.param, m.stats, m.recommended
    expected, expected_scheme, envelope_ratio = _expectation(m)
    ratio = st.std / expected if expected and math.isfinite(st.std) else None
    return {
        **_context_facts(graph, m), "envelope_ratio": envelope_ratio, "is_last": layer.position == graph.depth - 1,
        "fan_in": param.fan_in, "fan_out": param.fan_out, **_stats_facts(m), **_scheme_facts(m),
        "expected_scheme": expected_scheme,
        "expected_std": expected, "expected_call": rec.call if rec else None,
        "std_ratio": ratio, "variance_gain": ratio * ratio if ratio is not None else None,
        "shared": param.shared_with is not None, "bias_ratio": _bias_ratio(m), "zero_in_every_block": False,
    }


def _expectation(m: Measured) -> tuple[float | None, str | None, float | None]:
    """(expected std, the scheme that gives it, the std over the nearest edge of the envelope of common schemes):
    the recommended scheme's std, else (activation unknown) the envelope's nearest edge."""
    layer, param, st, rec = m.layer, m.param, m.stats, m.recommended
    expected, expected_scheme = (rec.std, rec.scheme) if rec else (None, None)
    envelope_ratio = None
    if param.is_weight and layer.weighted and math.isfinite(st.std) and st.std > 0:
        bounds = schemes.envelope(param.fan_in, param.fan_out, layer.kind, param.hidden, m.n_blocks)
        edge, nearest = bounds.nearest(st.std)
        envelope_ratio = st.std / edge
        if rec is None:
            expected, expected_scheme = edge, f"{nearest} (activation unknown)"
    return expected, expected_scheme, envelope_ratio


def _context_facts(graph: LayerGraph, m: Measured) -> dict[str, Any]:
    """Where the tensor sits: its layer, the layer's kind and activation, and what follows it in the model."""
    layer, param = m.layer, m.param
    return {
        "layer": layer.name, "tensor": param.key, "role": param.role, "kind": layer.kind,
        "module_type": layer.module_type, "activation": str(layer.activation),
        "activation_family": layer.activation.family, "norm_after": layer.norm_after,
        "residual_after": layer.residual_after, "gate_after": layer.gate_after,
        "residual_branch": layer.residual_branch, "position": layer.position,
        "depth": graph.depth, "run_depth": layer.run_depth, "is_output": layer.is_output,
        "order_known": layer.order_known, "norm_folded": layer.norm_folded, "norm_convention": _convention(layer),
        "in_flow": layer.in_flow,
    }


def _convention(layer: Layer) -> str | None:
    """A norm's gain convention: "one_plus" (x·(1+w): zero is its identity), "scale" (x·w), or "unknown" where no
    module says and the keys are an RMSNorm's (a weight alone), which both conventions share."""
    if layer.kind != "norm":
        return None
    if layer.gain_offset is not None:
        return "one_plus" if layer.gain_offset else "scale"
    roles = {p.role for p in layer.params}
    return "unknown" if roles == {"norm_weight"} else "scale"



def _stats_facts(m: Measured) -> dict[str, Any]:
    """What the measuring pass found in the values: moments, extremes, and dead and duplicate units."""
    st = m.stats
    dead = _dead_units(m)
    groups = st.duplicate_groups
    return {
        "numel": st.numel, "units": st.n_units,
        "non_finite": st.non_finite, "nan": st.nan, "inf": st.inf, "mean": st.mean, "std": st.std,
        "min": st.min, "max": st.max, "abs_max": st.abs_max, "kurtosis": st.excess_kurtosis,
        "zero_fraction": st.zero_fraction, "distinct": st.distinct, "constant": st.constant,
        "value": st.min if st.constant else None, "zero_units": len(st.zero_units), "dead_units": len(dead),
        "dead_unit_list": short_list(dead), "duplicate_units": st.duplicate_units, "duplicate_groups": len(groups),
        "duplicate_fraction": st.duplicate_units / st.n_units if st.n_units else 0.0,
        "substantial_duplicate_units": st.substantial_duplicate_units,
        "dead_fraction": len(dead) / st.n_units if st.n_units else 0.0,
        "peak_share": _peak_share(st),
        "duplicate_example": short_list(groups[0]) if groups else None,
    }


def _dead_units(m: Measured) -> list[int]:
    """The all-zero units that stay off: with a bias, only those whose bias is not positive."""
    dead, bias = m.stats.zero_units, m.bias
    if bias is not None and dead and bias.numel() == m.stats.n_units:
        b = bias.detach().reshape(-1)
        dead = [u for u in dead if float(b[u]) <= 0]
    return dead


def _scheme_facts(m: Measured) -> dict[str, Any]:
    """The init scheme the fingerprint names (and, for a near-tie, each alternative)."""
    fp = m.fingerprint
    return {
        "scheme": fp.scheme if fp else None, "scheme_family": fp.family if fp else None,
        "scheme_gain": fp.gain if fp else None, "scheme_fan": fp.fan if fp else None,
        "scheme_ambiguous": fp.ambiguous if fp else False,
        ALTERNATIVES: [{"scheme": a.scheme, "scheme_family": a.family, "scheme_gain": a.gain,
                                 "scheme_fan": a.fan, "implied_std": a.implied_std} for a in fp.alternatives] if fp else [],
        "implied_std": fp.implied_std if fp else None,
    }


def _bias_ratio(m: Measured) -> float | None:
    """The bias's RMS over the weight's output scale std·√fan_in: how much of a unit's input the bias is."""
    bias, param, st = m.bias, m.param, m.stats
    if bias is not None and param.is_weight and param.fan_in and st.std > 0 and math.isfinite(st.std):
        return float(bias.detach().float().pow(2).mean().sqrt()) / (st.std * math.sqrt(param.fan_in))
    return None


def _peak_share(st: TensorStats) -> float | None:
    """The share of the tensor's squared deviations its largest entry holds."""
    if not st.std > 0:
        return None
    peak = max(abs(st.max - st.mean), abs(st.min - st.mean))
    return min(peak * peak / (st.finite * st.std * st.std), 1.0)


def short_list(units: list[int], most: int = 8) -> str:
    """'1, 2, 3, … (12 in all)': the first `most` of a list of names or units."""
    shown = ", ".join(map(str, units[:most]))
    return shown + (f", … ({len(units)} in all)" if len(units) > most else "")


def add_recipe_shares(measured: list[Measured]) -> None:
    """`recipe_share`: the share of the model's weighted layers drawn with a fixed std (normal 0.02 on every
    Linear, depth-scaled 0.02 on the projections: a recipe, not a per-layer choice); a near-tie with a fixed
    std among its names counts (normal 0.02 on a depthwise conv is also Xavier's std at some widths)."""
    def fixed(m: Measured) -> bool:
        return m.fingerprint is not None and "fixed" in m.fingerprint.family.split("|")

    weights = [m for m in measured if m.param.is_weight and m.layer.weighted and m.fingerprint is not None]
    share = sum(map(fixed, weights)) / len(weights) if weights else 0.0
    for m in measured:
        m.facts["recipe_share"] = share if fixed(m) else 0.0


_BLOCK = re.compile(r"^([^.]*?\d[^.]*|.*?\.[^.]*?\d[^.]*)\.")  # up to the first numbered name: "layer1", "s1"


def add_block_zeros(measured: list[Measured]) -> None:
    """`zero_in_every_block`: the tensor is all zero, and so is the same tensor of at least one numbered sibling block
    (layer1.0.bn2.weight, layer2.1.bn2.weight, s1.b2.conv3.bn.weight...: every number in a module name read as a
    wildcard; siblings without a residual sum keep theirs), while each of those blocks (up to the first numbered
    name: layer1, s1) holds a live tensor of that role.
    That is how Fixup, SkipInit, zero_init_residual and adaLN-zero start every block at the identity; an init loop
    that zeroes every gain (or every layer) leaves no live one in the block, a single zeroed layer has no twin."""
    def zero(m: Measured) -> bool:
        return m.stats.zero_fraction >= 0.999

    siblings: dict[tuple[str, str], list[tuple[str, Measured]]] = {}
    live: set[tuple[str, str]] = set()
    for m in measured:
        found = _BLOCK.match(m.param.key)
        if found:
            block = found.group(1)
            siblings.setdefault((re.sub(r"\d+(?=[^.]*\.)", "*", m.param.key), m.param.role), []).append((block, m))
            if not zero(m):
                live.add((block, m.param.role))
    for (_, role), group in siblings.items():
        zeros = [(block, m) for block, m in group if zero(m)]
        recipe = len(zeros) >= 2 and all((block, role) in live for block, _ in zeros)
        for _, m in zeros:
            m.facts["zero_in_every_block"] = recipe


def signal_facts(layer: Layer, depth: LayerDepth | None, forward: dict[str, str], backward: dict[str, str],
                 origin: str = "predicted") -> dict:
    """The facts the signal rules test, for one layer: its predicted (or measured) gain and scales, and where the
    forward signal or the gradient leaves the band."""
    depth = depth or LayerDepth(layer.name)
    return {"predicted_gain": depth.gain, "predicted_scale": depth.scale, "predicted_grad_scale": depth.grad_scale,
            "signal_exit": forward.get(layer.name), "gradient_exit": backward.get(layer.name), "origin": origin,
            "stream_exit": depth.stream_exit, "signal_dead": depth.dead is not None, "stream_growth": depth.stream.growth if depth.stream else None,
            "signal_detail": detail(forward.get(layer.name), backward.get(layer.name), depth, origin)}
