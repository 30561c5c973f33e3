"""Depth analysis: the predicted scale of the signal (forward) and of the gradient (backward) at every layer.

Mean-field propagation over the model's data flow, for a unit-RMS input and a unit-RMS gradient at the
output. Each quantity is a second moment (E[x²]); what is reported is its square root, an RMS:

- a weighted layer multiplies it by fan_in·E[w²] forward (and adds E[b²]) and by fan_out·E[w²] backward;
- an activation φ maps it to E[φ(z)²] forward and multiplies the gradient by E[φ'(z)²], z ~ N(0, q) at
  the layer's own operating point q. These Gaussian expectations are computed numerically (a fine grid
  over ±10σ), so ReLU gives 1/2 and leaky ReLU (1+a²)/2 exactly, and tanh, sigmoid, GELU, SiLU, SELU…
  the factor of the scale they actually see (tanh: 1 for small signals, ≈0.39 at q=1, → 1/q saturated);
- a normalization resets the signal to its gain's second moment E[γ²] (1 without a gain; a gain the user left
  at N(0, 0.02) puts out 0.02 of the scale) and multiplies the gradient by E[γ²] over the signal it normalized;
- a residual sum adds the second moments of its inputs (the gradient is copied to both);
- a softmax (attention weights) carries no signal of its own; everything else passes the scale on;
- what a recurrent cell or a fused attention module puts out is not modelled: unknown until a normalization.
- the signal starts at the first weighted layer or normalization: what comes before it (the model's inputs,
  weights and constants the graph shows as sources, an embedding lookup) is taken as unit scale there.

A layer's `gain` is fan_in·E[w²] times its activation's factor at its operating point (the variance gain
a plain stack multiplies, layer after layer); `scale` the RMS of its output; `grad_scale` the RMS of the
loss gradient at its output, relative to the last hidden layer's (`relative_grads`); `after_norm` the norm
whose gain set the scale its run starts from, where that gain is NORM_OFF or more off 1. `judged` says where,
in forward order (backward: from the output), the scale leaves the band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from initaudit.flow.activations import IDENTITY, UNKNOWN, Activation
from initaudit.flow.dataflow import ACT, ADD, LAYER, MUL, NORM, OUTPUT, PASS, STOP, Flow
from initaudit.flow.layer import Layer, LayerGraph

DEEP_RUN = 5  # judged: runs of this many weighted layers or more (the selection guide: < 5 is shallow)
# A residual stream grows exponentially where its second moment is multiplied by at least STREAM_GROWTH per block,
# fitted (geometric mean) over the last STREAM_FIT blocks; additive growth (a pre-norm transformer's: each branch
# adds about a unit) gives 1 + 1/k at block k, under 1.1 from the tenth block on.
STREAM_GROWTH, STREAM_FIT = 1.1, 4
# A norm whose gain's RMS is this far off 1 (either way) does not reset the scale: it sets it off, and the run after
# it is judged however short (DCGAN's BatchNorm gains drawn N(0, 0.02) put out 2 % of the signal's scale).
NORM_OFF = 10.0
RULES = ("signal-vanishing", "signal-exploding")  # the rules the depth analysis feeds (predicted or measured)
# Kinds whose gain is fan_in·E[w²]; recurrent cells and fused attention pass the scale on unjudged.
_PLAIN = ("linear", "conv")
_GRID = torch.linspace(-10, 10, 8000, dtype=torch.float64)  # an even count: no node at the kinks of ReLU & co.
_DENSITY = torch.exp(-_GRID ** 2 / 2)
_DENSITY /= _DENSITY.sum()
_NO_SIGNAL = None  # a softmax's output: weights for other signals, no scale of its own

_FUNCTIONS = {
    "relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "mish": F.mish, "elu": F.elu,
    "celu": F.celu, "selu": F.selu, "hardswish": F.hardswish, "softplus": F.softplus, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "hardtanh": F.hardtanh, "hardsigmoid": F.hardsigmoid, "softsign": F.softsign,
    "sin": torch.sin, "cos": torch.cos, "identity": lambda x: x,
}


def function(activation: Activation):
    """The torch function of an activation, times its output's constant `scale` (None when unknown)."""
    if activation.name in ("leaky_relu", "prelu"):
        slope = 0.01 if activation.param is None else activation.param
        found = lambda x: F.leaky_relu(x, slope)  # noqa: E731
    else:
        found = _FUNCTIONS.get(activation.name)
    if found is None or activation.scale == 1.0:
        return found
    return lambda x: found(x) * activation.scale


