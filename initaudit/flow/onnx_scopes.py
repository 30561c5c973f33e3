"""ONNX graphs and their subgraphs: the scope tree, model-wide tensor keys, and who makes and reads each tensor.

Subgraphs (`If` branches, `Loop` and `Scan` bodies, any graph attribute) are scopes of their own: names
they take from enclosing graphs resolve there, and an `Identity` (or `Cast`) of a weight is that weight: the
torch exporter keeps one of several identical initializers and makes the others `Identity` nodes named as the
parameters they stand for, so each layer keeps its own name (`ModuleNames`).
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import onnx

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})
# Names exporters give the constants they make (initial states, shapes, folded values), not parameters.
EXPORTER_CONSTANT = re.compile(r"^(onnx::|/)|^val_\d+$")
# Ops whose output is their input's values in the input's layout: an initializer read through one is that initializer.
ALIASING_OPS = frozenset({"Identity", "Cast"})
# Node names exporters make up: the legacy exporter's scope paths, the dynamo exporter's node_<op>.
_EXPORTER_NODE = re.compile(r"^(/|node_)")


@dataclass
class Scope:
    """One graph of a model (the main graph or a subgraph) and the model-wide keys of the tensors it holds."""

    graph: onnx.GraphProto
    keys: dict[str, str] = field(default_factory=dict)                  # local tensor name -> model-wide key
    children: dict[int, list[Scope]] = field(default_factory=dict)      # node index -> its subgraphs

    def tensors(self) -> Iterator[tuple[str, onnx.TensorProto, str]]:
        """(key, proto, the name a user sees) of every initializer and Constant-node tensor of this graph."""
        for name, proto, shown in _local_tensors(self.graph):
            yield self.keys[name], proto, shown


def _local_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto, str]]:
    """(name the graph uses, proto, name a user sees) of the graph's initializers and Constant tensors."""
    for t in graph.initializer:
        yield t.name, t, t.name
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    yield node.output[0], a.t, _constant_name(node)


def _constant_name(node: onnx.NodeProto) -> str:
    """A Constant's output name, or its node name where the output name is one an exporter made up."""
    out = node.output[0]
    if EXPORTER_CONSTANT.match(out) and node.name and not _EXPORTER_NODE.match(node.name):
        return node.name
    return out


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds as attributes (Loop/Scan bodies, If branches: then before else)."""
    found = []
    for a in sorted(node.attribute, key=lambda a: a.name != "then_branch"):
        if a.type == onnx.AttributeProto.GRAPH:
            found.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            found.extend(a.graphs)
    return found


def scopes(graph: onnx.GraphProto) -> Scope:
    """The scope tree of a model's graph, each tensor keyed by its name, made unique (`w#2`) across subgraphs."""
    taken: set[str] = set()

    def visit(g: onnx.GraphProto) -> Scope:
        scope = Scope(g)
        for name, _, _ in _local_tensors(g):
            key, n = name, 1
            while key in taken:
                n += 1
                key = f"{name}#{n}"
            taken.add(key)
            scope.keys[name] = key
        for i, node in enumerate(g.node):
            subs = subgraphs(node)
            if subs:
                scope.children[i] = [visit(sub) for sub in subs]
        return scope

    return visit(graph)


def walk(scope: Scope) -> Iterator[Scope]:
    """A scope and every scope inside it, depth first in node order."""
    yield scope
    for subs in scope.children.values():
        for sub in subs:
            yield from walk(sub)


class GraphIndex:
    """Producers and consumers of the tensors of one ONNX graph; names it does not define resolve in its parent."""

    def __init__(self, scope: Scope, sources: dict[str, onnx.TensorProto], parent: GraphIndex | None = None):
        self.scope = scope
        self.nodes = list(scope.graph.node)
        self.sources = sources
        self.parent = parent
        self.alias: dict[str, str] = {}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.defined = {i.name for i in scope.graph.input}
        for i, node in enumerate(self.nodes):
            if node.op_type in ALIASING_OPS and self.source(node.input[0]) is not None:
                self.alias[node.output[0]] = self.source(node.input[0])
            for name in node.output:
                self.producer[name] = i
            for name in node.input:
                self.consumers.setdefault(name, []).append(i)
        self.defined |= set(self.producer)
        self.children = {i: [GraphIndex(sub, sources, self) for sub in subs] for i, subs in scope.children.items()}

    def source(self, name: str) -> str | None:
        """The initializer (or Constant) key a tensor name stands for, through Identity aliases and outer scopes."""
        if name in self.alias:
            return self.alias[name]
        if name in self.scope.keys:
            return self.scope.keys[name]
        if name in self.producer or name in self.defined or self.parent is None:
            return None  # a value computed here (or a graph input) shadows the outer scopes
        return self.parent.source(name)

    def alias_name(self, name: str) -> str | None:
        """The parameter name an aliasing node gave an initializer (`layer2.weight` for an `Identity` of
        `layer1.weight`), None where the name is the initializer's own or one the exporter made up."""
        return name if name in self.alias and not EXPORTER_CONSTANT.match(name) else None

    def float_source(self, name: str, rank: int | None = None) -> str | None:
        src = self.source(name) if name else None
        if src is None or self.sources[src].data_type not in FLOAT_TYPES:
            return None
        return src if rank is None or len(self.sources[src].dims) == rank else None

    def dims(self, name: str) -> tuple[int, ...]:
        return tuple(self.sources[name].dims)

    def upstream(self, closing: int, follow: Callable[[str, int], bool], hops: int) -> set[int]:
        """The nodes from node `closing` back up its inputs, within `hops`, through each input `name` produced by
        a node `p` for which `follow(name, p)` holds."""
        region, queue = set(), deque([(closing, 0)])
        while queue:
            j, depth = queue.popleft()
            if j in region:
                continue
            region.add(j)
            for name in self.nodes[j].input:
                p = self.producer.get(name)
                if p is not None and depth < hops and follow(name, p):
                    queue.append((p, depth + 1))
        return region


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of a node's attribute, `default` where the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


