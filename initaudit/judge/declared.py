"""What the user or the model declares about its weights, held against what was measured: the state each layer
should be in (`expect`: trained or fresh, per glob pattern over layer names) and the recipe each tensor was drawn
with (`recipe`: glob patterns over tensor names; a Hugging Face config's `initializer_range`). Facts for the
`unexpected-fresh` and `recipe-mismatch` rules; the most specific pattern wins (the most literal characters)."""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from typing import Any, TypeVar

from initaudit.measure.recipes import Recipe, contradiction, parse
from initaudit.measure.tensors import Measured, block_pattern

T = TypeVar("T")
# Hugging Face configs: the std every Linear and Embedding weight is drawn with by the family's _init_weights.
HF_STD_KEYS = ("initializer_range", "init_std")
HF_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HF_RECIPE_KINDS = ("linear", "embedding")
CONFIG_SOURCE = "[tool.initaudit] recipe"


def most_specific(patterns: dict[str, T], name: str) -> T | None:
    """The value of the most specific glob pattern matching `name` (the most literal characters; ties: the later)."""
    matching = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
    if not matching:
        return None
    return patterns[max(reversed(matching), key=lambda p: len(p) - sum(p.count(c) for c in "*?[]"))]


def hf_recipe(config: dict[str, Any] | None) -> tuple[Recipe, tuple[float, ...], str] | None:
    """(normal(initializer_range), its depth scale 1/sqrt(2·n_layer), the config key) a Hugging Face config declares
    for its Linear and Embedding weights, or None."""
    if not config:
        return None
    key = next((k for k in HF_STD_KEYS if isinstance(config.get(k), (int, float)) and config[k] > 0), None)
    if key is None:
        return None
    depth = next((config[k] for k in HF_DEPTH_KEYS if isinstance(config.get(k), int) and config[k] > 0), None)
    return parse(f"normal({config[key]:g})"), ((1 / math.sqrt(2 * depth),) if depth else ()), f"config.json {key}"


def add_declared_facts(measured: list[Measured], expect: dict[str, str], recipes: dict[str, Recipe],
                       config: dict[str, Any] | None) -> None:
    """The facts of `unexpected-fresh` and `recipe-mismatch` on every measured tensor (after the state verdicts)."""
    trained_share, siblings = _training_context(measured)
    from_config = hf_recipe(config)
    for m in measured:
        m.facts["expected_state"] = most_specific(expect, m.layer.name) or "undeclared"
        m.facts["model_trained_share"] = trained_share
        m.facts["siblings_trained"] = siblings.get(m.layer.name)
        m.facts.update(_recipe_facts(m, recipes, from_config))


def declarations(expect: dict[str, str], recipes: dict[str, Recipe], config: dict[str, Any] | None) -> dict[str, Any]:
    """The report's `expect` and `recipe` (patterns to what is declared, and where the recipe comes from), if any."""
    out: dict[str, Any] = {"expect": dict(expect)} if expect else {}
    from_config, sources = hf_recipe(config), []
    if recipes:
        sources.append({"source": CONFIG_SOURCE, "patterns": {p: str(r) for p, r in recipes.items()}})
    if from_config:
        sources.append({"source": from_config[2], "patterns": {"linear and embedding weights": str(from_config[0])}})
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


def _recipe_facts(m: Measured, recipes: dict[str, Recipe],
                  from_config: tuple[Recipe, tuple[float, ...], str] | None) -> dict[str, Any]:
    """The recipe declared for the tensor (config file first, then the model's config), and how it contradicts it."""
    recipe, scales, source = most_specific(recipes, m.param.key), (), CONFIG_SOURCE
    if recipe is None and from_config and m.param.is_weight and m.layer.kind in HF_RECIPE_KINDS:
        recipe, scales, source = from_config
        scales = (*scales, *((1 / math.sqrt(2 * m.n_blocks),) if m.n_blocks > 1 else ()))
    if recipe is None:
        return {"recipe": None, "recipe_source": None, "recipe_fits": None, "recipe_contradiction": None}
    st = m.stats
    found = contradiction(recipe, std=st.std, mean=st.mean, kurtosis=st.excess_kurtosis, values=st.finite,
                          constant=st.constant, value=st.max if st.constant else None, fan_in=m.param.fan_in,
                          fan_out=m.param.fan_out, depth_scales=scales) if st.finite else None
    return {"recipe": str(recipe), "recipe_source": source, "recipe_fits": found is None and bool(st.finite),
            "recipe_contradiction": found}