def moments(activation: Activation, q: float) -> tuple[float, float]:
    """(E[φ(z)²], E[φ'(z)²]) for z ~ N(0, q): what the activation makes of a signal and a gradient of that scale."""
    if activation == IDENTITY:
        return q, 1.0
    if not (q > 0 and math.isfinite(q)) or function(activation) is None:
        return math.nan, math.nan
    return _moments(activation, float(f"{q:.4g}"))


@lru_cache(maxsize=4096)
def _moments(activation: Activation, q: float) -> tuple[float, float]:
    z = (_GRID * math.sqrt(q)).requires_grad_(True)
    y = function(activation)(z)
    (slope,) = torch.autograd.grad(y.sum(), z)
    return float((y.detach() ** 2 * _DENSITY).sum()), float((slope ** 2 * _DENSITY).sum())


def factor(activation: Activation, q: float = 1.0) -> float:
    """The activation's forward second-moment factor E[φ(z)²]/q at scale q (ReLU 1/2, leaky ReLU (1+a²)/2)."""
    return moments(activation, q)[0] / q


@dataclass(frozen=True)
class Weights:
    """What the propagation needs of one layer's tensors."""

    fan_in: int
    fan_out: int
    second_moment: float        # E[w²]
    bias_moment: float = 0.0    # E[b²]


@dataclass
class LayerDepth:
    name: str
    gain: float | None = None        # fan_in·E[w²]·the activation's factor at the layer's operating point
    scale: float | None = None       # RMS of the layer's output, for a unit-RMS input
    grad_scale: float | None = None  # RMS of the loss gradient at the layer's output (relative: `relative_grads`)
    stream: "StreamSum | None" = None  # the residual sum this layer's output (a branch end) joins, where one does
    stream_exit: str | None = None   # "exploding" where the residual stream leaves the band growing exponentially
    after_norm: tuple[str, float] | None = None  # (the norm, its gain's RMS) that set the scale its run starts from
    dead: str | None = None          # measured (probe): how the signal died at this layer, everything after it dead


@dataclass(frozen=True)
class StreamSum:
    """A residual sum on a stream of sums with no normalization between them: the stream's RMS after it, the
    sums on the stream up to it, the per-block growth factor of its second moment fitted over the last
    STREAM_FIT blocks (None until there are that many), and whether an earlier sum of it left the band."""

    scale: float
    blocks: int
    growth: float | None
    index: int  # the sum's node in the flow
    previous: int | None = None


def chain(graph: LayerGraph) -> Flow:
    """A flow for a model whose data flow is not known (bare files, module order): its layers in forward order,
    each followed by its activation (as named by the user) and its normalization."""
    items = []
    for layer in sorted((layer for layer in graph if layer.weighted), key=lambda layer: layer.position):
        items.append((LAYER, layer.name, None))
        if layer.norm_after:
            items.append((NORM, layer.norm, None))
        if layer.activation != IDENTITY:
            items.append((ACT, None, layer.activation))
    return Flow.chain(items)


def _order(flow: Flow) -> tuple[list[int], list[list[int]]]:
    """Topological order of the flow's nodes (ties in insertion order; any on a cycle last) and each node's
    producers."""
    producers = flow.producers()
    order = flow.topological(producers)
    seen = set(order)
    return order + [i for i in range(len(flow.nodes)) if i not in seen], producers


def _gathered(values: list[float | None]) -> float | None:
    """The scale a pass-through node carries on: the largest of its inputs' (unknown wins, softmax weights don't count)."""
    signal = [v for v in values if v is not _NO_SIGNAL]
    if any(math.isnan(v) for v in signal):
        return math.nan
    return max(signal) if signal else _NO_SIGNAL


