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


_NORM_NAME = re.compile(r"(^|[._])\w*(norm|ln)(_?\d+|_f)?$", re.I)  # ln_f, norm1, input_layernorm, post_ln
_RECURRENT_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
_EXPERT_PROJECTION = re.compile(r"^(?:(?:gate_up|gate|up|down)_proj|w[1-3])$")  # an `experts` module's stacked weights
_EXPERT_DOWN = re.compile(r"^(?:down_proj|w2)$")
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


# ---------------------------------------------------------------- parametrized weights

WEIGHT_NORM, SPECTRAL_NORM = "weight_norm", "spectral_norm"
# How torch stores a parametrized weight `{o}{n}` (o: its module's prefix, n: its name): the method, the stored
# tensors it is computed from, and the method's own state (not weights). torch.nn.utils.weight_norm and
# spectral_norm first, then their torch.nn.utils.parametrizations versions.
_LAYOUTS = (
    (WEIGHT_NORM, ("{o}{n}_g", "{o}{n}_v"), ()),
    (SPECTRAL_NORM, ("{o}{n}_orig",), ("{o}{n}_u", "{o}{n}_v")),
    (WEIGHT_NORM, ("{o}parametrizations.{n}.original0", "{o}parametrizations.{n}.original1"), ()),
    (SPECTRAL_NORM, ("{o}parametrizations.{n}.original",), ("{o}parametrizations.{n}.0._u", "{o}parametrizations.{n}.0._v")),
)
# Why a tensor of a layer is not audited, by its name's last part.
BUFFER_REASONS = {"running_mean": "normalization running statistics, not weights",
                  "running_var": "normalization running statistics, not weights",
                  "num_batches_tracked": "a batch counter, not weights"}
POWER_ITERATION_REASON = "spectral norm's power-iteration state, not weights"


@dataclass
class Parametrized:
    """A weight its module computes from stored tensors (`parts`) by `method`; `state`: the method's own tensors."""

    key: str
    method: str
    parts: tuple[str, ...]
    state: tuple[str, ...]


def _layout_pattern(template: str) -> re.Pattern:
    o, n = re.escape("{o}"), re.escape("{n}")
    return re.compile("^" + re.escape(template).replace(o, r"(?P<o>(?:.*\.)?)").replace(n, r"(?P<n>[^.]+)") + "$")


_LAYOUT_PATTERNS = [(_layout_pattern(parts[0]), method, parts, state) for method, parts, state in _LAYOUTS]


def parametrized_weights(keys) -> list[Parametrized]:
    """The parametrized weights among these tensor names (weight norm's g and v, spectral norm's original)."""
    keys = set(keys)
    found = []
    for key in sorted(keys):
        for pattern, method, parts, state in _LAYOUT_PATTERNS:
            match = pattern.match(key)
            names = [t.format(**match.groupdict()) for t in parts + state] if match else []
            if names and all(name in keys for name in names):
                found.append(Parametrized(f"{match['o']}{match['n']}", method, tuple(names[:len(parts)]),
                                          tuple(names[len(parts):])))
                break
    return found


def unparametrize(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], list[Parametrized]]:
    """`shapes` with each parametrized weight under the name its module reads (in place of its first stored
    part, with the last part's shape: weight norm's v, spectral norm's original) and its stored tensors gone."""
    found = parametrized_weights(shapes)
    first = {p.parts[0]: p for p in found}
    gone = {key for p in found for key in p.parts + p.state}
    out = {}
    for key, shape in shapes.items():
        if key in first:
            out[first[key].key] = tuple(shapes[first[key].parts[-1]])
        elif key not in gone:
            out[key] = shape
    return out, found


def attach_parametrizations(layers: list[Layer], found: list[Parametrized], shapes: dict[str, tuple[int, ...]]) -> None:
    """Name each parametrized weight's method and stored parts on its Param; its state joins the layer as buffers."""
    by_key = {p.key: p for p in found}
    for layer in layers:
        for param in list(layer.params):
            p = by_key.get(param.key)
            if p is not None:
                param.parametrization, param.parts = p.method, p.parts
                layer.params += [Param(key, "buffer", tuple(shapes[key]), parametrization=p.method) for key in p.state]


