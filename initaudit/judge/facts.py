"""The facts the rules test, made in one place (their names and meanings: catalogue.py, beside this file):
per tensor from what the measuring pass found, per layer from the depth analysis, and the model-wide share of
layers drawn at a fixed std. The fresh/trained facts (`state`, `layer_state`) are set by `weight_state.apply`."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from initaudit.flow import key_order
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
    layer, param, rec = m.layer, m.param, m.recommended
    st = effective_stats(m)
    expected, expected_scheme, envelope_ratio = _expectation(m, _fed_by(graph, m.layer))
    ratio = st.std / expected if expected and math.isfinite(st.std) else None
    return {
        **_context_facts(graph, m), **_scale_facts(m), "envelope_ratio": envelope_ratio,
        "is_last": layer.position == graph.depth - 1,
        "fan_in": param.fan_in, "fan_out": param.fan_out, **_stats_facts(m), **_scheme_facts(m),
        "expected_scheme": expected_scheme,
        "expected_std": expected, "expected_call": rec.call if rec else None,
        "std_ratio": ratio, "variance_gain": ratio * ratio if ratio is not None else None,
        "shared": param.shared_with is not None, "bias_ratio": _bias_ratio(m), **_fan_facts(m), **_bias_facts(m),
        "zero_in_every_block": False, "feeds_zero": False, **coord_facts(),
    }


def coord_facts(width: dict[str, Any] | None = None, update: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts of `probe --widths` (probe/coord.py) for one layer: how its output's scale follows the width
    (`width`: slope, growth, t, count, range) and the largest optimizer step on its weight (`update`: ratio, width,
    sign_step, optimizer); None outside a sweep."""
    width, update = width or {}, update or {}
    return {"width_slope": width.get("slope"), "width_growth": width.get("growth"), "width_t": width.get("t"),
            "width_count": width.get("count"), "width_range": width.get("range"),
            "update_ratio": update.get("ratio"), "update_width": update.get("width"),
            "sign_step_ratio": update.get("sign_step"), "update_optimizer": update.get("optimizer")}


# The SNN paper's stable band for a SELU layer's fan_in·Var(w) (Klambauer et al. 2017, Theorem 1's domain).
SNN_BAND = (0.95, 1.1)


def _fan_facts(m: Measured) -> dict[str, Any]:
    """Where the signal's fan is not torch's (a transposed conv): the known mistake of Kaiming at torch's fan;
    and a SELU layer's variance gain against the SNN band, beyond the sampling error of its estimate."""
    param, fp, st = m.param, m.fingerprint, effective_stats(m)
    forward = param.signal_fans[0]
    mistake = bool(fp and param.flow_fans and forward != param.fan_in and fp.fan == "fan_in"
                   and fp.family in ("kaiming", "lecun"))
    note = (f"; torch.nn.init counted this transposed conv's fan from weight dim 1 ({param.fan_in}), its signal "
            f"sees in·k/stride² = {forward}") if mistake else ""
    band = None
    if m.layer.activation.family == "selu" and param.is_weight and st.numel and math.isfinite(st.std):
        gain, error = forward * (st.std ** 2 + st.mean ** 2), 3 * math.sqrt(2 / st.numel)
        band = "below" if gain * (1 + error) < SNN_BAND[0] else "above" if gain * (1 - error) > SNN_BAND[1] else "inside"
    return {"torch_fan_mistake": mistake, "fan_note": note, "snn_band": band}


def effective_scale(m: Measured) -> float:
    """The constant the forward pass multiplies this tensor by (a layer's weight: `Layer.weight_scale`), else 1."""
    return m.layer.weight_scale if m.param is m.layer.param("weight") else 1.0


def effective_stats(m: Measured) -> TensorStats:
    """The tensor's stats as the forward pass uses it: times its `effective_scale`."""
    return m.stats.scaled(effective_scale(m))


def _scale_facts(m: Measured) -> dict[str, Any]:
    """The effective scale, the stored tensor's std, and how a message names the std it speaks of."""
    scale, stored = effective_scale(m), m.stats.std
    label = "std" if scale == 1.0 else f"effective std (stored std {stored:.3g} × {scale:.3g} at run time)"
    return {"effective_scale": scale, "stored_std": stored, "std_label": label}


def _fed_by(graph: LayerGraph, layer: Layer) -> Layer | None:
    """The weighted layer right before this one in forward order, if any."""
    return graph.weighted_at.get(layer.position - 1)