def propagate(flow: Flow, weights: dict[str, Weights], kinds: dict[str, str],
              gains: dict[str, float] | None = None) -> dict[str, LayerDepth]:
    """Forward and backward second moments along the flow (`gains`: each named norm's E[γ²], 1 where not given);
    per layer (its first node) the RMS values, for a branch end the residual sum it joins (`streams`), and the
    norm whose gain set its run's scale off 1 (`set_off`)."""
    gains = gains or {}
    order, producers = _order(flow)
    fwd, inputs = _forward(flow, order, producers, weights, kinds, gains)
    back: list[float | None] = [None] * len(flow.nodes)
    for idx in reversed(order):
        parts = [_passed_back(flow.nodes[u], inputs[u], back[u], weights, kinds, gains) for u in flow.nodes[idx].users]
        parts = [p for p in parts if p is not None]
        back[idx] = (math.nan if any(math.isnan(p) for p in parts) else sum(parts)) if parts else None
    joined, off = streams(flow, order, producers, fwd), set_off(flow, order, producers, gains)
    out: dict[str, LayerDepth] = {}
    for idx in order:
        node = flow.nodes[idx]
        if node.role == LAYER and node.layer and node.layer not in out:
            out[node.layer] = LayerDepth(node.layer, scale=_rms(fwd[idx]), grad_scale=_rms(back[idx]),
                                         stream=joined.get(idx), after_norm=off[idx])
    return out


def set_off(flow: Flow, order: list[int], producers: list[list[int]],
            gains: dict[str, float]) -> list[tuple[str, float] | None]:
    """Per node: the norm (and its gain's RMS) whose gain, NORM_OFF or more off 1, set the scale of the signal it
    takes in, the next norm not having reset it; a residual sum keeps it only where every summand has it (the
    stream of a zero-gain residual branch carries the signal on)."""
    out: list[tuple[str, float] | None] = [None] * len(flow.nodes)
    for idx in order:
        node, marks = flow.nodes[idx], [out[p] for p in producers[idx]]
        if node.role == NORM:
            rms = math.sqrt(gains.get(node.layer, 1.0)) if node.layer else 1.0
            out[idx] = (node.layer, rms) if not 1 / NORM_OFF < rms < NORM_OFF else None
        elif node.role == ADD:
            out[idx] = marks[0] if marks and all(marks) else None
        else:
            out[idx] = next((m for m in marks if m), None)
    return out


def _forward(flow: Flow, order: list[int], producers: list[list[int]], weights: dict[str, Weights],
             kinds: dict[str, str], gains: dict[str, float]) -> tuple[list[float | None], list[float | None]]:
    """Each node's output second moment, and the one it takes in (the largest of its inputs')."""
    fwd: list[float | None] = [_NO_SIGNAL] * len(flow.nodes)
    inputs: list[float | None] = [_NO_SIGNAL] * len(flow.nodes)
    for idx in order:
        node = flow.nodes[idx]
        ins = [fwd[p] for p in producers[idx]]
        q = _gathered(ins)
        inputs[idx] = q
        if _by_parameter(node):
            fwd[idx] = q if q is _NO_SIGNAL else q * node.moment
        elif node.role == LAYER:
            w = weights.get(node.layer)
            base = 1.0 if q is _NO_SIGNAL else q
            plain = w is not None and kinds.get(node.layer, "").startswith(_PLAIN)
            fwd[idx] = w.fan_in * w.second_moment * base + w.bias_moment if plain else math.nan
        elif node.role == ACT:
            fwd[idx] = q if q is _NO_SIGNAL else moments(node.activation or UNKNOWN, q)[0]
        elif node.role == NORM:
            fwd[idx] = gains.get(node.layer, 1.0) if node.layer else 1.0
        elif node.role == STOP:
            fwd[idx] = _NO_SIGNAL
        elif node.role == ADD:
            signal = [v for v in ins if v is not _NO_SIGNAL]
            fwd[idx] = sum(signal) if signal else _NO_SIGNAL
        else:
            fwd[idx] = q
    return fwd, inputs


