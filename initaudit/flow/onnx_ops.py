"""What each ONNX operator means to the audit, as tables of small handlers keyed by op type.

- `LAYER_OPS`: ops whose initializer inputs are a layer's parameters (Gemm, MatMul, Conv, LSTM, Gather,
  norms...): each handler names the layer, its kind and the views of its tensors.
- `FLOW_ROLES`: the role an op plays in the data flow (activation, norm, sum, product, softmax); any
  other op passes the signal on.
- `SUBGRAPH_OPS`: how If, Loop and Scan pass values into their subgraphs and take their outputs back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from initaudit.flow.activations import Activation
from initaudit.flow.dataflow import ACT, ADD, MUL, NORM, PASS, SCALE, STOP, Flow, scale_factor
from initaudit.flow.layers import ModuleInfo, embedding_name, split_key
from initaudit.flow.onnx_norms import SpelledNorm, spelled_norms
from initaudit.flow.onnx_scopes import EXPORTER_CONSTANT, FLOAT_TYPES, GraphIndex, ModuleNames, attribute, fused_norm

SHAPE_ONLY = frozenset({"Shape", "Size"})  # read a tensor's shape, not its values: no signal flows through
_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
             "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "LpNormalization"}


@dataclass(frozen=True)
class View:
    """Where one audited tensor lives: an initializer (or Constant) and an index into it; a quantized weight
    names its scale and zero point (and the axis a per-axis scale runs along): it is read as (x − zp)·scale."""

    source: str
    index: tuple = ()
    scale: str | None = None
    zero_point: str | None = None
    axis: int = 0
    shape: tuple[int, ...] | None = None  # read reshaped to this (an Einsum weight of rank > 2, as [out, in])

    def reads(self) -> list[str]:
        """Every source tensor this view is computed from."""
        return [s for s in (self.source, self.scale, self.zero_point) if s is not None]


@dataclass
class OnnxLayers:
    """What `onnx_graph.analyse` finds in a model: the audited tensors, the layers and the flow between them."""

    views: dict[str, View] = field(default_factory=dict)        # audited key -> where it lives
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    flow: Flow = field(default_factory=Flow)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)        # layer -> its node's output value (main graph)


# ---------------------------------------------------------------- layers

@dataclass
class FoundLayers:
    """The layers found so far in a model's graphs, and which node became which layer."""

    root: GraphIndex
    shown: dict[str, str]                                             # tensor key -> the name a user sees
    names: ModuleNames
    out: OnnxLayers = field(default_factory=OnnxLayers)
    layer_of: dict[tuple[GraphIndex, int], str] = field(default_factory=dict)
    folded: set[tuple[GraphIndex, int]] = field(default_factory=set)  # Conv nodes with a BatchNorm folded in
    norm_of: dict[tuple[GraphIndex, int], str] = field(default_factory=dict)  # norm nodes' layer names
    spelled: set[tuple[GraphIndex, int]] = field(default_factory=set)  # nodes of norms spelled out in elementwise ops
    taken: dict[str, str] = field(default_factory=dict)               # layer name -> the weight that claimed it
    lookups: dict[str, bool] = field(default_factory=dict)            # layer name -> claimed by a Gather
    recurrent_count: dict[str, int] = field(default_factory=dict)     # layer name -> its recurrent nodes so far

    def seen(self, g: GraphIndex, read: str) -> str:
        """The name a user knows the tensor a node reads as `read` by: the parameter an alias stands for, else
        the initializer's own."""
        return g.alias_name(read) or self.shown[g.source(read)]

    def claim(self, g: GraphIndex, node: onnx.NodeProto, read: str, shown: str | None = None) -> str:
        """A layer name for the node whose weight it reads as `read` (a user knows it as `shown`, by default its
        own name), made unique (`name#2`) against other weights."""
        weight, lookup = g.source(read), node.op_type == "Gather"
        name = self.names.layer(node, shown or self.seen(g, read))
        if self.lookups.get(name, lookup) != lookup:  # a table tied to a head: each layer under its own module
            name = self.names.scope(node) or name
        base, n = name, 1
        while self.taken.get(name, weight) != weight or self.lookups.get(name, lookup) != lookup:
            n += 1
            name = f"{base}#{n}"
        self.taken[name], self.lookups[name] = weight, lookup
        return name

    def add_layer(self, g: GraphIndex, i: int, node: onnx.NodeProto, weight: str | View, module: ModuleInfo,
                  read: str | None = None, shown: str | None = None) -> str:
        """Node i of g becomes the layer `module` whose weight is `weight`, read as `read` (default: the node's
        second input) and known as `shown`; returns the layer's name."""
        name = self.claim(g, node, read or node.input[1], shown)
        self.layer_of[g, i] = name
        if g is self.root:
            self.out.outputs.setdefault(name, node.output[0])
        self.out.modules[name] = module
        self.add_view(f"{name}.weight", weight)
        return name

    def add_view(self, key: str, source: str | View | None) -> None:
        """Audit `source` (if any) as `key`, unless another tensor already has that key."""
        if source is not None:
            self.out.views.setdefault(key, source if isinstance(source, View) else View(source))