def _expectation(m: Measured, before: Layer | None = None) -> tuple[float | None, str | None, float | None]:
    """(expected std, the scheme that gives it, the std over the nearest edge of the envelope of common schemes):
    the recommended scheme's std, else (activation unknown) the envelope's nearest edge; all of the effective
    weight. SIREN (`_siren`) has its own first layer and readout."""
    layer, param, st, rec = m.layer, m.param, effective_stats(m), m.recommended
    expected, expected_scheme = (rec.std, rec.scheme) if rec else (None, None)
    expected, expected_scheme = _siren(m, before) or (expected, expected_scheme)
    envelope_ratio = None
    if param.is_weight and layer.weighted and math.isfinite(st.std) and st.std > 0:
        bounds = schemes.envelope(param.fan_in, param.fan_out, layer.kind, param.hidden, m.n_blocks)
        edge, nearest = bounds.nearest(st.std)
        envelope_ratio = st.std / edge
        if rec is None:
            expected, expected_scheme = edge, f"{nearest} (activation unknown)"
    return expected, expected_scheme, envelope_ratio


def _siren(m: Measured, before: Layer | None) -> tuple[float, str] | None:
    """SIREN's (Sitzmann et al. 2020) own expected stds: its first sine layer U(±1/n) before ω0 (the input
    coordinates are no unit-variance signal), and a linear readout after a sine layer U(±√(6/n)/ω0), ω0 that
    layer's; None elsewhere."""
    layer, n = m.layer, max(m.param.fan_in, 1)
    if not (m.param is layer.param("weight") and m.recommended is not None):
        return None
    if layer.activation.family == "periodic" and layer.position == 0:
        return effective_scale(m) / (n * math.sqrt(3)), "siren-first-layer"
    if layer.is_output and layer.activation.name == "identity" and before is not None \
            and before.activation.family == "periodic" and before.weight_scale != 1.0:
        return math.sqrt(2 / n) / before.weight_scale, "siren-readout"
    return None


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
        "order_known": layer.order_known, "norm_folded": layer.norm_folded, "folded_in": _folded_in(layer),
        "norm_convention": _convention(layer), "in_flow": layer.in_flow,
    }


def _folded_in(layer: Layer) -> str:
    """What a zero in the weights may come from where an exporter folded a BatchNorm into them: its gain."""
    if not layer.norm_folded:
        return ""
    norm = f"`{layer.folded_norm}` weight" if layer.folded_norm else "the weight of the BatchNorm after it"
    return f" (BatchNorm gain folded in: {norm} is zero, or the conv's own)"


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
    """What the measuring pass found in the values (times the effective scale): moments, extremes, and dead and
    duplicate units."""
    st = effective_stats(m)
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
        "peak_share": _peak_share(st), "spike_ratio": _spike_ratio(st),
        "duplicate_example": short_list(groups[0]) if groups else None, **_edge_facts(st),
        **_garbage_facts(st),
    }


def _edge_facts(st: TensorStats) -> dict[str, Any]:
    """Entries exactly on a truncation bound (schemes.truncation_edges), against what a correct draw leaves."""
    edges = schemes.truncation_edges(st)
    if edges is None:
        return {"edge_values": 0, "edge_bound": None, "edge_allowance": None, "edge_pile": False, "edge_peak": False}
    return {"edge_values": edges.count, "edge_bound": edges.bound, "edge_allowance": edges.allowance,
            "edge_pile": edges.pile, "edge_peak": any(abs(v) == st.abs_max for v in edges.values)}


def _garbage_facts(st: TensorStats) -> dict[str, Any]:
    """The signs of uninitialized memory the measuring pass read from the values (measure/garbage.py)."""
    g = st.garbage
    return {"subnormal_share": g.subnormal_share, "subnormal_excess": g.subnormal_excess,
            "magnitude_decades": g.magnitude_decades, "huge_share": g.huge_share,
            "median_magnitude": g.median_magnitude, "pile_share": g.pile_share, "pile_value": g.pile_value}


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
    bias, param, st = m.bias, m.param, effective_stats(m)
    fan = param.signal_fans[0]
    if bias is not None and param.is_weight and fan and st.std > 0 and math.isfinite(st.std):
        return float(bias.detach().float().pow(2).mean().sqrt()) / (st.std * math.sqrt(fan))
    return None


def _bias_facts(m: Measured) -> dict[str, Any]:
    """A non-zero bias read: the published recipe it follows, if one, and what it is in words (for messages)."""
    if m.param.role != "bias" or not m.stats.abs_max > 0:
        return {"bias_recipe": None, "bias_reading": None}
    recipe = _bias_recipe(m)
    reading = f"bias is not zero (|b| up to {m.stats.abs_max:.3g}); " + (
        f"{recipe}: a published recipe, not the guide's zero" if recipe else "the guide initializes biases to zero")
    return {"bias_recipe": recipe, "bias_reading": reading}


