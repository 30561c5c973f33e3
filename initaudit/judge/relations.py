"""Cross-tensor facts: what one tensor says only beside others. Made once every tensor is measured, before the rules
run: declared ties whose tensors are not one (`tie_*`), a layer of a repeated block whose std departs from its
sibling blocks where no depth recipe explains it (`sibling_*`), and random layers that are bitwise identical
(`identical_*`).

Values are compared without hashing every tensor: two tensors can only be equal where their exact extremes are
(a min or max is the same number whatever the code path that found it), and only those few candidates are read
again and compared entry by entry."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from initaudit.judge.facts import short_list
from initaudit.measure.tensors import Measured, Tensors, block_pattern

EMPTY = {"tie_broken_with": None, "tie_declared_by": None, "tie_values_equal": None,
         "sibling_ratio": None, "sibling_recipe": None, "sibling_expected_std": None, "sibling_off": None,
         "siblings": None, "sibling_off_layers": None, "identical_to": None, "identical_count": None}

# How a layer's std may follow its block index l (0 first) across the blocks of a model: the depth recipes.
# A constant covers every recipe that scales all blocks alike (GPT-2's 0.02/√(2L) output projections, Mamba's
# 1/√L); 1/√(l+1) is per-layer depth scaling (OLMo's and torchtitan's 0.02/√(2(l+1)), BEiT's rescale by √(2(l+1))).
RECIPES: tuple[tuple[str, Callable[[int], float]], ...] = (
    ("constant", lambda l: 1.0),
    ("∝ 1/√(l+1)", lambda l: (l + 1) ** -0.5),
    ("∝ 1/(l+1)", lambda l: 1.0 / (l + 1)),
)
SIGMAS = 6.0          # a block departs only beyond this many standard errors of its std
MIN_DEPARTURE = 1.1   # ... and by more than this factor (a recipe is never drawn 10 % off its siblings)
MIN_BLOCKS = 3        # a fit needs this many blocks
MIN_DISTINCT = 3      # fewer distinct values: a structured, not a random, layer (eye, dirac)


def relate(measured: list[Measured], tensors: Tensors | None, ties: list[tuple[str, str]], live: bool) -> None:
    """Set the cross-tensor facts on every measured tensor (`ties`: the pairs the module or config ties; `live`:
    the model is a module in memory, where a tie is one Parameter object, else one value; `tensors` None: the
    tensors were measured from summaries, whose digests tell equal values)."""
    for m in measured:
        m.facts.update(EMPTY)
    equal = ValuesEqual(tensors)
    by_key = {m.param.key: m for m in measured}
    declared = declared_ties(by_key, ties)
    tie_pairs = declared + copied_ties([m for m in measured if m.param.key not in {a for a, _, _ in declared}], equal)
    broken_ties(by_key, tie_pairs, equal, live)
    random = [m for m in measured if is_random_weight(m) and m.layer.weighted]  # not embeddings (sinusoidal tables)
    for group in sibling_groups(random).values():
        fit_siblings(group)
    identical_facts(random, equal, {frozenset(pair[:2]) for pair in tie_pairs})


def identical_facts(random: list[Measured], equal: "ValuesEqual", tied: set[frozenset]) -> None:
    """`identical_to` (the first of them) and `identical_count` on each copy in a group of random weights holding
    equal values: the first stays, the others are the copies (a declared tie's pair is the tie rules' concern)."""
    for group in identical_groups(random, equal):
        if len(group) > 1 and frozenset(m.param.key for m in group) not in tied:
            first, *copies = group
            for m in copies:
                if not exporter_copy(first, m):
                    m.facts.update(identical_to=first.param.key, identical_count=len(group))


def exporter_copy(a: Measured, b: Measured) -> bool:
    """One shared weight an exporter wrote twice: the same layer name but for a `_N` suffix (ONNX's legacy
    exporter names ALBERT's shared layer's reuse `...query_1`)."""
    return re.sub(r"_\d+$", "", a.layer.name) == re.sub(r"_\d+$", "", b.layer.name)


class ValuesEqual:
    """Whether two tensors hold the same values, bit for bit: read again (then handed back) only where their
    shapes and exact extremes agree; measured from summaries, where their digests agree."""

    def __init__(self, tensors: Tensors | None):
        self.tensors = tensors

    def __call__(self, a: Measured, b: Measured) -> bool:
        if a.param.shape != b.param.shape or (a.stats.min, a.stats.max) != (b.stats.min, b.stats.max):
            return False
        if self.tensors is None:
            return a.digest is not None and a.digest == b.digest
        try:
            x, y = self.tensors[a.param.key], self.tensors[b.param.key]
            return x.dtype == y.dtype and torch.equal(x, y)
        finally:
            self.tensors.release(a.param.key)
            self.tensors.release(b.param.key)


def one_tensor(a: Measured, b: Measured) -> bool:
    """The two names hold one tensor (the measuring pass found them sharing storage)."""
    return a.param.key == b.param.key or a.param.shared_with == b.param.key or b.param.shared_with == a.param.key or \
        (a.param.shared_with is not None and a.param.shared_with == b.param.shared_with)


def declared_ties(by_key: dict[str, Measured], ties: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(tied, tied to, 'config') for each declared tie whose two names the model holds (a file that keeps one
    name of a tie holds one tensor)."""
    return [(a, b, "config") for a, b in ties if a in by_key and b in by_key]


