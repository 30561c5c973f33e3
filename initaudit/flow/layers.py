"""The format-neutral layer graph: layers grouped from tensor names, their kind, fans and context."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

from initaudit.flow.activations import IDENTITY, UNKNOWN, Activation
from initaudit.flow import key_order
from initaudit.flow.dataflow import LAYER, NORM, OUTPUT, PASS, Downstream, Flow
from initaudit.flow.layer import WEIGHTED_KINDS, Layer, LayerGraph, Param, run_lengths

OPTIMIZER_STATE = "optimizer_state"  # kind and role of an optimizer's tensors, audited only when asked (health rules)

_EMBEDDING_NAME = re.compile(r"(^|[._])([a-z0-9]*embed\w*|wte|wpe|tok_emb\w*|pos_emb\w*|shared|relative_attention_bias)$",
                             re.I)


def embedding_name(name: str) -> bool:
    """The name of an embedding table as models name them (embed_tokens, position_embeddings, wte, wpe...)."""
    return bool(_EMBEDDING_NAME.search(name))


_RECURRENT_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
_BUFFER_KEYS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


# ---------------------------------------------------------------- kinds from class names

_KIND_BY_CLASS = {
    "Linear": "linear", "LazyLinear": "linear", "NonDynamicallyQuantizableLinear": "linear", "Bilinear": "linear",
    "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d",
    "LazyConv1d": "conv1d", "LazyConv2d": "conv2d", "LazyConv3d": "conv3d",
    "ConvTranspose1d": "conv_transpose1d", "ConvTranspose2d": "conv_transpose2d", "ConvTranspose3d": "conv_transpose3d",
    "Embedding": "embedding", "EmbeddingBag": "embedding",
    "LSTM": "recurrent", "GRU": "recurrent", "RNN": "recurrent",
    "LSTMCell": "recurrent", "GRUCell": "recurrent", "RNNCell": "recurrent",
    "MultiheadAttention": "attention",
    "PReLU": "parameter",
}
# Hugging Face's GPT-2 style Conv1D is a Linear that stores its weight as [in, out].
TRANSPOSED_LINEAR_CLASSES = frozenset({"Conv1D"})


def kind_of_class(class_names: list[str]) -> str | None:
    """Kind from a module's class name(s), most derived first (MRO names, or TorchScript's original_name)."""
    for name in class_names:
        if name in TRANSPOSED_LINEAR_CLASSES:
            return "linear"
        if name in _KIND_BY_CLASS:
            return _KIND_BY_CLASS[name]
        if re.search(r"Norm(\dd)?$", name) or "BatchNorm" in name or "GroupNorm" in name:
            return "norm"
    return None


# ---------------------------------------------------------------- fans

def fans(kind: str, shape: tuple[int, ...], transposed: bool = False) -> tuple[int, int, int]:
    """(fan_in, fan_out, unit_axis) as torch.nn.init computes fans, for a weight of this kind.

    torch: Linear [out, in]; Conv [out, in/groups, *k]; ConvTranspose [in, out/groups, *k] (torch's
    init treats dim 1 as fan_in there too); a transposed linear ([in, out]: HF Conv1D, ONNX MatMul)
    swaps the first two axes.
    """
    if len(shape) < 2:
        return (shape[0] if shape else 1), (shape[0] if shape else 1), 0
    receptive = math.prod(shape[2:])
    if transposed:
        return shape[0] * receptive, shape[1] * receptive, 1
    unit_axis = 1 if kind.startswith("conv_transpose") else 0
    return shape[1] * receptive, shape[0] * receptive, unit_axis


# ---------------------------------------------------------------- building

@dataclass
class ModuleInfo:
    """What a live module (or TorchScript archive) says about one layer."""

    kind: str
    module_type: str
    transposed: bool = False
    norm_folded: bool = False  # an exporter folded a BatchNorm into this layer's weights (ONNX), not on a shortcut
    gain_offset: bool | None = None  # a norm that scales by (1 + weight) (Gemma); None: not known


def split_key(key: str) -> tuple[str, str]:
    """'features.0.weight' -> ('features.0', 'weight'); a bare 'cls_token' is its own layer."""
    return tuple(key.rsplit(".", 1)) if "." in key else (key, key)


def _kind_from_tensors(name: str, suffixes: dict[str, tuple[int, ...]]) -> str:
    """Guess a layer's kind from its tensor names and shapes alone (bare state_dicts)."""
    if any(_RECURRENT_KEY.match(s) for s in suffixes):
        return "recurrent"
    if "in_proj_weight" in suffixes:
        return "attention"
    if "running_mean" in suffixes:
        return "norm"
    weight = suffixes.get("weight")
    if weight is None:
        return "parameter"
    if len(weight) == 1:
        return "norm"
    if len(weight) == 2:  # an embedding's name, unless it has a bias (MobileBERT's embedding_transformation)
        return "embedding" if embedding_name(name) and "bias" not in suffixes else "linear"
    if len(weight) in (3, 4, 5):
        return f"conv{len(weight) - 2}d"
    return "parameter"


