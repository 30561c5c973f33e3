"""ONNX graphs → layers and data flow: which initializer is whose weight, fan conventions, activations.

Layers are named as the user knows them: the initializer's name prefix (`features.0.weight` →
`features.0`), else the exporter's scope (`/layer3/layer3.0/conv1/Conv` → `layer3.0.conv1`, or the
dynamo exporter's `pkg.torch.onnx.name_scopes`). Exporters spell some activations out in
elementwise ops (x·sigmoid(x), the Erf GELU, the tanh GELU, x·tanh(softplus(x))): those patterns
become one activation node of the flow.

Subgraphs (`If` branches, `Loop` and `Scan` bodies, any graph attribute) are walked like the main
graph: their weights are audited, names they take from enclosing graphs resolve there, and their
outputs flow on to the consumers of the control-flow node's outputs. The graphs themselves, their
scopes and tensor keys, are in `onnx_scopes`.
"""

from __future__ import annotations

from collections import ChainMap, deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from initaudit.flow.activations import UNKNOWN, Activation
from initaudit.flow.dataflow import ACT, ADD, LAYER, MUL, NORM, OUTPUT, PASS, STOP, Flow
from initaudit.flow.layers import ModuleInfo, embedding_name, split_key
from initaudit.flow.onnx_scopes import (EXPORTER_CONSTANT, FLOAT_TYPES, GraphIndex, attribute, scope_of, scopes,
                                        walk)

_ACT_OPS = {"Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Elu": "elu", "Celu": "celu",
            "Selu": "selu", "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "HardSwish": "hardswish",
            "Tanh": "tanh", "Gelu": "gelu", "FastGelu": "gelu", "BiasGelu": "gelu", "QuickGelu": "gelu",
            "Softplus": "softplus", "Softsign": "softsign", "Mish": "mish", "ThresholdedRelu": "relu", "Erf": "gelu"}
_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
             "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "LpNormalization"}
_STOP_OPS = {"Softmax", "LogSoftmax", "Hardmax"}
_ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Pow", "Softplus", "Sqrt", "Identity", "Cast", "Constant"}
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # read a tensor's shape, not its values: no signal flows through
_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# Cores of the activations exporters decompose, closed by a Mul with the activation's input x.
_PATTERN_CORES = {"Sigmoid": "silu", "HardSigmoid": "hardswish", "Erf": "gelu", "Tanh": "gelu"}


@dataclass(frozen=True)
class View:
    """Where one audited tensor lives: an initializer (or Constant) and an index into it."""

    source: str
    index: tuple = ()


@dataclass
class OnnxLayers:
    views: dict[str, View] = field(default_factory=dict)        # audited key -> where it lives
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    flow: Flow = field(default_factory=Flow)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)        # layer -> its node's output value (main graph)


def _layer_name(node: onnx.NodeProto, weight: str) -> str:
    if not weight.startswith("onnx::") and "." in weight:
        return split_key(weight)[0]
    return scope_of(node) or node.name or weight


