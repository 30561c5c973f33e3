"""ONNX graphs → layers and data flow: which initializer is whose weight, fan conventions, activations.

Layers are named as the user knows them: the initializer's name prefix (`features.0.weight` →
`features.0`), else the exporter's scope (`/layer3/layer3.0/conv1/Conv` → `layer3.0.conv1`, or the
dynamo exporter's `pkg.torch.onnx.name_scopes`). Exporters spell some activations out in
elementwise ops (x·sigmoid(x), the Erf GELU, the tanh GELU, x·tanh(softplus(x))): those patterns
become one activation node of the flow.

Subgraphs (`If` branches, `Loop` and `Scan` bodies, any graph attribute) are walked like the main
graph: their weights are audited, names they take from enclosing graphs resolve there, and their
outputs flow on to the consumers of the control-flow node's outputs. What each operator means is
in the tables of `onnx_ops`; the graphs themselves in `onnx_scopes`.
"""

from __future__ import annotations

from collections import ChainMap, deque
from typing import Callable

import numpy as np
import onnx

from initaudit.flow.activations import UNKNOWN, Activation
from initaudit.flow.dataflow import ACT, LAYER, MUL, NORM, OUTPUT, PASS, SCALE, Flow
from initaudit.flow.onnx_ops import (SHAPE_ONLY, SUBGRAPH_OPS, FoundLayers, OnnxLayers, SubgraphContract, View,
                                     constant_factor, find_layers, flow_role, parameter_moment, signal_outputs)
from initaudit.flow.onnx_scopes import (ALIASING_OPS, EXPORTER_CONSTANT, FLOAT_TYPES, GraphIndex, ModuleNames, scopes,
                                        walk)

_ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Pow", "Softplus", "Sqrt", "Identity", "Cast", "Constant"}
# Cores of the activations exporters decompose, closed by a Mul with the activation's input x.
_PATTERN_CORES = {"Sigmoid": "silu", "HardSigmoid": "hardswish", "Erf": "gelu", "Tanh": "gelu"}


def analyse(graph: onnx.GraphProto, sources: dict[str, onnx.TensorProto],
            value: Callable[[str], np.ndarray]) -> OnnxLayers:
    """Layers, tensor views and the flow of `graph` and its subgraphs; `value` reads a (small) source tensor.

    `sources` is keyed as `scopes` keys them (the main graph's tensors by their own names).
    """
    root = GraphIndex(scopes(graph), sources)
    shown = {key: name for scope in walk(root.scope) for key, _, name in scope.tensors()}
    found = find_layers(root, shown, ModuleNames([*shown.values(), *_alias_names(root)]), value)
    out = found.out
    _add_free_parameters(out, shown, sources)
    out.flow = _FlowBuilder(found, value).model(root)
    if found.folded:
        _note_folded(out, len(found.folded))
    return out


def _alias_names(g: GraphIndex) -> list[str]:
    """The parameter names aliasing nodes give initializers, in `g` and its subgraphs."""
    return [*g.alias, *(name for subs in g.children.values() for sub in subs for name in _alias_names(sub))]


def _add_free_parameters(out: OnnxLayers, shown: dict[str, str], sources: dict[str, onnx.TensorProto]) -> None:
    """Float tensors no layer took (cls tokens, position tables...) are audited under their own names."""
    used = {name for v in out.views.values() for name in v.reads()}
    for key, name in shown.items():
        proto = sources[key]
        if (key not in used and not EXPORTER_CONSTANT.match(name) and name not in out.views
                and proto.data_type in FLOAT_TYPES and np.prod(proto.dims) > 1):
            out.views[name] = View(key)


def _note_folded(out: OnnxLayers, count: int) -> None:
    """Say BatchNorm was folded into `count` convolutions."""
    out.notes.append(f"the exporter folded BatchNorm into {count} convolution(s); "
                     "they are audited as normalized layers")


# ---------------------------------------------------------------- flow