def _params_of(kind: str, prefix: str, suffixes: dict[str, tuple[int, ...]], transposed: bool) -> list[Param]:
    params = []
    hidden = None
    if kind == "recurrent":
        hh = next((shape for s, shape in suffixes.items() if s.startswith("weight_hh")), None)
        hidden = hh[1] if hh else None
    for suffix, shape in suffixes.items():
        key = prefix if suffix == prefix else f"{prefix}.{suffix}"
        if kind == OPTIMIZER_STATE:
            role = OPTIMIZER_STATE
        elif suffix in _BUFFER_KEYS:
            role = "buffer"
        elif kind == "norm":
            role = "norm_weight" if suffix == "weight" else "norm_bias" if suffix == "bias" else "parameter"
        elif kind in WEIGHTED_KINDS | {"embedding"} and len(shape) >= 2 and "weight" in suffix:
            role = "weight"
        elif kind in WEIGHTED_KINDS and "bias" in suffix and len(shape) == 1:
            role = "bias"
        else:
            role = "parameter"
        fan_in, fan_out, axis = fans(kind, shape, transposed) if role == "weight" else (0, 0, 0)
        params.append(Param(key, role, tuple(shape), fan_in, fan_out, axis,
                            hidden if kind == "recurrent" else None))
    return params