LayerHandler = Callable[[FoundLayers, GraphIndex, int, onnx.NodeProto], None]


def find_layers(root: GraphIndex, shown: dict[str, str], names: ModuleNames,
                value: Callable[[str], np.ndarray]) -> FoundLayers:
    """The layers of a graph and its subgraphs, each node handled by its op's entry in `LAYER_OPS`, and the norms
    spelled out in elementwise ops; `value` reads a small tensor."""
    found = FoundLayers(root, shown, names)

    def visit(g: GraphIndex) -> None:
        for norm in spelled_norms(g, value):
            _spelled_norm_layer(found, g, norm)
        for i, node in enumerate(g.nodes):
            handler = LAYER_OPS.get(node.op_type)
            if handler is not None:
                handler(found, g, i, node)
            for sub in g.children.get(i, ()):
                visit(sub)

    visit(root)
    return found


def _bias_input(g: GraphIndex, node: onnx.NodeProto) -> View | None:
    """The bias of Gemm or a convolution: its third input, a 1-d float (or dequantized) initializer."""
    return weight_view(g, node.input[2], rank=1) if len(node.input) > 2 else None


def _added_bias(g: GraphIndex, value: str, width: int) -> str | None:
    """The bias of a MatMul (or a dynamically quantized layer): a [width] initializer that the one Add taking
    `value` adds (reshaped, for a convolution's)."""
    users = g.consumers.get(value, [])
    if len(users) != 1 or g.nodes[users[0]].op_type != "Add":
        return None
    for name in g.nodes[users[0]].input:
        p = g.producer.get(name)
        if p is not None and g.nodes[p].op_type == "Reshape":
            name = g.nodes[p].input[0]
        src = g.float_source(name, rank=1)
        if src is not None and g.dims(src) == (width,):
            return src
    return None


def _linear_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """Gemm or MatMul by a 2-d weight (float, or dequantized by a DequantizeLinear): a linear layer (MatMul's
    weight, and Gemm's without transB, is [in, out])."""
    read, flipped = _untransposed(g, node.input[1]) if len(node.input) > 1 else (None, False)
    weight = weight_view(g, read) if read else None
    if weight is None or len(g.dims(weight.source)) != 2:
        return
    matmul = node.op_type == "MatMul"
    transposed = (matmul or not attribute(node, "transB", 0)) != flipped
    name = found.add_layer(g, i, node, weight, ModuleInfo("linear", node.op_type, transposed), _read_name(g, read))
    width = g.dims(weight.source)[1 if transposed else 0]
    found.add_view(f"{name}.bias", _added_bias(g, node.output[0], width) if matmul else _bias_input(g, node))