def streams(flow: Flow, order: list[int], producers: list[list[int]],
            fwd: list[float | None]) -> dict[int, StreamSum]:
    """For each branch end (the weighted layer whose output a residual sum adds to the stream), the sum it joins.
    Walking back from a sum of two inputs, each side stops at a weighted layer, a normalization or an earlier
    sum: the side that stops later in the forward order is the branch, the other the stream it is added to.
    A product by a learnable parameter (ReZero's α, LayerScale's γ) on the way scales the branch by its E[p²];
    a branch gated on its way (a product of two signals: adaLN-zero's gate) is not modelled: its sum starts a
    new stream."""
    rank = {idx: i for i, idx in enumerate(order)}
    sums: dict[int, StreamSum] = {}
    ends: dict[int, StreamSum] = {}
    for idx in order:
        if flow.nodes[idx].role != ADD or len(_computed(flow, producers, idx)) != 2 or not _positive(fwd[idx]):
            continue
        sides = sorted((_side(flow, producers, p) for p in _computed(flow, producers, idx)), key=lambda side: rank.get(side[0], -1))
        (stream, _), (branch, scaled) = sides
        if branch is None or branch == stream or flow.nodes[branch].role != LAYER:
            continue
        previous = sums.get(stream) if not scaled else None
        sums[idx] = ends[branch] = _stream_sum(idx, fwd, previous, sums)
    return ends


def _side(flow: Flow, producers: list[list[int]], start: int) -> tuple[int | None, bool]:
    """Walking back from one input of a sum through pass-through nodes and activations: the first weighted
    layer, normalization or sum (of two inputs) reached, and whether a product was passed on the way."""
    idx, scaled = start, False
    while True:
        node = flow.nodes[idx]
        computed = _computed(flow, producers, idx)
        if not _by_parameter(node) and (node.role in (LAYER, NORM) or node.role == ADD and len(computed) == 2):
            return idx, scaled
        scaled = scaled or node.role == MUL and not _by_parameter(node)
        if node.role not in (PASS, ACT, MUL, ADD) and not _by_parameter(node) or len(computed) != 1:
            return None, scaled
        idx = computed[0]


def _computed(flow: Flow, producers: list[list[int]], idx: int) -> list[int]:
    """The inputs of node `idx` that are computed (not a parameter or constant: a node with no producers)."""
    return [p for p in producers[idx] if producers[p] or flow.nodes[p].role == LAYER]


def _by_parameter(node) -> bool:
    """A product by a learnable parameter (ReZero's α, LayerScale's γ; in ONNX it may hold a layer of its own):
    it multiplies the second moment by E[p²]."""
    return node.moment is not None


def _stream_sum(idx: int, fwd: list[float | None], previous: StreamSum | None,
                sums: dict[int, StreamSum]) -> StreamSum:
    """The stream after sum `idx`, continuing `previous` (the sum before it on the stream) where there is one."""
    blocks = previous.blocks + 1 if previous else 1
    growth, back = None, previous
    for _ in range(STREAM_FIT - 1):
        back = sums.get(back.previous) if back and back.previous is not None else None
    if back is not None and blocks > STREAM_FIT:
        growth = (fwd[idx] / back.scale ** 2) ** (1 / STREAM_FIT)
    return StreamSum(math.sqrt(fwd[idx]), blocks, growth, idx, previous.index if previous else None)


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _passed_back(user, q_in: float | None, g: float | None, weights: dict[str, Weights],
                 kinds: dict[str, str], gains: dict[str, float]) -> float | None:
    """The gradient second moment `user` hands back to one of its inputs (None: no gradient path)."""
    if user.role == OUTPUT:
        return 1.0
    if g is None or user.role == STOP:
        return None
    if _by_parameter(user):
        return g * user.moment
    if user.role == LAYER:
        w = weights.get(user.layer)
        plain = w is not None and kinds.get(user.layer, "").startswith(_PLAIN)
        return w.fan_out * w.second_moment * g if plain else g
    if user.role == ACT:
        return g if q_in is _NO_SIGNAL else moments(user.activation or UNKNOWN, q_in)[1] * g
    if user.role == NORM:
        gain = gains.get(user.layer, 1.0) if user.layer else 1.0
        return g * gain if q_in is _NO_SIGNAL else g * gain / q_in if q_in > 0 else math.nan
    return g