def analyse(graph: onnx.GraphProto, sources: dict[str, onnx.TensorProto],
            value: Callable[[str], np.ndarray]) -> OnnxLayers:
    """Layers, tensor views and the flow of `graph` and its subgraphs; `value` reads a (small) source tensor.

    `sources` is keyed as `scopes` keys them (the main graph's tensors by their own names).
    """
    root = GraphIndex(scopes(graph), sources)
    shown = {key: name for scope in walk(root.scope) for key, _, name in scope.tensors()}
    out = OnnxLayers()
    layer_of: dict[tuple[GraphIndex, int], str] = {}
    folded: set[tuple[GraphIndex, int]] = set()
    taken: dict[str, str] = {}  # layer name -> the weight source that claimed it

    def claim(node: onnx.NodeProto, weight: str) -> str:
        name = _layer_name(node, shown[weight])
        base, n = name, 1
        while taken.get(name, weight) != weight:
            n += 1
            name = f"{base}#{n}"
        taken[name] = weight
        return name

    recurrent_count: dict[str, int] = {}

    def visit(g: GraphIndex) -> None:
        for i, node in enumerate(g.nodes):
            layer(g, i, node)
            for sub in g.children.get(i, ()):
                visit(sub)

    def layer(g: GraphIndex, i: int, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
            weight = g.float_source(node.input[1]) if len(node.input) > 1 else None
            if weight is None or len(g.dims(weight)) < 2 or (op in ("Gemm", "MatMul") and len(g.dims(weight)) != 2):
                return
            name = claim(node, weight)
            layer_of[g, i] = name
            if g is root:
                out.outputs.setdefault(name, node.output[0])
            rank = len(g.dims(weight))
            if op == "Conv":
                kind, transposed = f"conv{rank - 2}d", False
            elif op == "ConvTranspose":
                kind, transposed = f"conv_transpose{rank - 2}d", False
            else:
                kind, transposed = "linear", op == "MatMul" or not attribute(node, "transB", 0)
            fused = op == "Conv" and _bn_folded(node, weight)
            out.modules[name] = ModuleInfo(kind, op, transposed, norm_folded=fused)
            out.views.setdefault(f"{name}.weight", View(weight))
            bias = _bias_of(g, i, node, g.dims(weight)[1 if transposed else 0] if kind == "linear" else None)
            if bias is not None:
                out.views.setdefault(f"{name}.bias", View(bias))
            if fused:
                folded.add((g, i))
        elif op in _RECURRENT_GATES:
            w = g.float_source(node.input[1], rank=3)
            r = g.float_source(node.input[2], rank=3) if len(node.input) > 2 else None
            if w is None:
                return
            name = _layer_name(node, shown[w])  # stacked layers share one scope: lstm.weight_ih_l0, _l1...
            layer_of[g, i] = name
            k = recurrent_count.get(name, 0)
            recurrent_count[name] = k + 1
            out.modules[name] = ModuleInfo("recurrent", op)
            b = g.float_source(node.input[3], rank=2) if len(node.input) > 3 else None
            size = g.dims(w)[1]
            for d in range(g.dims(w)[0]):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                out.views[f"{name}.weight_ih{sfx}"] = View(w, (d,))
                if r is not None:
                    out.views[f"{name}.weight_hh{sfx}"] = View(r, (d,))
                if b is not None:
                    out.views[f"{name}.bias_ih{sfx}"] = View(b, (d, slice(0, size)))
                    out.views[f"{name}.bias_hh{sfx}"] = View(b, (d, slice(size, 2 * size)))
        elif op == "Gather":
            table = g.float_source(node.input[0], rank=2)
            if table is not None:
                name = claim(node, table)
                # indices fixed in the file (relative-position bias tables, LeViT's attention biases) read the
                # table at set places: a free parameter, as in PyTorch, not a lookup of the model's input; a
                # table named as an embedding (BERT's position_embeddings at its position_ids) stays one
                fixed = len(node.input) > 1 and g.source(node.input[1]) is not None and not embedding_name(name)
                out.modules[name] = ModuleInfo("parameter" if fixed else "embedding", op)
                own = shown[table]
                key = own if fixed and split_key(own)[0] == name else f"{name}.weight"
                out.views.setdefault(key, View(table))
        elif op in _NORM_OPS or op == "PRelu":
            params = [g.float_source(n) for n in node.input[1:]]
            if not params or params[0] is None:
                return
            name = claim(node, params[0])
            roles = ("weight", "bias", "running_mean", "running_var") if op != "PRelu" else ("weight",)
            out.modules[name] = ModuleInfo("norm" if op != "PRelu" else "parameter", op)
            for role, src in zip(roles, params):
                if src is not None:
                    out.views.setdefault(f"{name}.{role}", View(src))

    visit(root)
    used = {v.source for v in out.views.values()}
    for key, name in shown.items():  # free parameters (cls tokens, position tables...) keep their names
        proto = sources[key]
        if (key not in used and not EXPORTER_CONSTANT.match(name) and name not in out.views
                and proto.data_type in FLOAT_TYPES and np.prod(proto.dims) > 1):
            out.views[name] = View(key)

    out.flow = _flow(root, layer_of, folded, value)
    if folded:
        for name in out.flow.shortcut_layers():  # a folded norm there closes no residual branch
            if out.modules[name].norm_folded:
                out.modules[name] = replace(out.modules[name], norm_folded=False)
        out.notes.append(f"the exporter folded BatchNorm into {len(folded)} convolution(s); "
                         "they are audited as normalized layers")
    return out


def _bias_of(g: GraphIndex, i: int, node: onnx.NodeProto, width: int | None) -> str | None:
    """The bias input of Gemm/Conv, or the Add right after a MatMul that adds a [out] initializer."""
    if node.op_type != "MatMul":
        return g.float_source(node.input[2], rank=1) if len(node.input) > 2 else None
    users = g.consumers.get(node.output[0], [])
    if len(users) != 1 or g.nodes[users[0]].op_type != "Add":
        return None
    for name in g.nodes[users[0]].input:
        src = g.float_source(name, rank=1)
        if src is not None and g.dims(src) == (width,):
            return src
    return None


def _bn_folded(node: onnx.NodeProto, weight: str) -> bool:
    """The exporter fused a BatchNorm into this Conv (legacy exporter: renamed weight; dynamo: says so)."""
    rewrites = next((p.value for p in node.metadata_props if p.key == "pkg.onnxscript.rewriter.rule_name"), "")
    return "BatchNorm" in rewrites or weight.startswith("onnx::Conv")


# ---------------------------------------------------------------- flow

def _flow(root: GraphIndex, layer_of: dict[tuple[GraphIndex, int], str], folded: set[tuple[GraphIndex, int]],
          value: Callable[[str], np.ndarray]) -> Flow:
    flow = Flow()
    unknown: list[int] = []  # the one "activation unknown" node, made when a subgraph's outputs lead nowhere known

    def unknown_node() -> int:
        if not unknown:
            unknown.append(flow.add(ACT, activation=UNKNOWN))
        return unknown[0]

    def build(g: GraphIndex, made: ChainMap) -> None:
        """Add the nodes of `g`; `made` maps tensor names (of `g` and the graphs around it) to flow nodes."""
        patterns = _decomposed(g)
        for i, node in enumerate(g.nodes):
            if i in g.children:
                control(g, i, node, made)
                continue
            if (g, i) in layer_of:
                idx = flow.add(LAYER, layer_of[g, i])
            elif i in patterns:
                idx = flow.add(ACT, activation=patterns[i])
            else:
                role, act = _role(g, node, value)
                idx = flow.add(role, activation=act)
            for name in node.input if node.op_type not in _SHAPE_ONLY else ():
                if name in made:
                    flow.link(made[name], idx)
            tail = idx
            if (g, i) in folded:
                tail = flow.add(NORM)
                flow.link(idx, tail)
            for name in node.output:
                made[name] = tail

    def control(g: GraphIndex, i: int, node: onnx.NodeProto, made: ChainMap) -> None:
        """An If/Loop/Scan (or other graph-holding) node: its subgraphs' values flow on to its outputs."""
        outs = [flow.add(PASS) for _ in node.output]
        if node.op_type not in _CONTROL_OPS:
            for name in node.input:
                if name in made:
                    flow.link(made[name], unknown_node())
        for sub in g.children[i]:
            inner = made.new_child()
            ins = [flow.add(PASS) for _ in sub.scope.graph.input]
            for value_info, idx in zip(sub.scope.graph.input, ins):
                inner[value_info.name] = idx
            for k, name in _feeds(node, len(ins)):
                if name in made:
                    flow.link(made[name], ins[k])
            build(sub, inner)
            for k, result in enumerate(sub.scope.graph.output):
                if result.name not in inner:
                    continue
                targets = _returns(node, k, ins, outs)
                for target in targets if targets is not None else [unknown_node()]:
                    flow.link(inner[result.name], target)
        for name, idx in zip(node.output, outs):
            made[name] = idx

    made: ChainMap = ChainMap()
    build(root, made)
    out = flow.add(OUTPUT)
    for o in root.scope.graph.output:
        if o.name in made:
            flow.link(made[o.name], out)
    return flow


_CONTROL_OPS = {"If", "Loop", "Scan"}


def _feeds(node: onnx.NodeProto, n_body_inputs: int) -> list[tuple[int, str]]:
    """(body input index, outer tensor name) pairs a Loop or Scan passes into its body."""
    first = {"Loop": 2, "Scan": 0}.get(node.op_type)  # Loop's trip count and condition steer, they carry no signal
    if first is None:
        return []
    return [(k, node.input[k]) for k in range(first, min(len(node.input), n_body_inputs))]


def _returns(node: onnx.NodeProto, k: int, ins: list[int], outs: list[int]) -> list[int] | None:
    """Flow nodes the subgraph's k-th output reaches: the node's outputs and, for carried state, the body's inputs.

    None where the op is not one whose subgraph contract is known (or the counts do not fit).
    """
    op = node.op_type
    if op == "If":
        targets = [outs[k]] if k < len(outs) else []
    elif op == "Loop":  # body: (cond, carried..., scan outputs...) -> node: (carried..., scan outputs...)
        if k == 0:
            return []
        carried = len(node.input) - 2
        targets = [outs[k - 1]] if k - 1 < len(outs) else []
        if k <= carried and k + 1 < len(ins):
            targets.append(ins[k + 1])
    elif op == "Scan":  # body: (state..., scan outputs...) -> node: the same; the state feeds the next step
        state = len(node.input) - int(attribute(node, "num_scan_inputs", 0))
        targets = [outs[k]] if k < len(outs) else []
        if k < state and k < len(ins):
            targets.append(ins[k])
    else:
        return None
    return targets or None


def _role(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> tuple[str, Activation | None]:
    op = node.op_type
    if op in _STOP_OPS:
        return STOP, None
    if op in _NORM_OPS:
        return NORM, None
    if op in ("Add", "Sum"):
        return ADD, None
    if op == "Mul":
        return MUL, None
    if op == "LeakyRelu":
        return ACT, Activation("leaky_relu", float(attribute(node, "alpha", 0.01)))
    if op == "PRelu":
        src = g.float_source(node.input[1])
        return ACT, Activation("prelu", float(np.mean(value(src))) if src else 0.25)
    if op == "Clip":
        return _clip(g, node, value)
    if op in _ACT_OPS:
        return ACT, Activation(_ACT_OPS[op])
    return PASS, None


def _clip(g: GraphIndex, node: onnx.NodeProto, value: Callable[[str], np.ndarray]) -> tuple[str, Activation | None]:
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


def _decomposed(g: GraphIndex) -> dict[int, Activation]:
    """Nodes that together spell an activation as elementwise ops, each mapped to that activation.

    A core (Sigmoid, HardSigmoid, Erf, Tanh) computed from x closes in a Mul by x (or by x·c):
    x·sigmoid(x) is SiLU, x·hardsigmoid(x) HardSwish, x·(1+erf(x/√2))/2 GELU, the tanh form
    GELU's approximation, x·tanh(softplus(x)) Mish. Every node on the paths from x to that Mul
    becomes the activation, so a walk from the layer meets it whichever branch it takes first.
    """
    found: dict[int, Activation] = {}
    for i, node in enumerate(g.nodes):
        if node.op_type not in _PATTERN_CORES or i in found:
            continue
        ancestors = _ancestors(g, i)
        closing = _closing_mul(g, i, ancestors)
        if closing is None:
            continue
        m, x = closing
        region = _region(g, m, x)
        name = _PATTERN_CORES[node.op_type]
        if node.op_type == "Tanh" and any(g.nodes[j].op_type == "Softplus" for j in region):
            name = "mish"
        for j in region:
            found[j] = Activation(name)
    return found


def _ancestors(g: GraphIndex, i: int, hops: int = 6) -> set[str]:
    """Tensor names the core is computed from, through elementwise ops only."""
    seen: set[str] = set()
    queue = deque((name, 0) for name in g.nodes[i].input)
    while queue:
        name, depth = queue.popleft()
        if name in seen or not name:
            continue
        seen.add(name)
        p = g.producer.get(name)
        if p is not None and depth < hops and g.nodes[p].op_type in _ELEMENTWISE:
            queue.extend((n, depth + 1) for n in g.nodes[p].input)
    return seen


def _closing_mul(g: GraphIndex, core: int, ancestors: set[str], hops: int = 3) -> tuple[int, str] | None:
    """The Mul downstream of the core that multiplies by one of its ancestors x (or x times a constant)."""
    queue = deque((j, 1) for j in g.consumers.get(g.nodes[core].output[0], []))
    while queue:
        j, depth = queue.popleft()
        node = g.nodes[j]
        if node.op_type == "Mul":
            for name in node.input:
                if name in ancestors and g.source(name) is None:
                    return j, name
                p = g.producer.get(name)
                if p is not None and g.nodes[p].op_type == "Mul":
                    x = [n for n in g.nodes[p].input if n in ancestors and g.source(n) is None]
                    if x and any(g.source(n) is not None or g.producer.get(n) is not None and
                                 g.nodes[g.producer[n]].op_type == "Constant" for n in g.nodes[p].input):
                        return j, x[0]
        if depth < hops and node.op_type in _ELEMENTWISE:
            queue.extend((k, depth + 1) for k in g.consumers.get(node.output[0], []))
    return None


def _region(g: GraphIndex, closing: int, x: str, hops: int = 8) -> set[int]:
    """The nodes on the paths from tensor x to the closing node."""
    region, queue = set(), deque([(closing, 0)])
    while queue:
        j, depth = queue.popleft()
        if j in region:
            continue
        region.add(j)
        for name in g.nodes[j].input:
            p = g.producer.get(name)
            if name != x and p is not None and depth < hops and g.nodes[p].op_type in _ELEMENTWISE | set(_PATTERN_CORES):
                queue.append((p, depth + 1))
    return region