def copied_ties(measured: list[Measured], equal: ValuesEqual) -> list[tuple[str, str, str]]:
    """(head, embedding, 'copy') where a linear layer is a separate copy of an embedding table: a random table
    copied bit for bit is a tie someone meant. In a live model `nn.Parameter(wte.weight.clone())` broke it; in a
    file it is how a tie is saved where storage cannot be shared (safetensors' save_file, a gathered state)."""
    embeddings = [m for m in measured if m.layer.kind == "embedding" and m.param.role == "weight"]
    heads = [m for m in measured if m.layer.kind == "linear" and m.param.is_weight]
    return [(h.param.key, e.param.key, "copy") for e in embeddings for h in heads
            if not one_tensor(h, e) and is_random_weight(e) and equal(h, e)]


def broken_ties(by_key: dict[str, Measured], pairs: list[tuple[str, str, str]], equal: ValuesEqual,
                live: bool) -> None:
    """The tie facts on the first name of each tie whose tensors are not one: where live, two objects (even with
    equal values); in a file, different values (a file need not keep the storage two names share; a copy found
    in a file is its tie, kept by value)."""
    for a, b, source in pairs:
        ma, mb = by_key[a], by_key[b]
        if one_tensor(ma, mb) or (source == "copy" and not live):
            continue
        same = equal(ma, mb)
        if live or not same:
            ma.facts.update(tie_broken_with=b, tie_declared_by=source, tie_values_equal=same)


def is_random_weight(m: Measured) -> bool:
    """A layer's own weight whose values are a random draw's: not tied, not constant, not structured."""
    st = m.stats
    return (m.param.is_weight and (m.layer.weighted or m.layer.kind == "embedding") and m.param.shared_with is None
            and math.isfinite(st.std) and st.std > 0 and st.distinct >= MIN_DISTINCT)


def identical_groups(candidates: list[Measured], equal: ValuesEqual) -> list[list[Measured]]:
    """The tensors grouped by equal values: only same-shaped tensors with equal extremes and stds (to 7 digits:
    summing in another order may move the last ones) are compared."""
    buckets: dict[tuple, list[Measured]] = defaultdict(list)
    for m in candidates:
        buckets[(m.param.shape, m.stats.min, m.stats.max, f"{m.stats.std:.6e}")].append(m)
    groups: list[list[Measured]] = []
    for bucket in buckets.values():
        classes: list[list[Measured]] = []
        for m in bucket:
            home = next((c for c in classes if equal(c[0], m)), None) if len(bucket) > 1 else None
            if home is None:
                classes.append([m])
            else:
                home.append(m)
        groups += classes
    return groups