def group_layers(shapes: dict[str, tuple[int, ...]], modules: dict[str, ModuleInfo] | None = None) -> list[Layer]:
    """Group tensors into layers by name prefix, in file order; kinds from `modules` where known, else
    from names and shapes (`_kind_from_tensors`, `_bare_layouts`)."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        prefix, suffix = split_key(key)
        groups.setdefault(prefix, {})[suffix] = tuple(shape)
    bare = {prefix: _kind_from_tensors(prefix, suffixes) for prefix, suffixes in groups.items()
            if prefix not in (modules or {})}
    flipped = _bare_layouts(bare, groups)
    layers = []
    for prefix, suffixes in groups.items():
        info = (modules or {}).get(prefix)
        kind = info.kind if info else bare[prefix]
        transposed = bool(info and info.transposed) or (kind == "linear" and prefix in flipped)
        if kind.startswith("conv") and prefix in flipped:
            kind = kind.replace("conv", "conv_transpose")
        layers.append(Layer(prefix, kind, _params_of(kind, prefix, suffixes, transposed),
                            module_type=info.module_type if info else None, norm_folded=bool(info and info.norm_folded),
                            gain_offset=info.gain_offset if info else None))
    return layers


def _bare_layouts(kinds: dict[str, str], groups: dict[str, dict[str, tuple[int, ...]]]) -> set[str]:
    """Layers of a bare file whose weight holds its output units on axis 1, as the bias tells: a bias is as
    long as the output. A linear whose bias matches the second axis is stored [in, out] (HF's Conv1D), a
    conv whose bias is not its first axis is a transposed conv ([in, out/groups, *k]). A square linear
    follows its sibling linears (the same parent module), else the file's other linears, where they agree."""
    told: dict[str, bool] = {}
    square: list[str] = []
    for prefix, kind in kinds.items():
        weight, bias = groups[prefix].get("weight"), groups[prefix].get("bias")
        if weight is None or bias is None or len(bias) != 1 or len(weight) < 2:
            continue
        if kind.startswith("conv") and bias[0] != weight[0] and bias[0] % weight[1] == 0:
            told[prefix] = True
        elif kind == "linear" and weight[0] == weight[1]:
            square.append(prefix)
        elif kind == "linear" and bias[0] in weight:
            told[prefix] = bias[0] == weight[1]
    linears = {p: t for p, t in told.items() if kinds[p] == "linear"}
    for prefix in square:
        parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        siblings = {t for p, t in linears.items() if (p.rsplit(".", 1)[0] if "." in p else "") == parent}
        votes = siblings or set(linears.values())
        told[prefix] = votes == {True}
    return {prefix for prefix, flipped in told.items() if flipped}


def order_flow(layers: list[Layer], outputs: set[str] | frozenset = frozenset(), tied_head: str | None = None) -> Flow:
    """A chain flow in this order, for bare state_dicts: layers and norms, no activations seen; the
    output layers, side by side, end it (or the token embedding, where it is the tied head)."""
    flow, prev = Flow(), None
    for layer in layers:
        if layer.name in outputs:
            continue
        role = LAYER if layer.weighted else NORM if layer.kind == "norm" else PASS
        node = flow.add(role, layer.name if role in (LAYER, NORM) else None)
        if prev is not None:
            flow.link(prev, node)
        prev = node
    out = flow.add(OUTPUT)
    heads = [layer.name for layer in layers if layer.name in outputs] or ([tied_head] if tied_head else [])
    ends = [flow.add(LAYER, name) for name in heads] or [out]
    for end in ends:
        if prev is not None:
            flow.link(prev, end)
        if end != out:
            flow.link(end, out)
    return flow


def context(layers: list[Layer], flow: Flow | None, names_sorted: bool) -> tuple[dict[str, Downstream], dict]:
    """What follows each layer, the forward order and (with a flow) the runs along its paths: from the flow
    (where it saw no functional calls, two layers in a row say nothing of the activation between them); for
    bare files (no flow) from the file's order, or, where its names were sorted (safetensors), from names and
    shapes (`key_order`)."""
    if flow is not None:
        order = list(dict.fromkeys(node.layer for node in flow.nodes if node.role == LAYER and node.layer))
        downstream = flow.downstream(unknown_between_layers=not flow.sees_activations)
        runs = flow.run_lengths({name for name, found in downstream.items() if found.gate_after})
        return downstream, {"order": order, "runs": runs}
    if not names_sorted:
        return order_flow(layers).downstream(unknown_between_layers=True), {}
    bare = key_order.arrange(layers)
    downstream = order_flow(bare.layers, bare.outputs, bare.tied_head).downstream(unknown_between_layers=True)
    return downstream, {"order": [layer.name for layer in bare.layers],
                        "outputs": bare.outputs if bare.outputs or bare.tied_head else None,
                        "uncertain": bare.uncertain}


def annotate(layers: list[Layer], downstream: dict[str, Downstream],
             default: Activation | None = None, overrides: dict[str, Activation] | None = None,
             order: list[str] | None = None, outputs: set[str] | None = None,
             uncertain: set[str] | None = None, hints: dict[str, Activation] | None = None,
             runs: dict[str, int] | None = None) -> LayerGraph:
    """Attach activations, norms, positions and run depths; `hints` (layer name -> activation its name
    suggests) then `default` fill what the flow leaves unknown; user overrides (glob patterns) win.
    Run depths are `runs` (along the flow's paths) where given, else runs of the forward order.

    Positions and runs follow `order` (forward order, by layer name), else the layers' own order; a
    layer `order` lacks (the flow never saw it) comes after the others, a run of its own. The output
    layers are `outputs` where given (an empty set: none, the head being a tied embedding), else the
    last layer when it is linear; `uncertain` layers get `order_known` False.
    """
    weighted = [layer for layer in layers if layer.weighted]
    unseen: list[Layer] = []
    if order:
        rank = {name: i for i, name in enumerate(order)}
        unseen = [layer for layer in weighted if layer.name not in rank]
        weighted = sorted((layer for layer in weighted if layer.name in rank), key=lambda layer: rank[layer.name])
    for i, layer in enumerate(weighted + unseen):
        found = downstream.get(layer.name)
        layer.position = i
        layer.order_known = layer.name not in (uncertain or ())
        if found is not None:
            layer.activation, layer.norm_after, layer.residual_after = found.activation, found.norm_after, found.residual_after
            layer.gate_after, layer.residual_branch = found.gate_after, found.residual_branch
        if layer.kind == "recurrent":
            layer.activation = Activation("tanh")  # gates are sigmoid/tanh inside the cell
        layer.is_output = (layer.name in outputs if outputs is not None else
                           layer.activation == IDENTITY and i == len(weighted) - 1)
        if layer.activation == UNKNOWN:
            layer.activation = (hints or {}).get(layer.name) or default or UNKNOWN
        for pattern, act in (overrides or {}).items():
            if fnmatch.fnmatchcase(layer.name, pattern):
                layer.activation = act
    for layer in layers:
        if layer.kind == "norm" and layer.name in downstream:  # the flow names the norm: does it join a residual sum?
            layer.residual_branch, layer.in_flow = downstream[layer.name].residual_branch, True
    if runs is not None:
        for layer in weighted + unseen:
            layer.run_depth = runs.get(layer.name, 1)
    else:
        _assign_runs(weighted)
        for layer in unseen:
            layer.run_depth = 1
    return LayerGraph(layers)


def _assign_runs(weighted: list[Layer]) -> None:
    """Split the ordered weighted layers of a bare file (no flow: `Flow.run_lengths` does it along a flow's
    paths) into runs that end at a normalization (the signal there no longer compounds layer by layer);
    each layer knows its run's length."""
    for layer, length in zip(weighted, run_lengths([layer.norm_after for layer in weighted])):
        layer.run_depth = length
