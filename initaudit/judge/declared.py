"""What the user or the model declares about its weights, held against what was measured: the state each layer
should be in (`expect`: trained or fresh, per glob pattern over layer names) and the recipe each tensor was drawn
with (`recipe`: glob patterns over tensor names, first; else what a transformers family's own init declares for it,
flow/family_init.py). Facts for the `unexpected-fresh` and `recipe-mismatch` rules; the most specific pattern wins
(the most literal characters)."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Any, TypeVar

from initaudit.measure.recipes import Recipe, contradiction, parse
from initaudit.measure.tensors import Measured, block_pattern

T = TypeVar("T")
CONFIG_SOURCE = "[tool.initaudit] recipe"
FAMILY_SOURCE = "the model family's own init"


def most_specific(patterns: dict[str, T], name: str) -> T | None:
    """The value of the most specific glob pattern matching `name` (the most literal characters; ties: the later)."""
    matching = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
    if not matching:
        return None
    return patterns[max(reversed(matching), key=lambda p: len(p) - sum(p.count(c) for c in "*?[]"))]


def add_declared_facts(measured: list[Measured], expect: dict[str, str], recipes: dict[str, Recipe],
                       family: dict[str, str]) -> None:
    """The facts of `unexpected-fresh` and `recipe-mismatch` on every measured tensor (after the state verdicts);
    `family`: tensor -> the recipe its model family's own init declares."""
    trained_share, siblings = _training_context(measured)
    for m in measured:
        m.facts["expected_state"] = most_specific(expect, m.layer.name) or "undeclared"
        m.facts["model_trained_share"] = trained_share
        m.facts["siblings_trained"] = siblings.get(m.layer.name)
        m.facts.update(_recipe_facts(m, recipes, family))


def declarations(expect: dict[str, str], recipes: dict[str, Recipe], family: dict[str, str]) -> dict[str, Any]:
    """The report's `expect` and `recipe` (where recipes are declared: the config file's patterns, and how many
    tensors the model family's own init declares one for), where there are any."""
    out: dict[str, Any] = {"expect": dict(expect)} if expect else {}
    sources = []
    if recipes:
        sources.append({"source": CONFIG_SOURCE, "patterns": {p: str(r) for p, r in recipes.items()}})
    if family:
        sources.append({"source": FAMILY_SOURCE, "tensors": len(family)})
    return {**out, "recipe": sources} if sources else out


def _training_context(measured: list[Measured]) -> tuple[float, dict[str, float]]:
    """(the share of classified weight values in layers seen trained, per layer: the share of its siblings — the same
    layer of the other blocks — seen trained, where it has three or more)."""
    states = {m.layer.name: (m.facts.get("layer_state"), m.stats.finite) for m in measured if m.param.is_weight}
    judged = {name: size for name, (state, size) in states.items() if state in ("fresh", "trained")}
    trained = sum(size for name, size in judged.items() if states[name][0] == "trained")
    share = trained / sum(judged.values()) if judged else 0.0
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in judged:
        blocks[block_pattern(name)].append(name)
    siblings = {}
    for names in blocks.values():
        for name in names:
            others = [n for n in names if n != name]
            if len(others) >= 3:
                siblings[name] = sum(states[n][0] == "trained" for n in others) / len(others)
    return share, siblings


def _recipe_facts(m: Measured, recipes: dict[str, Recipe], family: dict[str, str]) -> dict[str, Any]:
    """The recipe declared for the tensor (config file first, then the model family's init), and how the tensor
    contradicts it."""
    recipe, source = most_specific(recipes, m.param.key), CONFIG_SOURCE
    if m.param.shared_with is not None:  # a tied tensor's recipe is held against it once, under its first name
        recipe = None
    elif recipe is None and m.param.key in family:
        recipe, source = parse(family[m.param.key]), FAMILY_SOURCE
    if recipe is None:
        return {"recipe": None, "recipe_source": None, "recipe_fits": None, "recipe_contradiction": None}
    st = m.stats
    found = contradiction(recipe, std=st.std, mean=st.mean, kurtosis=st.excess_kurtosis, values=st.finite,
                          constant=st.constant, value=st.max if st.constant else None, fan_in=m.param.fan_in,
                          fan_out=m.param.fan_out) if st.finite else None
    if found and m.fingerprint is not None and m.fingerprint.family != "unknown":
        found += f" (they look {m.fingerprint.scheme})"
    return {"recipe": str(recipe), "recipe_source": source, "recipe_fits": found is None and bool(st.finite),
            "recipe_contradiction": found}
