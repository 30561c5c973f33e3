"""Normalizations an exporter spells out in elementwise ops, read back as the norms they are.

The torch exporter has no op for a norm module written by hand (LLaMA's and T5's RMSNorm, Gemma's) and writes
its arithmetic: x·1/√(mean(x²) + ε) as Pow (or Mul of x by x), ReduceMean, Add, Sqrt, Div (or Reciprocal) and
Mul; a LayerNorm spelled out squares x − mean(x) and divides by the root. The product of the normalized tensor
by a per-channel tensor of the file is the norm's gain (x·(1 + w), Gemma's convention, where that tensor is
added to 1 first); a sum with one after it is the norm's shift.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from initaudit.flow.onnx_scopes import GraphIndex

# Ops between the mean of squares and the product (or quotient) that normalizes: + ε, √, 1/·, casts.
_ROOT_STEPS = frozenset({"Add", "Sqrt", "Div", "Reciprocal", "Cast", "Pow"})


@dataclass(frozen=True)
class SpelledNorm:
    """One normalization spelled out in the nodes of a graph."""

    nodes: frozenset[int]     # the nodes computing the normalized tensor (and the gain's 1 + w)
    gain: int | None          # the node multiplying it by the gain: the norm's layer (None: a norm with no gain)
    weight: str | None        # the gain's tensor, as that node reads it
    bias: str | None          # the shift's tensor, as the sum after the gain reads it
    one_plus: bool            # the gain is applied as (1 + weight)
    centred: bool             # x − mean(x) is squared: a LayerNorm, else an RMSNorm


def spelled_norms(g: GraphIndex, value: Callable[[str], np.ndarray]) -> list[SpelledNorm]:
    """The normalizations spelled out in elementwise ops among the nodes of `g`; `value` reads a small tensor."""
    found = []
    for i, node in enumerate(g.nodes):
        squared = _squared(g, node.input[0], value) if node.op_type == "ReduceMean" and node.input else None
        if squared is None:
            continue
        roots = _same_values(g, squared)
        closing = _normalizing(g, node.output[0], roots)
        if closing is not None:
            found.append(_with_gain(g, closing, _between(g, closing, roots), _centred(g, squared), value))
    return found


def _squared(g: GraphIndex, name: str, value: Callable[[str], np.ndarray]) -> str | None:
    """The tensor whose square `name` is (Pow by a constant 2, or a Mul of a tensor by itself)."""
    p = g.producer.get(name)
    node = g.nodes[p] if p is not None else None
    if node is None or len(node.input) != 2:
        return None
    if node.op_type == "Mul" and node.input[0] == node.input[1]:
        return node.input[0]
    return node.input[0] if node.op_type == "Pow" and _one_value(g, node.input[1], value) == 2.0 else None


def _same_values(g: GraphIndex, name: str) -> set[str]:
    """`name` and the tensor a Cast made it from (T5 squares x cast to float32, and normalizes x)."""
    p = g.producer.get(name)
    return {name, g.nodes[p].input[0]} if p is not None and g.nodes[p].op_type == "Cast" else {name}


def _centred(g: GraphIndex, name: str) -> bool:
    """The squared tensor is x − mean(x)."""
    p = g.producer.get(name)
    if p is None or g.nodes[p].op_type != "Sub":
        return False
    q = g.producer.get(g.nodes[p].input[1])
    return q is not None and g.nodes[q].op_type == "ReduceMean"


def _normalizing(g: GraphIndex, mean: str, roots: set[str], hops: int = 5) -> int | None:
    """The node that multiplies a root by what the mean of squares becomes (1/√(mean + ε)), or divides a root by
    it, reached through steps each taking one computed input (the others constants)."""
    queue = deque([(mean, 0)])
    while queue:
        name, depth = queue.popleft()
        for j in g.consumers.get(name, []):
            node = g.nodes[j]
            others = [n for n in node.input if n != name]
            if node.op_type == "Mul" and any(n in roots for n in others):
                return j
            if node.op_type == "Div" and node.input[1] == name and node.input[0] in roots:
                return j
            if node.op_type in _ROOT_STEPS and depth < hops and all(g.source(n) is not None for n in others):
                queue.append((node.output[0], depth + 1))
    return None


def _between(g: GraphIndex, closing: int, roots: set[str], hops: int = 10) -> set[int]:
    """The nodes on the paths from the roots to the closing node (constants left out)."""
    return g.upstream(closing, lambda name, _: name not in roots and g.source(name) is None, hops)


def _with_gain(g: GraphIndex, closing: int, region: set[int], centred: bool,
               value: Callable[[str], np.ndarray]) -> SpelledNorm:
    """The norm closing at node `closing`, with the gain (and shift) its only consumers apply, where they do."""
    out = g.nodes[closing].output[0]
    users = g.consumers.get(out, [])
    if len(users) == 1 and g.nodes[users[0]].op_type == "Cast":
        region = region | {users[0]}
        out = g.nodes[users[0]].output[0]
        users = g.consumers.get(out, [])
    gain = users[0] if len(users) == 1 and g.nodes[users[0]].op_type == "Mul" else None
    factor = next((n for n in g.nodes[gain].input if n != out), None) if gain is not None else None
    weight, offset = _gain_tensor(g, factor, value) if factor else (None, None)
    if weight is None:
        return SpelledNorm(frozenset(region), None, None, None, False, centred)
    return SpelledNorm(frozenset(region | ({offset} if offset is not None else set())), gain, weight,
                       _shift(g, g.nodes[gain].output[0]), offset is not None, centred)


def _gain_tensor(g: GraphIndex, name: str, value: Callable[[str], np.ndarray]) -> tuple[str | None, int | None]:
    """The per-channel tensor a gain factor is (its name), and the node adding 1 to it where the factor is 1 + w."""
    if _per_channel(g, name):
        return name, None
    p = g.producer.get(name)
    node = g.nodes[p] if p is not None else None
    if node is None or node.op_type != "Add" or len(node.input) != 2:
        return None, None
    tensors = [n for n in node.input if _per_channel(g, n)]
    ones = [n for n in node.input if _one_value(g, n, value) == 1.0]
    return (tensors[0], p) if len(tensors) == 1 and len(ones) == 1 else (None, None)


def _per_channel(g: GraphIndex, name: str) -> bool:
    """A float tensor of the file with more than one value (a gain or shift, not a constant)."""
    src = g.float_source(name)
    return src is not None and int(np.prod(g.dims(src))) > 1


def _one_value(g: GraphIndex, name: str, value: Callable[[str], np.ndarray]) -> float | None:
    """The value of a one-value tensor of the file (a constant); None for anything else."""
    src = g.float_source(name)
    if src is None or int(np.prod(g.dims(src))) != 1:
        return None
    return float(np.asarray(value(src)).reshape(-1)[0])


def _shift(g: GraphIndex, gained: str) -> str | None:
    """The per-channel tensor the only consumer of the gain's product adds, if it is a sum with one."""
    users = g.consumers.get(gained, [])
    if len(users) != 1 or g.nodes[users[0]].op_type != "Add":
        return None
    return next((n for n in g.nodes[users[0]].input if n != gained and _per_channel(g, n)), None)