WHOLE, FUSED, LEGACY = "whole", "fused", "legacy"


def scope_of(node: onnx.NodeProto) -> tuple[str | None, str]:
    """The module path the exporter recorded for a node, if any, and what it is: the whole path (WHOLE, the
    dynamo exporter's), the path of a BatchNorm that exporter fused into the node (FUSED), or the legacy
    exporter's (LEGACY), which leaves out modules whose `forward` was not called."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if len(scopes) >= 3 and scopes[-2]:
                return str(scopes[-2]), FUSED if fused_norm(node) else WHOLE
    # The legacy exporter: "/layer3/layer3.0/conv1/Conv", "/features/features.1/conv/conv.0/Conv": a part is
    # a name within the parent, a container's child named after the container ("conv.0" under "conv").
    parts = node.name.strip("/").split("/")[:-1] if node.name.startswith("/") else []
    path = ""
    for part in filter(None, parts):
        segments = path.split(".") if path else []
        shared = next((k for k in range(len(segments)) if part.startswith(".".join(segments[k:]) + ".")), None)
        path = ".".join([*segments[:shared], part]) if shared is not None else f"{path}.{part}" if path else part
    return path or None, LEGACY


def fused_norm(node: onnx.NodeProto) -> bool:
    """The dynamo exporter's rewriter fused a BatchNorm into this node."""
    rules = next((p.value for p in node.metadata_props if p.key == "pkg.onnxscript.rewriter.rule_name"), "")
    return "BatchNorm" in rules


class ModuleNames:
    """Layer names as PyTorch names the modules, from the parameter names a graph holds and its nodes' scopes.

    A weight's own name wins (`layer1.0.conv1.weight` → `layer1.0.conv1`), unless the dynamo exporter's scope,
    a whole module path, says another module reads it: that exporter shares identical initializers without
    `Identity` nodes (every LayerNorm reading `h.0.ln_1.weight`), and names a tied table after its last user.
    A weight the exporter named (a folded `onnx::Conv_12`) takes its node's scope; the legacy exporter's scope
    leaves out modules whose `forward` was not called (`h.0.attn` for `transformer.h.0.attn`), put back where
    the graph's parameter names hold one module path that ends so.
    """

    def __init__(self, parameter_names: Iterable[str]):
        self.known: set[str] = set()
        self.fused_first: dict[str, str] = {}  # weight -> the norm scope of the first fused node reading it
        for name in parameter_names:
            if not EXPORTER_CONSTANT.match(name):
                parts = name.split(".")[:-1]
                self.known.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))

    def layer(self, node: onnx.NodeProto, weight: str) -> str:
        """The name of the layer `node` computes, `weight` being the name its weight is read by."""
        scope, recorded = scope_of(node)
        own = weight.rsplit(".", 1)[0] if "." in weight and not EXPORTER_CONSTANT.match(weight) else None
        if own is not None and recorded == FUSED:
            return self.moved(own, weight, scope)
        if own is not None and (recorded != WHOLE or own == scope or own.startswith(f"{scope}.")):
            return own
        if scope is not None:
            return scope if recorded == WHOLE else self.completed(scope)
        return own or node.name or weight

    def scope(self, node: onnx.NodeProto) -> str | None:
        """The module path of the node's own scope (the legacy exporter's completed), if it has one."""
        scope, recorded = scope_of(node)
        return scope if scope is None or recorded != LEGACY else self.completed(scope)

    @staticmethod
    def folded_norm(node: onnx.NodeProto) -> str | None:
        """The module path of the BatchNorm the dynamo exporter fused into the node (the legacy one keeps none)."""
        scope, recorded = scope_of(node)
        return scope if recorded == FUSED else None

    def moved(self, own: str, weight: str, norm: str) -> str:
        """The layer a fused node computes, `norm` the scope of the BatchNorm fused into it: its weight's module,
        moved to the block that norm sits in where a node of another block read the same (identical) weight
        first (`layer1.0.conv1` read under `layer1.1.bn1`, the first reader under `layer1.0.bn1`: `layer1.1.conv1`)."""
        first = self.fused_first.setdefault(weight, norm).split(".")
        parts, here = own.split("."), norm.split(".")
        shared = next((k for k, (a, b) in enumerate(zip(parts, first)) if a != b), min(len(parts), len(first)))
        tail = first[shared:]
        if first == here or not tail or len(here) <= len(tail) or here[-len(tail):] != tail:
            return own
        return ".".join(here[:-len(tail)] + parts[shared:])

    def completed(self, scope: str) -> str:
        """A legacy scope path with the modules it leaves out put back, where one known module path ends in it."""
        segments = scope.split(".")
        for k in range(len(segments), 0, -1):
            head = ".".join(segments[:k])
            if head in self.known:
                return scope
            found = [path for path in self.known if path.endswith(f".{head}")]
            if found:
                return ".".join([found[0], *segments[k:]]) if len(found) == 1 else scope
        return scope