class _FlowBuilder:
    """The flow of a graph and its subgraphs: per ONNX node a layer, an activation spelled out in elementwise ops
    or the role its op plays, linked along the tensors; subgraph values flow on to their node's outputs."""

    def __init__(self, found: FoundLayers, value: Callable[[str], np.ndarray]):
        self.flow = Flow()
        self.layer_of, self.folded, self.value = found.layer_of, found.folded, value
        self.norm_of, self.spelled = found.norm_of, found.spelled
        self.unknown: int | None = None
        self.quantization: set[str] = set()  # values that are quantization scales and zero points, not signal

    def unknown_node(self) -> int:
        """The one "activation unknown" node, made when a subgraph's outputs lead nowhere known."""
        if self.unknown is None:
            self.unknown = self.flow.add(ACT, activation=UNKNOWN)
        return self.unknown

    def model(self, root: GraphIndex) -> Flow:
        """The flow of the main graph `root`, its outputs linked to the flow's output node."""
        inputs = [i.name for i in root.scope.graph.input if root.source(i.name) is None]  # not initializers
        made: ChainMap = ChainMap({name: self.flow.add(PASS) for name in inputs})  # the signal starts here too
        self.graph(root, made)
        out = self.flow.add(OUTPUT)
        for o in root.scope.graph.output:
            if o.name in made:
                self.flow.link(made[o.name], out)
        return self.flow.fold_gains()

    def graph(self, g: GraphIndex, made: ChainMap) -> None:
        """Add the nodes of `g`; `made` maps tensor names (of `g` and the graphs around it) to flow nodes."""
        patterns = _decomposed(g)
        for i, node in enumerate(g.nodes):
            if i in g.children:
                self.control(g, i, node, made)
            else:
                self.node(g, i, node, patterns.get(i), made)

    def node(self, g: GraphIndex, i: int, node: onnx.NodeProto, pattern: Activation | None, made: ChainMap) -> None:
        """Node i of g (`pattern`: the activation it is part of, if any) and the edges from its inputs."""
        rescale = any(name in self.quantization for name in node.input)
        if node.op_type in ALIASING_OPS and g.source(node.input[0]) is not None:
            return  # an initializer read through Identity is that initializer: no signal of its own
        if self.quantization_only(g, node):
            self.quantization.update(node.output)
            return
        if (g, i) in self.layer_of:
            idx = self.flow.add(LAYER, self.layer_of[g, i], moment=parameter_moment(g, node, self.value))
        elif (g, i) in self.spelled:  # a norm spelled out in elementwise ops (its gain's product: the norm's layer)
            idx = self.flow.add(NORM, self.norm_of.get((g, i)))
        elif pattern is not None:
            idx = self.flow.add(ACT, activation=pattern)
        elif rescale:  # a dynamically quantized layer's result times its scales: the signal goes on
            idx = self.flow.add(PASS)
        else:
            role, act = flow_role(g, node, self.value)
            factor = constant_factor(g, node, self.value) if role == SCALE else 1.0
            moment = parameter_moment(g, node, self.value) if role in (MUL, SCALE) else None
            idx = self.flow.add(role, self.norm_of.get((g, i)) if role == NORM else None, activation=act, factor=factor,
                                moment=moment)
        for name in node.input if node.op_type not in SHAPE_ONLY else ():
            if name in made:
                self.flow.link(made[name], idx)
        tail = idx
        if (g, i) in self.folded:
            tail = self.flow.add(NORM)
            self.flow.link(idx, tail)
        for k, name in enumerate(node.output):
            if k < signal_outputs(node):
                made[name] = tail
            else:
                self.quantization.add(name)

    def quantization_only(self, g: GraphIndex, node: onnx.NodeProto) -> bool:
        """The node computes quantization parameters or a weight from them and the file's tensors alone: a
        DequantizeLinear of an initializer, the product of an input's scale and a weight's."""
        inputs = [name for name in node.input if name]
        if node.op_type == "DequantizeLinear" and inputs and g.source(inputs[0]) is not None:
            return True
        return any(name in self.quantization for name in inputs) and all(
            name in self.quantization or g.source(name) is not None for name in inputs)

    def control(self, g: GraphIndex, i: int, node: onnx.NodeProto, made: ChainMap) -> None:
        """An If/Loop/Scan (or other graph-holding) node: its subgraphs' values flow on to its outputs."""
        outs = [self.flow.add(PASS) for _ in node.output]
        contract = SUBGRAPH_OPS.get(node.op_type)
        if contract is None:
            for name in node.input:
                if name in made:
                    self.flow.link(made[name], self.unknown_node())
        for sub in g.children[i]:
            self.subgraph(sub, node, contract, made, outs)
        for name, idx in zip(node.output, outs):
            made[name] = idx

    def subgraph(self, sub: GraphIndex, node: onnx.NodeProto, contract: SubgraphContract | None, made: ChainMap,
                 outs: list[int]) -> None:
        """One subgraph of `node`: fed from the values `contract` passes in, its outputs led where it says
        (to the unknown activation where no contract is known)."""
        inner = made.new_child()
        ins = [self.flow.add(PASS) for _ in sub.scope.graph.input]
        for value_info, idx in zip(sub.scope.graph.input, ins):
            inner[value_info.name] = idx
        for k, name in contract.feeds(node, len(ins)) if contract else ():
            if name in made:
                self.flow.link(made[name], ins[k])
        self.graph(sub, inner)
        for k, result in enumerate(sub.scope.graph.output):
            if result.name not in inner:
                continue
            targets = contract.returns(node, k, ins, outs) if contract else None
            for target in targets if targets is not None else [self.unknown_node()]:
                self.flow.link(inner[result.name], target)


# ---------------------------------------------------------------- activations spelled out in elementwise ops

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
    ops = _ELEMENTWISE | set(_PATTERN_CORES)
    return g.upstream(closing, lambda name, p: name != x and g.nodes[p].op_type in ops, hops)
