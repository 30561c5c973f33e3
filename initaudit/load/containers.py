"""What checkpoints hold around a model's weights: the keys wrappers put them under and the prefixes they add
to every name, and the signs of training beside them (optimizer state, step and epoch counters) that the
fresh/trained verdict weighs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Where training checkpoints keep the model's weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network",
                "weights", "params", "ema_state_dict", "ema")
# Prefixes that wrappers add to every key: DDP (module.), Lightning (model.), torch.compile (_orig_mod.).
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")
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


def optimizer_tensors(root: Any) -> list[str]:
    """The names of the tensors an optimizer's state holds in a checkpoint's top level ('optimizer.state.0.exp_avg')."""
    if not isinstance(root, Mapping):
        return []
    found: list[str] = []

    def walk(value: Any, name: str, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            found.append(name)
        elif depth < 8 and isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}", depth + 1)
        elif depth < 8 and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}", depth + 1)

    for key in OPTIMIZER_KEYS:
        walk(root.get(key), key, 0)
    return found


def packed_tensors(root: Any, trail: tuple[str, ...]) -> list[str]:
    """Tensors a state_dict (at `trail` in `root`) holds inside other values, named `key.i`: torch's dynamically
    quantized Linear keeps its weight and bias in a `_packed_params` tuple."""
    state = root
    for key in trail:
        state = state.get(key) if isinstance(state, Mapping) else None
    if not isinstance(state, Mapping):
        return []
    return [f"{key}.{i}" for key, value in state.items() if isinstance(value, (list, tuple))
            and not _linear_packed(key, value) for i, item in enumerate(value) if isinstance(item, torch.Tensor)]


PACKED_PARAMS = "._packed_params._packed_params"  # torch's dynamically quantized Linear: (weight, bias)


def _linear_packed(key: str, value: Any) -> bool:
    """A dynamically quantized Linear's packed (quantized weight, float bias or None) tuple."""
    return (key.endswith(PACKED_PARAMS) and isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], torch.Tensor) and value[0].is_quantized
            and (value[1] is None or isinstance(value[1], torch.Tensor)))


def unpacked_linears(state: Mapping) -> dict[str, torch.Tensor]:
    """The weights and biases of torch's dynamically quantized Linears, out of their `_packed_params` tuples and
    under the names a float Linear gives them (`0.weight`: the quantized tensor, read dequantized)."""
    out = {}
    for key, value in state.items():
        if isinstance(key, str) and _linear_packed(key, value):
            module = key[:-len(PACKED_PARAMS)]
            out[f"{module}.weight"] = value[0]
            if value[1] is not None:
                out[f"{module}.bias"] = value[1]
    return out


# Tensors of packed quantized layouts no dequantization here reads, by the key that marks each layout: GPTQ/AWQ
# (qweight, qzeros, scales, g_idx), bitsandbytes int8 (weight, SCB, weight_format) and 4-bit (weight and its
# `weight.absmax`, `weight.quant_map`, `weight.quant_state.*`), FP8 with its scale (`weight_scale(_inv)`).
_PACKED_SIBLINGS = {
    "qweight": ("qweight", "qzeros", "scales", "g_idx"),
    "SCB": ("weight", "SCB", "weight_format"),
    "weight.quant_map": ("weight", "weight.quant_map"),
    "weight_scale": ("weight", "weight_scale", "input_scale"),
    "weight_scale_inv": ("weight", "weight_scale_inv"),
}
PACKED_REASON = ("packed quantized weight", "packed quantized weight (GPTQ/AWQ/bitsandbytes/FP8): not audited")


def packed_quantized(keys: list[str]) -> list[str]:
    """The keys of a state_dict that hold packed quantized weights and their scales (found by the key layouts
    of GPTQ/AWQ, bitsandbytes and FP8 checkpoints), which are not read as weights."""
    present = set(keys)
    found: set[str] = set()
    for key in keys:
        for marker, siblings in _PACKED_SIBLINGS.items():
            if key == marker or key.endswith(f".{marker}"):
                module = key[:-len(marker)]
                found.update(f"{module}{s}" for s in siblings if f"{module}{s}" in present)
    four_bit = tuple(key[:-len("quant_map")] for key in found if key.endswith("weight.quant_map"))  # 'l.weight.'
    if four_bit:
        found.update(key for key in keys if key.startswith(four_bit))
    return [key for key in keys if key in found]