def _bias_recipe(m: Measured) -> str | None:
    """A constant bias (no draw is constant: someone set it), or a recurrent layer's biases set gate by gate."""
    st, bias, hidden = m.stats, m.bias, m.param.hidden
    if st.constant:
        return (f"a constant bias of {st.min:g}, set on purpose (StyleGAN's style affines and gates start at 1, "
                "a classifier's prior at -log((1-p)/p))")
    if bias is None or m.layer.kind != "recurrent" or not hidden or bias.numel() % hidden:
        return None
    gates = bias.detach().reshape(-1, hidden).to(torch.float64)
    return _gate_recipe(gates, hidden) if gates.shape[0] in GATE_NAMES else None


GATE_NAMES = {3: "GRU", 4: "LSTM"}  # gates per hidden unit; PyTorch's order: LSTM i, f, g, o; GRU r, z, n
FORGET_GATE = 1


def _gate_recipe(gates: torch.Tensor, hidden: int) -> str | None:
    """Gate biases set per gate (each gate's block one value, the others zero or torch's default U(±1/√hidden)):
    the LSTM forget-gate bias (Jozefowicz et al. 2015) where only the forget gate holds a non-zero value."""
    constant = [bool((g == g[0]).all()) for g in gates]
    values = [float(g[0]) if c else None for c, g in zip(constant, gates)]
    drawn = [not c and float(g.abs().max()) <= hidden ** -0.5 * (1 + 1e-6) for c, g in zip(constant, gates)]
    if not any(v for v in values) or not all(c or d for c, d in zip(constant, drawn)):
        return None
    rest = "; the other gates keep torch's default draw" if any(drawn) else ""
    set_gates = {i for i, v in enumerate(values) if v}
    if len(gates) == 4 and set_gates == {FORGET_GATE}:
        return f"the LSTM forget-gate bias {values[FORGET_GATE]:g} (Jozefowicz et al. 2015){rest}"
    shown = ", ".join("drawn" if v is None else f"{v:g}" for v in values)
    return f"{GATE_NAMES[len(gates)]} biases set gate by gate ({shown}){rest}"


def _peak_share(st: TensorStats) -> float | None:
    """The share of the tensor's squared deviations its largest entry holds."""
    if not st.std > 0:
        return None
    peak = max(abs(st.max - st.mean), abs(st.min - st.mean))
    return min(peak * peak / (st.finite * st.std * st.std), 1.0)