def not_audited_reason(param: Param) -> str | None:
    """Why a layer's tensor is not audited (buffers: running statistics, counters, power-iteration vectors)."""
    if param.role != "buffer":
        return None
    if param.parametrization == SPECTRAL_NORM:
        return POWER_ITERATION_REASON
    return BUFFER_REASONS.get(split_key(param.key)[1], "a buffer, not weights")


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


def transposed_flow_fans(shape: tuple[int, ...], strides: tuple[int, ...] = (), groups: int = 1) -> tuple[int, int]:
    """(forward, backward) fans a transposed conv's signal sees, for its weight [in, out/groups, *k]: each output
    sums (in/groups)·k/stride inputs (torch's init counts dim 1, out·k, as fan_in instead). Going back, each input
    gathers (out/groups)·k gradients from stride times as many positions: counted per output position, as a
    strided conv's torch fan_out counts its gradient, that is (out/groups)·k/stride. A stride not given (a bare
    file) is taken as 1."""
    receptive = math.prod(shape[2:])
    step = max(math.prod(strides) if strides else 1, 1)
    return max(shape[0] // max(groups, 1) * receptive // step, 1), max(shape[1] * receptive // step, 1)


# ---------------------------------------------------------------- building

@dataclass
class ModuleInfo:
    """What a live module (or TorchScript archive) says about one layer."""

    kind: str
    module_type: str
    transposed: bool = False
    norm_folded: bool = False  # an exporter folded a BatchNorm into this layer's weights (ONNX)
    strides: tuple[int, ...] = ()  # a (transposed) conv's strides, where the module or graph says them
    groups: int = 1
    folded_norm: str | None = None  # that BatchNorm's module path, where the exporter recorded it
    tied_to: str | None = None  # the file key holding this layer's weight, tied to another layer's (saved once)
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
    if len(weight) == 1 or suffixes.get("bias") == weight or _NORM_NAME.search(name):
        return "norm"  # a norm over several dims (LayerNorm([1, 264])) holds a bias of its weight's own shape
    if len(weight) == 2:  # an embedding's name, unless it has a bias (MobileBERT's embedding_transformation)
        return "embedding" if embedding_name(name) and "bias" not in suffixes else "linear"
    if len(weight) in (3, 4, 5):
        return f"conv{len(weight) - 2}d"
    return "parameter"


def _params_of(kind: str, prefix: str, suffixes: dict[str, tuple[int, ...]], transposed: bool,
               info: ModuleInfo | None = None) -> list[Param]:
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
        flow_fans = None
        if role == "weight" and kind.startswith("conv_transpose"):
            flow_fans = transposed_flow_fans(shape, info.strides if info else (), info.groups if info else 1)
        params.append(Param(key, role, tuple(shape), fan_in, fan_out, axis,
                            hidden if kind == "recurrent" else None, flow_fans=flow_fans))
    return params


def group_layers(shapes: dict[str, tuple[int, ...]], modules: dict[str, ModuleInfo] | None = None) -> list[Layer]:
    """Group tensors into layers by name prefix, in file order; kinds from `modules` where known, else
    from names and shapes (`_kind_from_tensors`, `_bare_layouts`)."""
    stored = shapes  # the file's own names; grouped are parametrized weights under the name their module reads
    shapes, found = unparametrize(stored)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        prefix, suffix = split_key(key)
        groups.setdefault(prefix, {})[suffix] = tuple(shape)
    experts = _stacked_experts(groups)
    tied = {name: info for name, info in (modules or {}).items()
            if info.tied_to in shapes and name not in groups and info.kind in WEIGHTED_KINDS}
    bare = {prefix: _kind_from_tensors(prefix, suffixes) for prefix, suffixes in groups.items()
            if prefix not in (modules or {})}
    flipped = _bare_layouts(bare, groups)
    layers = []
    for prefix, suffixes in groups.items():
        if prefix in experts:
            layers += experts[prefix]
            if not suffixes:
                continue
        info = (modules or {}).get(prefix)
        kind = info.kind if info else bare[prefix]
        transposed = bool(info and info.transposed) or (kind == "linear" and prefix in flipped)
        if kind.startswith("conv") and prefix in flipped:
            kind = kind.replace("conv", "conv_transpose")
        layers.append(Layer(prefix, kind, _params_of(kind, prefix, suffixes, transposed, info),
                            module_type=info.module_type if info else None, norm_folded=bool(info and info.norm_folded),
                            folded_norm=info.folded_norm if info else None,
                            gain_offset=info.gain_offset if info else None))
    attach_parametrizations(layers, found, stored)
    return layers + [_tied_layer(name, info, shapes[info.tied_to]) for name, info in tied.items()]


def _stacked_experts(groups: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, list[Layer]]:
    """A mixture of experts' projections stored stacked, one 3-D tensor per projection of an `experts` module (as
    transformers writes Mixtral, Qwen3-MoE, GPT-OSS): each taken out of its module's group (which it edits) as a
    linear layer of its own, `experts.gate_up_proj`, judged at one expert's fans. The layout is [experts, out, in]
    (Mixtral, Qwen3-MoE) unless a bias [experts, out] or the up/down pair (their shared axis is the model's width)
    says [experts, in, out] (GPT-OSS)."""
    out: dict[str, list[Layer]] = {}
    for prefix, suffixes in groups.items():
        if prefix.rsplit(".", 1)[-1] != "experts":
            continue
        stacked = {k: v for k, v in suffixes.items() if len(v) == 3 and _EXPERT_PROJECTION.match(k)}
        down = next((v for k, v in stacked.items() if _EXPERT_DOWN.match(k)), None)
        up = next((v for k, v in stacked.items() if not _EXPERT_DOWN.match(k)), None)
        for name, shape in stacked.items():
            bias = suffixes.get(f"{name}_bias")
            if bias is not None and len(bias) == 2:
                in_out = shape[2] == bias[1] != shape[1]
            else:
                in_out = up is not None and down is not None and up[1] == down[2] and up[2] != down[1]
            fan_in, fan_out, axis = (shape[1], shape[2], 2) if in_out else (shape[2], shape[1], 1)
            params = [Param(f"{prefix}.{name}", "weight", shape, fan_in, fan_out, axis)]
            if bias is not None:
                params.append(Param(f"{prefix}.{name}_bias", "bias", bias))
                del suffixes[f"{name}_bias"]
            del suffixes[name]
            out.setdefault(prefix, []).append(Layer(f"{prefix}.{name}", "linear", params))
    return out


def _tied_layer(name: str, info: ModuleInfo, shape: tuple[int, ...]) -> Layer:
    """A layer whose weight the file holds under the name of the layer it is tied to (a head tied to its token
    table): judged as itself, at its own fans, reading that tensor."""
    fan_in, fan_out, axis = fans(info.kind, shape, info.transposed)
    return Layer(name, info.kind, [Param(info.tied_to, "weight", tuple(shape), fan_in, fan_out, axis)],
                 module_type=info.module_type)


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
        return downstream, {"order": order, "runs": runs, "norms": flow.norms_after()}
    if not names_sorted:
        outputs = key_order.file_outputs(layers)
        chained = order_flow(layers, outputs)
        return chained.downstream(unknown_between_layers=True), {
            "norms": chained.norms_after(), "outputs": outputs or None}
    bare = key_order.arrange(layers)
    chained = order_flow(bare.layers, bare.outputs, bare.tied_head)
    return chained.downstream(unknown_between_layers=True), {
        "order": [layer.name for layer in bare.layers], "norms": chained.norms_after(),
        "outputs": bare.outputs if bare.outputs or bare.tied_head else None, "uncertain": bare.uncertain}


def annotate(layers: list[Layer], downstream: dict[str, Downstream],
             default: Activation | None = None, overrides: dict[str, Activation] | None = None,
             order: list[str] | None = None, outputs: set[str] | None = None,
             uncertain: set[str] | None = None, hints: dict[str, Activation] | None = None,
             runs: dict[str, int] | None = None, norms: dict[str, str] | None = None) -> LayerGraph:
    """Attach activations, norms, positions and run depths; `hints` (layer name -> activation its name
    suggests) then `default` fill what the flow leaves unknown; user overrides (glob patterns) win.
    Run depths are `runs` (along the flow's paths) where given, else runs of the forward order.

    Positions and runs follow `order` (forward order, by layer name), else the layers' own order; a
    layer `order` lacks (the flow never saw it) comes after the others, a run of its own. `norms` names the norm
    right after a layer, where the flow names it. The output
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
        layer.norm = (norms or {}).get(layer.name)
        if found is not None:
            layer.activation, layer.norm_after, layer.residual_after = found.activation, found.norm_after, found.residual_after
            layer.gate_after, layer.residual_branch = found.gate_after, found.residual_branch
            layer.weight_scale = found.weight_scale
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