def weight_view(g: GraphIndex, name: str, rank: int | None = None) -> View | None:
    """The float initializer tensor `name` stands for, or the integer one a DequantizeLinear makes it from (a QDQ
    model's weight, read as (x − zero_point)·scale, per tensor or per axis)."""
    src = g.float_source(name, rank)
    if src is not None:
        return View(src)
    p = g.producer.get(name)
    node = g.nodes[p] if p is not None else None
    if node is None or node.op_type != "DequantizeLinear" or attribute(node, "block_size", 0):
        return None
    weight = g.source(node.input[0])
    if weight is None or (rank is not None and len(g.dims(weight)) != rank):
        return None
    zero_point = g.source(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return dequantized(g, weight, g.float_source(node.input[1]), zero_point, int(attribute(node, "axis", 1)))


def dequantized(g: GraphIndex, weight: str, scale: str | None, zero_point: str | None, axis: int) -> View | None:
    """The view of integer tensor `weight` dequantized by `scale` and `zero_point` (one value, or one per entry
    along `axis`); None where the scale is missing or of another shape."""
    dims = g.dims(weight)
    if g.sources[weight].data_type in FLOAT_TYPES or scale is None or not dims:
        return None
    axis %= len(dims)
    if math.prod(g.dims(scale)) not in (1, dims[axis]):
        return None
    return View(weight, scale=scale, zero_point=zero_point, axis=axis)


def _read_name(g: GraphIndex, read: str) -> str:
    """The name a layer's weight is read by: a DequantizeLinear's output stands for the initializer it reads."""
    p = g.producer.get(read)
    if g.source(read) is None and p is not None and g.nodes[p].op_type == "DequantizeLinear":
        return g.nodes[p].input[0]
    return read


def _integer_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """MatMulInteger or ConvInteger by an integer weight initializer (onnxruntime's dynamic quantization): a linear
    or conv layer whose weight is read dequantized by the op's weight zero point and the weight scale that the
    graph multiplies the integer result by."""
    weight = g.source(node.input[1]) if len(node.input) > 1 else None
    scale, rescaled = _rescale(g, node)
    if weight is None or len(g.dims(weight)) < 2:
        return
    zero_point = g.source(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    matmul = node.op_type == "MatMulInteger"
    view = dequantized(g, weight, scale, zero_point, 1 if matmul else 0)
    if view is None or (matmul and len(g.dims(weight)) != 2):
        return
    if matmul:
        name = found.add_layer(g, i, node, view, ModuleInfo("linear", node.op_type, True))
    else:
        name = found.add_layer(g, i, node, view, _conv_module(node, g.dims(weight), False, None))
    found.add_view(f"{name}.bias", _added_bias(g, rescaled, g.dims(weight)[1 if matmul else 0]))


def _rescale(g: GraphIndex, node: onnx.NodeProto) -> tuple[str | None, str]:
    """The weight scale an integer op's result is multiplied by (through a Cast, a Mul by the input's scale times
    the weight's, an initializer), and the value that Mul makes (the op's output where there is none)."""
    value = node.output[0]
    users = g.consumers.get(value, [])
    if len(users) == 1 and g.nodes[users[0]].op_type == "Cast":
        value = g.nodes[users[0]].output[0]
        users = g.consumers.get(value, [])
    if len(users) != 1 or g.nodes[users[0]].op_type != "Mul":
        return None, node.output[0]
    mul = g.nodes[users[0]]
    factor = next((n for n in mul.input if n != value), "")
    p = g.producer.get(factor)
    operands = [factor] if p is None else [n for n in g.nodes[p].input] if g.nodes[p].op_type == "Mul" else []
    scales = [src for src in (g.float_source(n) for n in operands) if src is not None]
    return (scales[0] if len(scales) == 1 else None), mul.output[0]


def _einsum_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """Einsum of a computed tensor by one weight initializer (a projection: 'bsd,hd->bsh', 'bsd,dhk->bshk'): a
    linear layer, fan_in the weight's summed dims, fan_out those it keeps; a weight of rank > 2 is read as
    [out, in] (or [in, out])."""
    views = [weight_view(g, name) for name in node.input]
    parts = _einsum_terms(attribute(node, "equation", b""))
    if parts is None or len(views) != 2 or sum(v is not None for v in views) != 1:
        return
    k = 0 if views[0] is not None else 1
    weight, letters, other, result = views[k], parts[k], parts[1 - k], parts[2]
    dims = g.dims(weight.source)
    kept = "".join(c for c in letters if c in result and c not in other)
    summed = "".join(c for c in letters if c in other and c not in result)
    if len(dims) != len(letters) or not kept or not summed or letters not in (kept + summed, summed + kept):
        return
    size = dict(zip(letters, dims))
    fans = (math.prod(size[c] for c in kept), math.prod(size[c] for c in summed))  # (out, in)
    transposed = letters.startswith(summed)
    shape = None if len(dims) == 2 else fans[::-1] if transposed else fans
    read = _read_name(g, node.input[k])
    own = found.seen(g, read)
    shown = None if own.endswith(".weight") or EXPORTER_CONSTANT.match(own) else f"{own}.weight"
    name = found.add_layer(g, i, node, replace(weight, shape=shape), ModuleInfo("linear", node.op_type, transposed),
                           read, shown)  # a bare parameter (`attn.q`) is a layer of its own
    found.add_view(f"{name}.bias", _added_bias(g, node.output[0], fans[0]))


def _einsum_terms(equation: bytes | str) -> tuple[str, str, str] | None:
    """An explicit two-operand Einsum equation's (first, second, result) letters; None for any other."""
    text = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    terms, arrow, result = text.partition("->")
    operands = terms.split(",")
    if not arrow or len(operands) != 2 or "." in text or any(len(set(t)) != len(t) for t in (*operands, result)):
        return None
    return operands[0], operands[1], result


def _untransposed(g: GraphIndex, name: str) -> tuple[str, bool]:
    """The tensor a 2-d `Transpose` of an initializer reads (a head tied to a token table: MatMul by its
    transpose), and whether one was undone; else `name` itself."""
    p = g.producer.get(name)
    node = g.nodes[p] if p is not None else None
    if node is None or node.op_type != "Transpose" or g.float_source(node.input[0], rank=2) is None:
        return name, False
    return (node.input[0], True) if list(attribute(node, "perm", [1, 0])) == [1, 0] else (name, False)


def _conv_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """Conv or ConvTranspose: a convolution of the weight's rank (a Conv may hold a BatchNorm the exporter folded)."""
    weight = weight_view(g, node.input[1]) if len(node.input) > 1 else None
    if weight is None or len(g.dims(weight.source)) < 2:
        return
    folded = node.op_type == "Conv" and _bn_folded(node, weight.source)
    norm = found.names.folded_norm(node) if folded else None
    name = found.add_layer(g, i, node, weight, _conv_module(node, g.dims(weight.source), folded, norm),
                           _read_name(g, node.input[1]))
    found.add_view(f"{name}.bias", _bias_input(g, node))
    if folded:
        found.folded.add((g, i))


def _conv_module(node: onnx.NodeProto, dims: tuple[int, ...], folded: bool, norm: str | None) -> ModuleInfo:
    """The module of a convolution node whose weight has `dims` (a transposed one for ConvTranspose)."""
    spatial = len(dims) - 2
    kind = f"conv_transpose{spatial}d" if node.op_type == "ConvTranspose" else f"conv{spatial}d"
    return ModuleInfo(kind, node.op_type, False, norm_folded=folded, folded_norm=norm,
                      strides=tuple(attribute(node, "strides", ())), groups=int(attribute(node, "group", 1)))


def _bn_folded(node: onnx.NodeProto, weight: str) -> bool:
    """The exporter fused a BatchNorm into this Conv (legacy exporter: renamed weight; dynamo: says so)."""
    return fused_norm(node) or weight.startswith("onnx::Conv")


def _recurrent_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """LSTM, GRU or RNN: per direction, the input and hidden weights and the two halves of the bias, named as
    PyTorch names them (`weight_ih_l0`, `bias_hh_l1_reverse`...)."""
    w = g.float_source(node.input[1], rank=3)
    r = g.float_source(node.input[2], rank=3) if len(node.input) > 2 else None
    if w is None:
        return
    name = found.names.layer(node, found.seen(g, node.input[1]))  # stacked layers share one scope: lstm.weight_ih_l0, _l1...
    found.layer_of[g, i] = name
    k = found.recurrent_count.get(name, 0)
    found.recurrent_count[name] = k + 1
    found.out.modules[name] = ModuleInfo("recurrent", node.op_type)
    b = g.float_source(node.input[3], rank=2) if len(node.input) > 3 else None
    size = g.dims(w)[1]
    views = found.out.views
    for d in range(g.dims(w)[0]):
        sfx = f"_l{k}" + ("_reverse" if d else "")
        views[f"{name}.weight_ih{sfx}"] = View(w, (d,))
        if r is not None:
            views[f"{name}.weight_hh{sfx}"] = View(r, (d,))
        if b is not None:
            views[f"{name}.bias_ih{sfx}"] = View(b, (d, slice(0, size)))
            views[f"{name}.bias_hh{sfx}"] = View(b, (d, slice(size, 2 * size)))


def _gather_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """Gather from a 2-d float table: an embedding looked up by the model's input, or a free parameter."""
    table = g.float_source(node.input[0], rank=2)
    if table is None:
        return
    name = found.claim(g, node, node.input[0])
    # indices fixed in the file (relative-position bias tables, LeViT's attention biases) read the table at set
    # places: a free parameter, as in PyTorch, not a lookup of the model's input; a table named as an embedding
    # (BERT's position_embeddings at its position_ids) stays one
    fixed = len(node.input) > 1 and g.source(node.input[1]) is not None and not embedding_name(name)
    found.out.modules[name] = ModuleInfo("parameter" if fixed else "embedding", node.op_type)
    own = found.seen(g, node.input[0])
    found.add_view(own if fixed and split_key(own)[0] == name else f"{name}.weight", table)


def _norm_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """A normalization: its scale, shift and (BatchNorm) running statistics."""
    _parameter_layer(found, g, i, node, "norm", ("weight", "bias", "running_mean", "running_var"))


def _spelled_norm_layer(found: FoundLayers, g: GraphIndex, norm: SpelledNorm) -> None:
    """A norm spelled out in elementwise ops: its nodes normalize; the product by its gain is its layer."""
    found.spelled.update((g, j) for j in norm.nodes)
    if norm.gain is None:
        return
    found.spelled.add((g, norm.gain))
    name = found.claim(g, g.nodes[norm.gain], norm.weight)
    found.out.modules[name] = ModuleInfo("norm", "LayerNorm" if norm.centred else "RMSNorm",
                                         gain_offset=norm.one_plus)
    found.norm_of[g, norm.gain] = name
    found.add_view(f"{name}.weight", g.float_source(norm.weight))
    found.add_view(f"{name}.bias", g.float_source(norm.bias) if norm.bias else None)


def _prelu_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
    """PRelu: its learned negative slope."""
    _parameter_layer(found, g, i, node, "parameter", ("weight",))


def _parameter_layer(found: FoundLayers, g: GraphIndex, i: int, node: onnx.NodeProto, kind: str,
                     roles: tuple[str, ...]) -> None:
    """A layer of `kind` whose inputs after the first are its parameters, in the order of `roles`."""
    params = [g.float_source(n) for n in node.input[1:]]
    if not params or params[0] is None:
        return
    name = found.claim(g, node, node.input[1])
    found.out.modules[name] = ModuleInfo(kind, node.op_type)
    if kind == "norm":
        found.norm_of[g, i] = name
    for role, src in zip(roles, params):
        found.add_view(f"{name}.{role}", src)


LAYER_OPS: dict[str, LayerHandler] = {
    "Gemm": _linear_layer, "MatMul": _linear_layer, "Conv": _conv_layer, "ConvTranspose": _conv_layer,
    "MatMulInteger": _integer_layer, "ConvInteger": _integer_layer, "Einsum": _einsum_layer,
    "LSTM": _recurrent_layer, "GRU": _recurrent_layer, "RNN": _recurrent_layer, "Gather": _gather_layer,
    "PRelu": _prelu_layer, **dict.fromkeys(_NORM_OPS, _norm_layer),
}


# ---------------------------------------------------------------- roles in the flow

Role = tuple[str, Activation | None]
RoleHandler = Callable[[GraphIndex, onnx.NodeProto, Callable[[str], np.ndarray]], Role]

_ACT_OPS = {"Relu": "relu", "Elu": "elu", "Celu": "celu", "Selu": "selu", "Sigmoid": "sigmoid",
            "HardSigmoid": "hardsigmoid", "HardSwish": "hardswish", "Tanh": "tanh", "Gelu": "gelu", "FastGelu": "gelu",
            "BiasGelu": "gelu", "QuickGelu": "gelu", "Softplus": "softplus", "Softsign": "softsign", "Mish": "mish",
            "ThresholdedRelu": "relu", "Erf": "unknown", "Sin": "sin", "Cos": "cos"}  # Erf outside GELU: unmodelled


def flow_role(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
    """The node's role in the flow and, for an activation, which; `value` reads a (small) source tensor."""
    handler = FLOW_ROLES.get(node.op_type)
    return handler(g, node, value) if handler is not None else (PASS, None)


def _plain(role: str) -> RoleHandler:
    """The handler of ops whose role is all there is to say of them."""
    def handler(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
        return role, None
    return handler


def _activation(name: str) -> RoleHandler:
    """The handler of an op that is the activation `name`."""
    def handler(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
        return ACT, Activation(name)
    return handler


def _leaky_relu(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
    return ACT, Activation("leaky_relu", float(attribute(node, "alpha", 0.01)))


def _prelu(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
    """PRelu's slope is its mean learned one (0.25, PyTorch's initial value, where the slope is computed)."""
    src = g.float_source(node.input[1])
    return ACT, Activation("prelu", float(np.mean(value(src))) if src else 0.25)


def _clip(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
    """Clip from 0 is ReLU (ReLU6 up to 6), between two bounds hardtanh; the bounds are inputs or (old opsets)
    attributes."""
    def bound(pos: int, attr: str) -> float | None:
        if len(node.input) > pos and node.input[pos]:
            src = g.source(node.input[pos])
            return float(value(src)) if src else None
        found = attribute(node, attr)
        return float(found) if found is not None else None

    low, high = bound(1, "min"), bound(2, "max")
    if low == 0 and high == 6:
        return ACT, Activation("relu6")
    if low == 0:
        return ACT, Activation("relu")
    if low is not None and high is not None:
        return ACT, Activation("hardtanh")
    return PASS, None


def constant_factor(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> float | None:
    """The constant a Mul or Div of one computed tensor by a one-element initializer or Constant multiplies it by
    (the exporter's `x * 30`, `leaky_relu(x) * √2`); None for anything else."""
    if len(node.input) != 2:
        return None
    sources = [g.float_source(name) for name in node.input]
    constants = [float(np.asarray(value(src)).reshape(-1)[0]) if src and math.prod(g.dims(src)) == 1 else None
                 for src in sources]
    if any(src is not None and c is None for src, c in zip(sources, constants)):
        return None  # a product by a tensor held in the file (LayerScale's γ): no constant scale
    return scale_factor(node.op_type, constants)


def parameter_moment(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> float | None:
    """E[p²] of the initializer a Mul of one computed tensor by it multiplies by (an exported parameter: ReZero's
    α, LayerScale's γ); None for anything else (a Constant node's number, a product of two computed tensors)."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    held = [src for src in map(g.float_source, node.input) if src is not None]
    if len(held) != 1 or not _is_initializer(g, held[0]):
        return None
    found = np.asarray(value(held[0]), dtype=np.float64)
    return float(np.mean(np.square(found))) if found.size else None


def _is_initializer(g: GraphIndex | None, key: str) -> bool:
    """Whether a tensor key is an initializer of `g` or a graph around it (not a Constant node's output)."""
    while g is not None:
        if any(g.scope.keys.get(i.name) == key for i in g.scope.graph.initializer):
            return True
        g = g.parent
    return False


def _product(role: str) -> RoleHandler:
    """Mul or Div: a constant scale where one operand is a one-element constant, else `role`."""
    def handler(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
        return (SCALE, None) if constant_factor(g, node, value) is not None else (role, None)
    return handler


def signal_outputs(node: onnx.NodeProto) -> int:
    """How many of a node's first outputs carry the signal: DynamicQuantizeLinear's scale and zero point do not."""
    return 1 if node.op_type == "DynamicQuantizeLinear" else len(node.output)


def _quantize(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> Role:
    """QuantizeLinear whose zero point is its integer type's least value clips at 0: the ReLU a QDQ quantizer
    folded into it."""
    src = g.source(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    zero = np.asarray(value(src)) if src is not None else None
    if zero is not None and zero.dtype.kind in "iu" and zero.size and np.all(zero == np.iinfo(zero.dtype).min):
        return ACT, Activation("relu")
    return PASS, None


FLOW_ROLES: dict[str, RoleHandler] = {
    **{op: _activation(name) for op, name in _ACT_OPS.items()},
    "LeakyRelu": _leaky_relu, "PRelu": _prelu, "Clip": _clip,
    **dict.fromkeys(("Softmax", "LogSoftmax", "Hardmax"), _plain(STOP)),
    **dict.fromkeys(_NORM_OPS, _plain(NORM)),
    "Add": _plain(ADD), "Sum": _plain(ADD), "Mul": _product(MUL), "Div": _product(PASS), "QuantizeLinear": _quantize,
}


# ---------------------------------------------------------------- subgraphs

@dataclass(frozen=True)
class SubgraphContract:
    """How a control-flow op feeds its subgraphs and where their outputs go.

    `first_feed`: the node's first input passed to the body's inputs, in order (None: none is);
    `returns(node, k, ins, outs)`: the flow nodes the body's k-th output reaches, given the flow nodes of the
    body's inputs and of the node's outputs (None: not known).
    """

    first_feed: int | None
    returns: Callable[[onnx.NodeProto, int, list[int], list[int]], list[int] | None]

    def feeds(self, node: onnx.NodeProto, n_body_inputs: int) -> list[tuple[int, str]]:
        """(body input index, outer tensor name) pairs the node passes into its body."""
        if self.first_feed is None:
            return []
        return [(k, node.input[k]) for k in range(self.first_feed, min(len(node.input), n_body_inputs))]


def _if_returns(node: onnx.NodeProto, k: int, ins: list[int], outs: list[int]) -> list[int] | None:
    """A branch's k-th output is the If's k-th."""
    return [outs[k]] if k < len(outs) else None


def _loop_returns(node: onnx.NodeProto, k: int, ins: list[int], outs: list[int]) -> list[int] | None:
    """Body (cond, carried..., scan outputs...) -> node (carried..., scan outputs...); carried state is also the
    next iteration's input. The condition steers and carries no signal."""
    if k == 0:
        return []
    carried = len(node.input) - 2
    targets = [outs[k - 1]] if k - 1 < len(outs) else []
    if k <= carried and k + 1 < len(ins):
        targets.append(ins[k + 1])
    return targets or None


def _scan_returns(node: onnx.NodeProto, k: int, ins: list[int], outs: list[int]) -> list[int] | None:
    """Body (state..., scan outputs...) -> node: the same; the state also feeds the next step."""
    state = len(node.input) - int(attribute(node, "num_scan_inputs", 0))
    targets = [outs[k]] if k < len(outs) else []
    if k < state and k < len(ins):
        targets.append(ins[k])
    return targets or None


# Loop's first two inputs (trip count, condition) steer, they carry no signal.
SUBGRAPH_OPS: dict[str, SubgraphContract] = {
    "If": SubgraphContract(None, _if_returns),
    "Loop": SubgraphContract(2, _loop_returns),
    "Scan": SubgraphContract(0, _scan_returns),
}