def _rms(m: float | None) -> float | None:
    return None if m is None or math.isnan(m) or m < 0 else math.sqrt(m)


def predict(graph: LayerGraph, flow: Flow | None, weights: dict[str, Weights],
            gains: dict[str, float] | None = None) -> dict[str, LayerDepth]:
    """Every weighted layer's predicted gain, scale and gradient scale (the flow: `chain` where none is known, or
    where it is module order, blind to functional calls); `gains`: each norm's E[γ²]."""
    kinds = {layer.name: layer.kind for layer in graph}
    found = propagate(flow if flow is not None and flow.sees_activations else chain(graph), weights, kinds, gains)
    for layer in graph:
        depth = found.get(layer.name)
        w = weights.get(layer.name)
        if depth is None or w is None or not layer.kind.startswith(_PLAIN):
            continue
        q = 1.0 if layer.norm_after else depth.scale ** 2 if depth.scale else math.nan
        f = 1.0 if layer.activation == IDENTITY else factor(layer.activation, q) if q > 0 else math.nan
        gain = w.fan_in * w.second_moment * f
        depth.gain = gain if math.isfinite(gain) else None
    relative = relative_grads(list(graph), {name: d.grad_scale for name, d in found.items()})
    for name, d in found.items():
        d.grad_scale = relative[name]
    return found


def classify(value: float | None, band: tuple[float, float]) -> str | None:
    """'vanishing' below the band, 'exploding' above, 'stable' inside; None when unknown, or exactly 0 (a zeroed
    layer: the zero-weights rule's finding, not a matter of depth)."""
    if value is None or math.isnan(value) or value == 0:
        return None
    return "vanishing" if value < band[0] else "exploding" if value > band[1] else "stable"


def crossings(values: list[tuple[str, float | None]], band: tuple[float, float]) -> list[tuple[str, str | None, str]]:
    """(layer, the layer before it, verdict) wherever the value, in the order given, leaves the band (again, after
    coming back into it)."""
    state, out, previous = "stable", [], None
    for name, value in values:
        verdict = classify(value, band)
        if verdict is None:
            continue
        if verdict != "stable" and verdict != state:
            out.append((name, previous, verdict))
        state, previous = verdict, name
    return out


def judged_layers(layers: list[Layer], set_off: frozenset[str] | set[str] = frozenset()) -> list[Layer]:
    """The layers whose scale is judged, in forward order: plain layers (not recurrent or fused attention, whose gain
    is not modelled) in runs of at least DEEP_RUN weighted layers with no normalization or residual sum between them
    (graph._assign_runs), or in a run of any length whose scale a norm's gain set off 1 (`set_off`: LayerDepth's
    `after_norm`), not right before a normalization. Elsewhere norms and residual sums keep the scale from
    compounding (the selection guide: shallow stacks do fine with any plain random init), and what a squeeze-excite
    gate or an attention softmax does to a gradient is not modelled."""
    return sorted((layer for layer in layers if layer.kind.startswith(_PLAIN) and not layer.norm_after
                   and (layer.run_depth >= DEEP_RUN or layer.name in set_off)), key=lambda layer: layer.position)


def relative_grads(layers: list[Layer], grads: dict[str, float | None]) -> dict[str, float | None]:
    """Gradient scales relative to the one the output layer hands back: at the last hidden layer's output (the
    last judged layer in forward order that is not an output). A narrow head (10 classes from 4096 features)
    shrinks every gradient below it alike; that is no vanishing."""
    hidden = [layer for layer in judged_layers(layers) if not layer.is_output and not layer.norm_after
              and grads.get(layer.name)]
    last = max(hidden, key=lambda layer: layer.position, default=None)
    ref = grads[last.name] if last is not None else 1.0
    return {name: (g / ref if g is not None else None) for name, g in grads.items()}


