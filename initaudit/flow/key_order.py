"""Forward order of the layers of a bare file (safetensors, a sorted state_dict), from names and shapes.

Such a file keeps its tensors sorted by name, so `norm1` sorts after `mlp` and `head` before
`stem`. Numbered children (`layers.2`, `layers.10`) are in forward order once sorted numerically;
the named children of one module are put in the order that chains their shapes (a layer's input
width matches its predecessor's output width). Where several orders chain equally well, the facts
that depend on the order (a norm right after the layer, the run of layers between norms) are
compared across them: a layer whose facts differ is `uncertain`. The output layers are the ones
whose output nothing consumes, outside numbered blocks, nearest the top of the module tree; they go last.
A language model saved with its head tied to the token embedding keeps only the embedding: where no layer
gives the embedding's vocabulary width and the last layer gives its width, the head is that tied embedding
and no layer in the file is the output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import count

from initaudit.flow.layer import Layer, run_lengths

_MAX_ORDERS = 6        # alternative orders of one module's children weighed against the chosen one
_MAX_SEARCHED_PIECES = 256  # siblings whose order is searched (the search recurses once per piece)
_SEARCH_BUDGET = 5000   # partial orders tried per module before settling for what was found


@dataclass
class BareOrder:
    layers: list[Layer]                 # forward order, outputs last
    outputs: set[str] = field(default_factory=set)
    tied_head: str | None = None        # the token embedding, where it is the (tied) output layer
    uncertain: set[str] = field(default_factory=set)  # layers whose norm/run facts depend on an ambiguous order


def widths(layer: Layer) -> tuple[int | None, int | None]:
    """(input width, output width) in channels or features; None where the tensors do not say."""
    shapes = {p.key.rsplit(".", 1)[-1]: p.shape for p in layer.params}
    if layer.kind == "norm":
        width = next((s[0] for s in shapes.values() if len(s) == 1), None)
        return width, width
    if layer.kind == "embedding":
        weight = layer.param("weight")
        return None, weight.shape[-1] if weight else None
    if layer.kind == "recurrent":
        first = next((s for k, s in shapes.items() if k.startswith("weight_ih_l0")), None)
        last = max((k for k in shapes if k.startswith("weight_hh_l")), default=None)
        if first is None or last is None:
            return None, None
        out = shapes[last][1] * (2 if any(k.endswith("_reverse") for k in shapes) else 1)
        return first[1], out
    if layer.kind == "attention" and "in_proj_weight" in shapes:
        return shapes["in_proj_weight"][1], shapes["in_proj_weight"][1]
    weight = layer.param("weight")
    if weight is None or len(weight.shape) < 2 or not layer.weighted:
        return None, None
    if layer.kind == "linear" and len(weight.shape) == 3:  # stacked experts: one expert's fans
        return weight.fan_in, weight.fan_out
    rows, cols = weight.shape[:2]
    if weight.unit_axis == 1:  # [in, out]: ConvTranspose, HF Conv1D
        return rows, cols
    if layer.kind.startswith("conv") and cols == 1:  # depthwise: one input channel per group
        return rows, rows
    return cols, rows


@dataclass
class _Piece:
    """A module's subtree: its layers in the chosen order, and its input/output widths."""

    name: str
    layers: list[Layer]
    start: int | None
    end: int | None


def arrange(layers: list[Layer]) -> BareOrder:
    """Order bare layers (given in natural name order) for the forward walk; see the module docstring."""
    ambiguous: list[tuple[list[_Piece], list[tuple[int, ...]]]] = []
    root = _arrange(layers, 0, ambiguous)
    order = list(root.layers)
    outputs = output_layers(order)
    if outputs:
        order = [l for l in order if l.name not in outputs] + [l for l in order if l.name in outputs]
    tied = None if outputs else _tied_head(order)
    chosen = _facts(order)
    uncertain: set[str] = set()
    for pieces, alternatives in ambiguous:
        names = {l.name for p in pieces for l in p.layers} - outputs
        if not names:
            continue
        at = next(i for i, l in enumerate(order) if l.name in names)
        rest = [l for l in order if l.name not in names]
        # Runs end at norms: only the runs from the last norm before the span to the first after it change.
        lo = max((i for i in range(at) if rest[i].kind == "norm"), default=0)
        hi = next((i for i in range(at, len(rest)) if rest[i].kind == "norm"), len(rest) - 1) + 1
        for alt in alternatives[1:]:
            moved = [l for i in alt for l in pieces[i].layers if l.name in names]
            facts = _facts(rest[lo:at] + moved + rest[at:hi])
            uncertain |= {name for name, fact in facts.items() if chosen.get(name) != fact}
    return BareOrder(order, outputs, uncertain=uncertain, tied_head=tied)