@dataclass
class Sibling:
    """One block's copy of a layer: its depth index, std and the std's relative standard error."""

    m: Measured
    depth: int
    std: float
    error: float


def sibling_groups(candidates: list[Measured]) -> dict[tuple, list[Sibling]]:
    """The layers repeated once per block (same name but for the block numbers, same shape and kind), each with
    its block's depth index; layers that look trained are left out (training moves each block's std its own way)."""
    groups: dict[tuple, list[Measured]] = defaultdict(list)
    for m in candidates:
        pattern = block_pattern(m.layer.name)
        if pattern != m.layer.name and not (m.verdict is not None and m.verdict.state == "trained"):
            groups[(pattern, m.param.shape, m.layer.kind)].append(m)
    return {key: siblings(group) for key, group in groups.items()}


def block_numbers(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def siblings(group: list[Measured]) -> list[Sibling]:
    """Each member with its depth: the rank of the first block number that varies across the group (a model's
    layer index before an expert's or a stage's inner index)."""
    numbers = [block_numbers(m.layer.name) for m in group]
    varying = next((i for i in range(len(numbers[0])) if len({n[i] for n in numbers}) > 1), 0)
    ranks = {v: r for r, v in enumerate(sorted({n[varying] for n in numbers}))}
    return [Sibling(m, ranks[n[varying]], m.stats.std, std_error(m)) for m, n in zip(group, numbers)]


def std_error(m: Measured) -> float:
    """The relative standard error of a std measured on n values of excess kurtosis κ: √((κ + 2) / 4n)."""
    kurtosis = m.stats.excess_kurtosis if math.isfinite(m.stats.excess_kurtosis) else 0.0
    return math.sqrt(max(kurtosis + 2.0, 0.8) / (4.0 * max(m.stats.finite, 1)))


def departs(s: Sibling, expected: float) -> bool:
    """The block's std is off what it should be, beyond sampling error and beyond any recipe's precision."""
    off = abs(math.log(s.std / expected))
    return off > SIGMAS * s.error and off > math.log(MIN_DEPARTURE)


def consensus(group: list[Sibling], recipe: Callable[[int], float]) -> tuple[float, list[Sibling]]:
    """The recipe's scale that most blocks agree with (each block's own reading tried in turn, the first block's
    first), refined over the blocks that agree with it, and those blocks."""
    best: list[Sibling] = []
    for s in group:
        scale = s.std / recipe(s.depth)
        agree = [t for t in group if not departs(t, scale * recipe(t.depth))]
        if len(agree) > len(best):
            best = agree
    scale = math.exp(sum(math.log(t.std / recipe(t.depth)) for t in best) / len(best))
    return scale, best


def fit_siblings(group: list[Sibling]) -> None:
    """Fit every recipe to the group's stds against the depth; the recipe most blocks agree with (the first listed
    on a tie) names the scale each block should have, and the blocks off it get `sibling_off`."""
    if len({s.depth for s in group}) < MIN_BLOCKS:
        return
    group = sorted(group, key=lambda s: s.depth)
    fits = [(name, *consensus(group, recipe), recipe) for name, recipe in RECIPES]
    name, scale, agree, recipe = max(fits, key=lambda fit: len(fit[2]))
    if len(agree) < 2:
        return  # no two blocks agree on any recipe: nothing to measure a departure against
    off = {id(s) for s in group if departs(s, scale * recipe(s.depth))}
    off_names = short_list([s.m.layer.name for s in group if id(s) in off], 5)
    if off and 2 * len(agree) <= len(group):  # a split: the blocks the first one sides with are taken as right
        off_names += f" (or {short_list([s.m.layer.name for s in agree], 5)}: no majority of blocks agrees)"
    for s in group:
        expected = scale * recipe(s.depth)
        s.m.facts.update(sibling_ratio=s.std / expected, sibling_recipe=name, sibling_expected_std=expected,
                         sibling_off=id(s) in off, siblings=len(group), sibling_off_layers=off_names or None)
