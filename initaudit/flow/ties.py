"""Ties a model declares: pairs of tensor names that must hold one tensor (an output head tied to the input
embedding). From the module itself (transformers' tied-weights map, which holds only where the config ties the
weights, the family's default included), or, where the architecture could not be built, from a config.json that
says `tie_word_embeddings: true` and the names such models give the head and the embedding."""

from __future__ import annotations

import torch

HEADS = ("lm_head.weight",)
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
              "embed_in.weight")


def module_ties(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(tied name, the name it is tied to) for every tie a transformers model declares, in its own parameter
    names (`get_expanded_tied_weights_keys`, which reads the config); none for any other module."""
    expand = getattr(module, "get_expanded_tied_weights_keys", None)
    if not callable(expand):
        return []
    try:
        tied = expand(all_submodels=True)
    except (ValueError, AttributeError, TypeError):
        return []
    return sorted((str(a), str(b)) for a, b in tied.items())


def config_ties(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """The head and embedding a config.json ties (`tie_word_embeddings: true`), found by their usual names and
    equal shapes: only where the file holds one embedding the head can be tied to."""
    if config.get("tie_word_embeddings") is not True:
        return []
    heads = [k for k in shapes if k.endswith(HEADS)]
    embeddings = [k for k in shapes if k.endswith(EMBEDDINGS)]
    if len(embeddings) != 1:
        return []
    return [(head, embeddings[0]) for head in heads if shapes[head] == shapes[embeddings[0]]]
