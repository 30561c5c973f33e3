"""Signs of training a checkpoint carries beside its weights (optimizer state, step and epoch counters): what the
loaders know of a file's containers, for the fresh/trained verdict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

STEP_KEYS = ("step", "global_step", "steps", "epoch", "epochs", "iteration", "iter", "num_updates", "total_steps")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim", "opt", "optimizer_state")


def file_signs(root: Any) -> list[str]:
    """Signs of training in a checkpoint's top level: optimizer state, step/epoch counters."""
    if not isinstance(root, Mapping):
        return []
    signs = []
    for key in OPTIMIZER_KEYS:
        opt = root.get(key)
        if isinstance(opt, Mapping) and isinstance(opt.get("state"), Mapping) and opt["state"]:
            signs.append(f"optimizer state under '{key}' ({len(opt['state'])} parameters)")
        elif isinstance(opt, (list, tuple)) and any(isinstance(o, Mapping) and o.get("state") for o in opt):
            signs.append(f"optimizer state under '{key}'")
    for key in STEP_KEYS:
        value = root.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            signs.append(f"{key} = {value:g}")
    return signs