def _arrange(layers: list[Layer], depth: int, ambiguous: list) -> _Piece:
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        parts = layer.name.split(".")
        groups.setdefault(parts[depth] if len(parts) > depth else "", []).append(layer)
    if len(layers) == 1 and len(layers[0].name.split(".")) <= depth + 1:
        return _Piece(layers[0].name, layers, *widths(layers[0]))
    pieces = [_arrange(group, depth + 1, ambiguous) if key else _Piece(group[0].name, group, *widths(group[0]))
              for key, group in groups.items()]
    orders = _best_orders(pieces)
    if len(orders) > 1:
        ambiguous.append((pieces, orders))
    ordered = [pieces[i] for i in orders[0]]
    known = [p for p in ordered if p.start is not None or p.end is not None]
    return _Piece(".".join(layers[0].name.split(".")[:depth]), [l for p in ordered for l in p.layers],
                  known[0].start if known else None, known[-1].end if known else None)


def _best_orders(pieces: list[_Piece]) -> list[tuple[int, ...]]:
    """Orders of the pieces with the fewest width mismatches between neighbours, the natural-first
    one first; numbered pieces keep their numeric order; at most _MAX_ORDERS."""
    if len(pieces) == 1:
        return [(0,)]
    if len(pieces) > _MAX_SEARCHED_PIECES:  # beyond any module's children: natural order, no search
        return [tuple(range(len(pieces)))]
    numbered = [i for i, p in enumerate(pieces) if p.name.rsplit(".", 1)[-1].isdigit()]
    best: list[tuple[int, ...]] = []
    best_cost = [len(pieces)]
    budget = count()

    def extend(prefix: list[int], cost: int, last_end: int | None) -> None:
        if next(budget) > _SEARCH_BUDGET or cost > best_cost[0] or (cost == best_cost[0] and len(best) > _MAX_ORDERS):
            return
        if len(prefix) == len(pieces):
            if cost < best_cost[0]:
                best.clear()
                best_cost[0] = cost
            best.append(tuple(prefix))
            return
        used = set(prefix)
        next_numbered = next((i for i in numbered if i not in used), None)
        for i, piece in enumerate(pieces):
            if i in used or (i in numbered and i != next_numbered):
                continue
            miss = int(last_end is not None and piece.start is not None and piece.start != last_end)
            end = piece.end if piece.end is not None else last_end
            extend(prefix + [i], cost + miss, end)

    extend([], 0, None)
    natural = tuple(range(len(pieces)))
    if next(budget) > _SEARCH_BUDGET and natural not in best:  # the search gave up: the order is not known
        best.append(natural)
    return best[:_MAX_ORDERS] or [natural]


def file_outputs(layers: list[Layer]) -> set[str]:
    """The output layer of a file kept in forward (insertion) order, where its last layer's output is taken in by
    none: the last, in file order, of the free layers nearest the top (DiT registers its final linear before the
    zero modulation nested beside it). Empty where the last layer's output is taken in: the file's order says."""
    weighted = [l for l in layers if l.weighted]
    free = _feeding_nothing(layers)
    if not weighted or weighted[-1].name not in {l.name for l in free}:
        return set()
    top = _nearest_top(free)
    return {next(l.name for l in reversed(weighted) if l.name in top)} if top else set()


def output_layers(order: list[Layer]) -> set[str]:
    """Weighted layers whose output width no other layer takes in, the ones nearest the top of the tree."""
    return _nearest_top(_feeding_nothing(order))


def _feeding_nothing(order: list[Layer]) -> list[Layer]:
    """Weighted layers whose output width no other layer takes in."""
    ends = {l.name: widths(l) for l in order}
    takers = Counter(start for start, _ in ends.values() if start is not None)
    return [l for l in order if l.weighted and ends[l.name][1] is not None
            and takers[ends[l.name][1]] - (ends[l.name][0] == ends[l.name][1]) == 0]


def _nearest_top(free: list[Layer]) -> set[str]:
    """Of these layers, the ones outside numbered blocks nearest the top of the module tree."""
    free = [l for l in free if not _in_numbered_block(l.name)]
    if not free:
        return set()
    top = min(l.name.count(".") for l in free)
    return {l.name for l in free if l.name.count(".") == top}


def _tied_head(order: list[Layer]) -> str | None:
    """The token embedding (the one with most rows), if it is the head: no layer outputs its vocabulary, the last
    layer outputs its width."""
    tables = [l for l in order if l.kind == "embedding" and l.param("weight")]
    weighted = [l for l in order if l.weighted]
    if not tables or not weighted:
        return None
    token = max(tables, key=lambda l: l.param("weight").shape)
    vocab, width = token.param("weight").shape[:2]
    if widths(weighted[-1])[1] == width and all(widths(l)[1] != vocab for l in weighted):
        return token.name
    return None


def _in_numbered_block(name: str) -> bool:
    """Inside one of a stack's numbered blocks (`layers.3.self_attn.k_proj`): a layer every block repeats is no
    output, whatever its width (grouped-query k/v projections feed attention, which no weight takes in)."""
    return any(part.isdigit() for part in name.split(".")[:-1])


def _facts(order: list[Layer]) -> dict[str, tuple[bool, int]]:
    """(norm after, run depth) of every weighted layer of a chain in this order, as the walk over the chain flow
    finds them: a layer is normalized where a norm follows it before the next weighted layer."""
    names, normed = [], []
    for layer in order:
        if layer.kind == "norm" and normed:
            normed[-1] = True
        elif layer.weighted:
            names.append(layer.name)
            normed.append(False)
    return dict(zip(names, zip(normed, run_lengths(normed))))