def judged(layers: list[Layer], scales: dict[str, float | None], grads: dict[str, float | None],
           band: tuple[float, float],
           set_off: frozenset[str] | set[str] = frozenset()) -> tuple[dict[str, str], dict[str, str]]:
    """(forward exits, backward exits) over the judged layers (`judged_layers`): forward in order, backward from the
    output (`grads` relative, see `relative_grads`). On a residual branch only exploding counts, either way: the
    sum carries the stream (and its gradient) on, and a branch that starts near zero is what zero-init residuals,
    LayerScale and FocalNet's modulation at normal(0.02) do on purpose; a branch that swamps the stream is not."""
    ordered = judged_layers(layers, set_off)
    branch = {layer.name for layer in ordered if layer.residual_branch}
    forward = {name: verdict for name, _, verdict in
               _exits([(layer.name, scales.get(layer.name)) for layer in ordered], branch, band)}
    backward = {}
    # an output layer's gradient is the loss's own: relative to the last hidden layer's it only mirrors the head's
    # weights (SIREN's readout at U(±√(6/n)/ω0)), which the per-layer scale rules judge
    hidden = [layer for layer in reversed(ordered) if not layer.is_output]
    for name, above, verdict in _exits([(layer.name, grads.get(layer.name)) for layer in hidden], branch, band):
        # Going back, the layer above handed the gradient down out of the band (its weights): it is blamed, unless
        # the forward signal left the band the same way on this very layer (one fault, both directions).
        backward[name if above is None or forward.get(name) == verdict else above] = verdict
    return forward, backward


def judge_streams(found: dict[str, LayerDepth], band: tuple[float, float]) -> None:
    """Set `stream_exit` on the branch end whose sum takes the residual stream out of the band growing
    exponentially (by STREAM_GROWTH per block or more, fitted over STREAM_FIT blocks), where the sum before it
    on the stream did not."""
    sums = {d.stream.index: d.stream for d in found.values() if d.stream is not None}

    def exploding(s: StreamSum | None) -> bool:
        return s is not None and s.scale > band[1] and s.growth is not None and s.growth >= STREAM_GROWTH

    for d in found.values():
        if exploding(d.stream) and not exploding(sums.get(d.stream.previous)):
            d.stream_exit = "exploding"


def _exits(values: list[tuple[str, float | None]], branch: set[str],
           band: tuple[float, float]) -> list[tuple[str, str | None, str]]:
    """`crossings` off the residual branches, and where a branch explodes."""
    off = crossings([(name, value) for name, value in values if name not in branch], band)
    return off + [c for c in crossings(values, band) if c[0] in branch and c[2] == "exploding"]


def detail(forward: str | None, backward: str | None, depth: LayerDepth, origin: str) -> str | None:
    """One clause per direction in which the scale leaves the band at this layer."""
    parts = []
    if depth.dead:
        parts.append(f"the signal dies here ({depth.dead}): every layer after it puts out the same for every input")
    elif forward:
        parts.append(f"the forward signal's RMS reaches {depth.scale:.3g}x the input's ({forward})")
        if depth.after_norm:
            parts[-1] += (f", set off by the norm {depth.after_norm[0]} before it, whose gain's RMS "
                          f"{depth.after_norm[1]:.3g} scales everything it puts out")
    if backward:
        parts.append(f"the gradient's RMS reaches {depth.grad_scale:.3g}x the last hidden layer's ({backward} going back)")
    if depth.stream_exit:
        s = depth.stream
        parts.append(f"the residual stream's RMS reaches {s.scale:.3g}x the input's after {s.blocks} residual sums "
                     f"with no normalization, its variance growing {s.growth:.3g}x per block (exponential: each "
                     f"branch adds its own second moment, which grows with the stream's)")
    if not parts:
        return None
    gain = f"; per-layer variance gain {depth.gain:.3g}" if depth.gain is not None else ""
    return f"{origin}: " + " and ".join(parts) + gain