def _spike_ratio(st: TensorStats) -> float | None:
    """The largest entry's distance from the mean, in standard deviations of all the other entries."""
    if not st.std > 0 or st.finite < 3:
        return None
    peak = max(abs(st.max - st.mean), abs(st.min - st.mean))
    rest = st.finite * st.std * st.std - peak * peak
    return peak / math.sqrt(rest / (st.finite - 1)) if rest > 0 else math.inf


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
    (layer1.0.bn2.weight, layer2.1.bn2.weight, s1.b2.conv3.bn.weight...: block numbers read as wildcards,
    `_sibling_key`; siblings without a residual sum keep theirs), while each of those blocks (up to the first numbered
    name: layer1, s1) holds a live tensor of that role; and a lone zero outside them whose path ends as theirs does
    (DiT's final_layer.adaLN_modulation beside every block's adaLN_modulation).
    That is how Fixup, SkipInit, zero_init_residual and adaLN-zero start every block at the identity; an init loop
    that zeroes every gain (or every layer) leaves no live one in the block, a single zeroed layer has no twin, and a
    zero layer whose output the next layer of its block takes in (SE's fc1 before fc2) ends no block."""
    siblings: dict[tuple[str, str], list[tuple[str, Measured]]] = {}
    live: set[tuple[str, str]] = set()
    for m in measured:
        found = _BLOCK.match(m.param.key)
        if found:
            block = found.group(1)
            siblings.setdefault((_sibling_key(m.param.key), m.param.role), []).append((block, m))
            if not _zero(m):
                live.add((block, m.param.role))
    recipes: set[tuple[str, str]] = set()  # (the path within its block, role) of each block recipe's zeros
    for (_, role), group in siblings.items():
        zeros = [(block, m) for block, m in group if _zero(m)]
        recipe = len(zeros) >= 2 and all((block, role) in live for block, _ in zeros)
        for block, m in zeros:
            m.facts["zero_in_every_block"] = recipe
            if recipe:
                recipes.add((m.param.key[len(block) + 1:], role))
    _lone_zeros_like(measured, recipes)
    _zeros_fed_in_block(measured)


def _zero(m: Measured) -> bool:
    return m.stats.zero_fraction >= 0.999


def _lone_zeros_like(measured: list[Measured], recipes: set[tuple[str, str]]) -> None:
    """A zero tensor no sibling block repeats whose path ends as a block recipe's path within its block does, from a
    named module on (DiT's final_layer.adaLN_modulation.1.weight beside blocks.*.adaLN_modulation.1.weight): the
    same recipe, outside the blocks."""
    paths = {(path, role) for path, role in recipes if not path.split(".", 1)[0].isdigit()}
    for m in measured:
        if _zero(m) and not m.facts.get("zero_in_every_block") and any(
                m.param.role == role and m.param.key.endswith("." + path) for path, role in paths):
            m.facts["zero_in_every_block"] = True


def _zeros_fed_in_block(measured: list[Measured]) -> None:
    """Withdraw `zero_in_every_block` from a zero weight whose output the next layer of its own block takes in (that
    layer's input width is this one's output width, or half of it after a fused gate·up: squeeze-excite's fc1 before
    fc2, an MoE's stacked gate_up_proj before down_proj): mid-block, no block's end."""
    following = {m.layer.position: m for m in measured if m.param.is_weight and m.layer.weighted}
    for m in measured:
        after = following.get(m.layer.position + 1) if m.param.is_weight and m.layer.weighted else None
        if not m.facts.get("zero_in_every_block") or after is None:
            continue
        mine, theirs = _BLOCK.match(m.param.key), _BLOCK.match(after.param.key)
        out, taken = key_order.widths(m.layer)[1], key_order.widths(after.layer)[0]
        fed = out is not None and taken is not None and out in (taken, 2 * taken)
        if mine and theirs and mine.group(1) == theirs.group(1) and fed:
            m.facts["zero_in_every_block"] = False


def add_zero_feeds(measured: list[Measured], next_layers: dict[str, frozenset[str] | None]) -> None:
    """`feeds_zero`: every layer the weight's output reaches first (`next_layers`, from the flow) is all zero and
    none is an output: adaLN-zero's timestep MLP, whose output only the zero modulations take in."""
    zero = {m.layer.name for m in measured if m.param.is_weight and m.layer.weighted and _zero(m)}
    outputs = {m.layer.name for m in measured if m.layer.is_output}
    for m in measured:
        fed = next_layers.get(m.layer.name) if m.param.is_weight and m.layer.weighted else None
        m.facts["feeds_zero"] = bool(fed) and fed <= zero and not fed & outputs


def _sibling_key(key: str) -> str:
    """The tensor's name with its block numbers as wildcards: every numeric component, and the digits of named
    components before the layer's own (layer2.0.conv1.weight -> layer*.*.conv1.weight: conv1 and conv2 differ)."""
    parts = key.split(".")
    own = max((i for i, p in enumerate(parts) if re.search(r"\d", p) and not p.isdigit()), default=-1)
    return ".".join("*" if p.isdigit() else re.sub(r"\d+", "*", p) if i < own else p for i, p in enumerate(parts))


def signal_facts(layer: Layer, depth: LayerDepth | None, forward: dict[str, str], backward: dict[str, str],
                 origin: str = "predicted") -> dict:
    """The facts the signal rules test, for one layer: its predicted (or measured) gain and scales, and where the
    forward signal or the gradient leaves the band."""
    depth = depth or LayerDepth(layer.name)
    return {"predicted_gain": depth.gain, "predicted_scale": depth.scale, "predicted_grad_scale": depth.grad_scale,
            "signal_exit": forward.get(layer.name), "gradient_exit": backward.get(layer.name), "origin": origin,
            "stream_exit": depth.stream_exit, "signal_dead": depth.dead is not None, "stream_growth": depth.stream.growth if depth.stream else None,
            "signal_detail": detail(forward.get(layer.name), backward.get(layer.name), depth, origin),
            **collapse_facts()}


def collapse_facts(cosine: float | None = None, input_cosine: float | None = None, last_hidden: bool | None = None,
                   input_batch: str | None = None) -> dict:
    """The facts signal-collapse tests, measured by probe (none in check): the mean cosine between different inputs'
    outputs of the layer, the inputs' own, and the share of the inputs' spread in direction (1 − cosine) it keeps."""
    spread = 1 - (input_cosine or 0.0)
    kept = (1 - cosine) / spread if cosine is not None and spread > 0 else None
    return {"cosine": cosine, "input_cosine": input_cosine, "spread_kept": kept, "last_hidden": last_hidden,
            "input_batch": input_batch}
