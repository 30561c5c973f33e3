"""A format-neutral data-flow graph, and the forward walk that finds what follows each layer.

Front ends (torch.fx, TorchScript, ONNX, module order) turn their graphs into `FlowNode`s; one
walker then answers, for every weighted layer: which activation comes first downstream, and
whether a normalization sits between the layer and it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

from initaudit.flow.activations import IDENTITY, UNKNOWN, Activation

# Node roles.
LAYER = "layer"    # a weighted layer (Linear, Conv, Gemm...): `layer` names it
ACT = "act"        # a non-linearity: `activation` says which
NORM = "norm"      # BatchNorm/LayerNorm/GroupNorm/RMSNorm...
STOP = "stop"      # softmax and the like: the layer before it is linear (identity)
OUTPUT = "output"  # the graph's output
ADD = "add"        # an elementwise sum: with two computed inputs, a residual join
MUL = "mul"        # an elementwise product: with two computed inputs, where a gate scales a signal
PASS = "pass"      # anything that carries the signal on (reshape, dropout, pooling, matmul...)
SCALE = "scale"    # a product by a constant (not a learnable parameter): `factor` says which

MUL_NAMES = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "imul", "Mul"})
DIV_NAMES = frozenset({"div", "div_", "truediv", "__truediv__", "__itruediv__", "itruediv", "Div"})


def scale_factor(op: str, constants: list[float | None]) -> float | None:
    """The constant a product or quotient of one signal and one constant (x·c, c·x, x/c) multiplies the
    signal's RMS by, given each operand's constant value (None: a computed tensor, or a learnable parameter);
    None for anything else, and for a product by 0 (a switch, not a scale: ReZero's α, frozen in ONNX)."""
    if len(constants) != 2 or (constants[0] is None) == (constants[1] is None):
        return None
    if op in MUL_NAMES:
        c = constants[0] if constants[1] is None else constants[1]
    elif op in DIV_NAMES and constants[1] is not None:
        c = 1 / constants[1] if constants[1] else math.inf
    else:
        return None
    return abs(c) if c and math.isfinite(c) else None


@dataclass
class FlowNode:
    role: str
    layer: str | None = None
    activation: Activation | None = None
    users: list[int] = field(default_factory=list)
    factor: float = 1.0  # a SCALE node's constant
    moment: float | None = None  # a product by a learnable parameter (ReZero's α, LayerScale's γ): its E[p²]


@dataclass(frozen=True)
class Downstream:
    """What the walk found after one layer."""

    activation: Activation
    norm_after: bool
    residual_after: bool = False
    gate_after: bool = False  # the activation (sigmoid, tanh...) is a gate: its output scales another signal
    residual_branch: bool = False  # the output joins a residual sum as its branch, through any layers, before a norm
    weight_scale: float = 1.0  # the constants the output is multiplied by before the activation (SIREN's ω0)


class Flow:
    """Nodes plus edges; `add` returns an id, `link` adds an edge from producer to consumer."""

    def __init__(self, sees_activations: bool = True) -> None:
        self.nodes: list[FlowNode] = []
        self.sees_activations = sees_activations  # False: functional activations between layers went unseen

    def add(self, role: str, layer: str | None = None, activation: Activation | None = None,
            factor: float = 1.0, moment: float | None = None) -> int:
        self.nodes.append(FlowNode(role, layer, activation, factor=factor, moment=moment))
        return len(self.nodes) - 1

    def fold_gains(self) -> "Flow":
        """Fold each run of constant products right after an activation, where they are all its output goes
        to (StyleGAN's leaky_relu(x, 0.2)·√2), into the activation's `scale`; those products then pass the
        signal on (the activation carries them). Returns the flow."""
        for act in self.nodes:
            if act.role != ACT or act.activation is None:
                continue
            gain, node = 1.0, act
            while len(node.users) == 1 and self.nodes[node.users[0]].role == SCALE:
                node = self.nodes[node.users[0]]
                gain *= node.factor
                node.role = PASS
            if gain != 1.0:
                act.activation = replace(act.activation, scale=act.activation.scale * gain)
        return self

    def link(self, src: int, dst: int) -> None:
        if dst not in self.nodes[src].users:
            self.nodes[src].users.append(dst)

    def norms_after(self) -> dict[str, str]:
        """Per layer: the named normalization its output meets first, before any activation, layer, softmax or the
        output (the norm `norm_after` speaks of)."""
        found: dict[str, str] = {}
        for idx, node in enumerate(self.nodes):
            if node.role == LAYER and node.layer and node.layer not in found:
                reached = self._reach(idx, lambda n: n.role not in (ACT, LAYER, STOP, OUTPUT, NORM))
                norms = sorted(i for i in reached if self.nodes[i].role == NORM and self.nodes[i].layer)
                if norms:
                    found[node.layer] = self.nodes[norms[0]].layer
        return found

    def next_layers(self) -> dict[str, frozenset[str] | None]:
        """Per layer: the weighted layers its output reaches first, through no other layer (None where it reaches
        the output that way: its output is the model's, or part of it)."""
        found: dict[str, frozenset[str] | None] = {}
        for idx, node in enumerate(self.nodes):
            if node.role != LAYER or not node.layer or node.layer in found:
                continue
            reached = self._reach(idx, lambda n: n.role != LAYER)
            ends = [self.nodes[i] for i in reached if self.nodes[i].role in (LAYER, OUTPUT)]
            found[node.layer] = None if any(n.role == OUTPUT for n in ends) else frozenset(n.layer for n in ends)
        return found

    @classmethod
    def chain(cls, items: list[tuple[str, str | None, Activation | None]], sees_activations: bool = True) -> "Flow":
        """A linear flow from an ordered list of (role, layer, activation), e.g. module registration order."""
        flow = cls(sees_activations)
        prev = None
        for role, layer, act in items:
            node = flow.add(role, layer, act)
            if prev is not None:
                flow.link(prev, node)
            prev = node
        if prev is not None:
            flow.link(prev, flow.add(OUTPUT))
        return flow

    def downstream(self, unknown_between_layers: bool = False) -> dict[str, Downstream]:
        """For each layer: the first activation reached walking forward (breadth first).

        A path that reaches another weighted layer, a softmax or the output with no
        non-linearity on the way means the layer is linear (identity) — unless
        `unknown_between_layers`, for flows (bare state_dicts) whose activations were never seen.
        Norms passed on the way set `norm_after`, sums of two computed tensors (residual joins) whose branch the
        layer sits on (not their shortcut, nor before their summands part) `residual_after`; a saturating
        activation whose output scales a signal the layer did not compute (a product: squeeze-excite, gated
        units) is a gate: `gate_after` (x·sigmoid(x) and GLU's halves multiply what the layer computed: an
        activation, no gate); a layer on such a branch whose output reaches its sum before any normalization,
        through whatever layers, sits on a residual branch: `residual_branch`. A layer seen twice keeps its
        first answer.
        """
        producers = self.producers()
        branches = self._branches(producers)
        joins = self._joins(producers, branches)
        found: dict[str, Downstream] = {}
        for start, node in enumerate(self.nodes):  # a norm module's node, where named, too (its residual_branch)
            if node.role in (LAYER, NORM) and node.layer and node.layer not in found:
                sums = {idx for idx, part in branches.items() if start in part}
                walked = self._walk(start, unknown_between_layers, producers, sums)
                found[node.layer] = replace(walked, residual_branch=joins[start],
                                            weight_scale=walked.weight_scale * self._input_scale(start, producers))
        return found

    def run_lengths(self, gated: set[str]) -> dict[str, int]:
        """Per layer: the weighted layers on the longest chain through it with no normalization, softmax or
        residual sum between two of them, and none past a layer in `gated` (its output only scales a signal):
        the run its scale compounds in. Parallel branches (detection heads, q/k/v) are runs of their own."""
        producers = self.producers()
        order = [i for i in self.topological(producers) if self.nodes[i].role == LAYER]
        feeds: dict[int, list[int]] = {i: [] for i in order}
        for i in order:
            queue, seen = deque(producers[i]), set()
            while queue:
                j = queue.popleft()
                if j in seen:
                    continue
                seen.add(j)
                node = self.nodes[j]
                if node.role == LAYER:
                    if node.layer not in gated and j in feeds:
                        feeds[j].append(i)
                elif node.role not in (NORM, STOP, OUTPUT) and not (node.role == ADD and len(producers[j]) >= 2):
                    queue.extend(producers[j])
        up = {i: 1 for i in order}
        for i in order:
            for k in feeds[i]:
                up[k] = max(up[k], up[i] + 1)
        down = {i: 1 for i in order}
        for i in reversed(order):
            for k in feeds[i]:
                down[i] = max(down[i], down[k] + 1)
        runs: dict[str, int] = {}
        for i in order:
            name = self.nodes[i].layer
            runs[name] = max(runs.get(name, 0), up[i] + down[i] - 1)
        return runs

    def _summands(self, idx: int, producers: list[list[int]]) -> list[tuple[set[int], bool]]:
        """Per summand of sum `idx`: the nodes only it is computed from (past where the summands part), and whether
        it is the shortcut (of two summands, the one with fewer layers there, where they differ)."""
        sides = [self._reach(p, lambda _: True, producers) | {p} for p in producers[idx]]
        common = set.intersection(*sides)
        own = [side - common for side in sides]
        counts = [len({self.nodes[j].layer for j in part if self.nodes[j].role == LAYER}) for part in own]
        return [(part, len(own) == 2 and counts[k] < counts[1 - k]) for k, part in enumerate(own)]

    def producers(self) -> list[list[int]]:
        """Each node's producers (the nodes it is a user of)."""
        producers: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for u in node.users:
                producers[u].append(i)
        return producers

    def topological(self, producers: list[list[int]]) -> list[int]:
        """The nodes in topological order (Kahn's, ties in insertion order); nodes on a cycle are left out."""
        waiting = [len(p) for p in producers]
        ready = deque(i for i, n in enumerate(waiting) if n == 0)
        order = []
        while ready:
            idx = ready.popleft()
            order.append(idx)
            for u in self.nodes[idx].users:
                waiting[u] -= 1
                if waiting[u] == 0:
                    ready.append(u)
        return order

    def _branches(self, producers: list[list[int]]) -> dict[int, set[int]]:
        """Per residual sum (two computed tensors added): the nodes on its branches, past where the summands part
        and not on the shortcut. A node before the fork, or on the shortcut (a ResNet's stem, its downsample),
        carries the stream."""
        return {idx: set().union(*(part for part, shortcut in self._summands(idx, producers) if not shortcut))
                for idx, node in enumerate(self.nodes) if node.role == ADD and len(producers[idx]) >= 2}

    def _joins(self, producers: list[list[int]], branches: dict[int, set[int]]) -> list[bool]:
        """Per node: it sits on a branch of a residual sum and its output reaches that sum before a normalization,
        a softmax or the output."""
        joins = [False] * len(self.nodes)
        for idx, part in branches.items():
            for j in part & self._reach(idx, lambda n: n.role not in (NORM, STOP, OUTPUT), producers):
                joins[j] = True
        return joins

    def _walk(self, start: int, unknown_between_layers: bool, producers: list[list[int]], sums: set[int]) -> Downstream:
        """What follows node `start` (`sums`: the residual sums whose branch it sits on)."""
        queue = deque((u, False, False, 1.0) for u in self.nodes[start].users)
        seen = {start}
        own: set[int] | None = None  # the products the layer's signal reaches with no layer, sum or softmax between
        while queue:
            idx, normed, joined, scale = queue.popleft()
            if idx in seen:
                continue
            seen.add(idx)
            node = self.nodes[idx]
            if node.role == ACT:
                gate = node.activation.family == "saturating" and self._gates(start, idx, producers)
                return Downstream(node.activation, normed, joined, gate, weight_scale=scale or 1.0)
            if node.role == LAYER:
                if own is None:
                    own = {i for i in self._reach(start, lambda n: n.role in (PASS, SCALE, NORM, MUL))
                           if self.nodes[i].role == MUL}
                if own and self._reach(idx, lambda n: n.role in (PASS, SCALE, ACT, LAYER)) & own:
                    continue  # a squeeze-excite gate computed from the signal, scaling it: the signal goes on
                return Downstream(UNKNOWN if unknown_between_layers else IDENTITY, normed, joined,
                                  weight_scale=scale or 1.0)
            if node.role in (STOP, OUTPUT):  # a constant before a softmax is a temperature, not the layer's
                return Downstream(IDENTITY, normed, joined, weight_scale=scale or 1.0 if node.role == OUTPUT else 1.0)
            normed = normed or node.role == NORM
            joined = joined or idx in sums
            queue.extend((u, normed, joined, self._scaled(scale, idx, producers)) for u in node.users)
        return Downstream(IDENTITY, False)

    def _input_scale(self, layer: int, producers: list[list[int]]) -> float:
        """The constants a layer's only input was multiplied by on its way in, where nothing else reads it (T5's
        tied head reads its stream times d_model^-0.5): the same as the weight times them."""
        scale, idx = 1.0, layer
        while len(producers[idx]) == 1:
            idx = producers[idx][0]
            node = self.nodes[idx]
            if node.role not in (PASS, SCALE) or len(node.users) != 1:
                break
            scale *= node.factor if node.role == SCALE else 1.0
        return scale

    def _scaled(self, scale: float | None, idx: int, producers: list[list[int]]) -> float | None:
        """The constant a layer's output has been multiplied by, once the walk passed node `idx`: a SCALE's
        factor counts; past a normalization or a node mixing the signal with another computed one (q·kᵀ, a
        residual sum, a concatenation) the constants are no longer the layer's own (None)."""
        node = self.nodes[idx]
        computed = [p for p in producers[idx] if producers[p]]
        if scale is None or node.role == NORM or len(computed) >= 2:
            return None
        return scale * node.factor if node.role == SCALE else scale

    def _gates(self, layer: int, act: int, producers: list[list[int]]) -> bool:
        """The activation's output reaches, through pass-through nodes, a product with a tensor that the
        layer's output does not make without another layer."""
        own = self._reach(layer, lambda node: node.role != LAYER) | {layer}
        for idx in self._reach(act, lambda node: node.role in (PASS, SCALE, MUL)):
            if self.nodes[idx].role == MUL and any(p not in own for p in producers[idx]):
                return True
        return False

    def _reach(self, start: int, through, producers: list[list[int]] | None = None) -> set[int]:
        """The nodes reached from `start` walking forward (backward along `producers`, where given), passing on
        only from nodes that `through` accepts."""
        def after(idx: int) -> list[int]:
            return producers[idx] if producers is not None else self.nodes[idx].users

        reached, queue = set(), deque(after(start))
        while queue:
            idx = queue.popleft()
            if idx in reached:
                continue
            reached.add(idx)
            if through(self.nodes[idx]):
                queue.extend(after(idx))
        return reached
