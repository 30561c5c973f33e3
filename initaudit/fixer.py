"""Repair: re-draw flagged weights with the scheme the selection guide recommends, using torch.nn.init itself.

The unit of repair is a layer: its weights are re-drawn, its biases set to zeros (norm layers:
weights to ones). A layer is skipped, with the reason, when re-drawing would be a guess: its
activation is unknown, it is a free parameter, or its weight is shared with another layer.
"""

from __future__ import annotations

import fnmatch
import os
import zlib
from dataclasses import dataclass, field

import torch

from . import stats
from .audit import Analysis, Measured, analyse, make_options
from .config import Options
from .graph import Layer, Param
from .report import Report

FIXED_SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Change:
    """One tensor re-drawn (or zeroed)."""

    layer: str
    tensor: str
    old_scheme: str
    old_std: float
    new_scheme: str
    new_std: float
    call: str


@dataclass(frozen=True)
class Skipped:
    layer: str
    reason: str


@dataclass
class FixResult:
    """What `fix` changed and what it would not touch; `tensors` holds the new values by key."""

    seed: int
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __iter__(self):
        return iter(self.changes)

    def __len__(self) -> int:
        return len(self.changes)


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def targets(layers: list[Layer], report: Report, all_layers: bool, only: list[str] | None) -> list[Layer]:
    """The layers to repair: those matching --only, or all (--all), or those with error/warning findings."""
    repairable = [layer for layer in layers if layer.weighted or layer.kind in ("embedding", "norm", "parameter")]
    if only:
        return [layer for layer in repairable if any(fnmatch.fnmatchcase(layer.name, p) for p in only)]
    if all_layers:
        return [layer for layer in repairable if layer.kind != "parameter"]
    flagged = {f.layer for f in report.findings if f.severity in FIXED_SEVERITIES}
    return [layer for layer in repairable if layer.name in flagged]


def plan(measured: list[Measured], chosen: list[Layer], shared: dict[str, list[str]],
         read, seed: int) -> FixResult:
    """Draw the new tensors of the chosen layers; `read(key)` gives the current tensor."""
    result = FixResult(seed)
    by_layer: dict[str, list[Measured]] = {}
    for m in measured:
        by_layer.setdefault(m.layer.name, []).append(m)
    for layer in chosen:
        items = by_layer.get(layer.name, [])
        reason = _why_not(layer, items, shared)
        if reason:
            result.skipped.append(Skipped(layer.name, reason))
            continue
        for m in items:
            old = read(m.param.key)
            new = _draw(layer, m, old, seed)
            if new is None or torch.equal(new, old):
                continue
            result.tensors[m.param.key] = new
            st = stats.compute(new, m.param.unit_axis, units=False)
            scheme, call = _target(m)
            result.changes.append(Change(layer.name, m.param.key, _scheme_name(m), m.stats.std, scheme, st.std, call))
    return result


def _why_not(layer: Layer, items: list[Measured], shared: dict[str, list[str]]) -> str | None:
    if layer.kind == "parameter":
        return "a free parameter: no scheme to re-draw it with"
    for m in items:
        others = [k for k in shared.get(m.param.key, []) if k != m.param.key]
        already_zero = m.stats.constant and m.stats.max == 0 and m.param.role in ("bias", "norm_bias")
        if others and not already_zero:
            return f"{m.param.key} is shared with {others[0]}: re-drawing it would change that layer too"
        if m.param.is_weight and layer.kind not in ("embedding",) and m.recommended is None:
            return f"activation unknown: pass --activation (or --activation-for '{layer.name}=NAME')"
    return None


def _draw(layer: Layer, m: Measured, old: torch.Tensor, seed: int) -> torch.Tensor | None:
    role, param = m.param.role, m.param
    if role in ("bias", "norm_bias"):
        return torch.zeros_like(old)
    if role == "norm_weight":
        return torch.ones_like(old)
    if role != "weight":
        return None
    work = torch.float64 if old.dtype == torch.float64 else torch.float32
    swapped = _torch_layout_swapped(layer, param)
    shape = (old.shape[1], old.shape[0], *old.shape[2:]) if swapped else tuple(old.shape)
    fresh = torch.empty(shape, dtype=work)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_tensor_seed(seed, param.key))
        with torch.no_grad():
            if layer.kind == "embedding":
                torch.nn.init.normal_(fresh)  # nn.Embedding's own default
            else:
                m.recommended.draw(fresh)
    if swapped:
        fresh = fresh.transpose(0, 1)
    return fresh.to(old.dtype).contiguous()


def _torch_layout_swapped(layer: Layer, param: Param) -> bool:
    """Linear weights stored [in, out] (ONNX MatMul, Gemm without transB, HF Conv1D) are drawn as [out, in]."""
    return layer.kind == "linear" and param.unit_axis == 1


def _tensor_seed(seed: int, key: str) -> int:
    """Each tensor's draw depends on the seed and its name only, not on what else is fixed."""
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (2 ** 63)


def _scheme_name(m: Measured) -> str:
    if m.fingerprint is not None:
        return m.fingerprint.scheme
    if m.stats.non_finite:
        return "non-finite"
    return "zeros" if m.stats.constant and m.stats.max == 0 else "constant" if m.stats.constant else "-"


def _target(m: Measured) -> tuple[str, str]:
    """The scheme a tensor is re-drawn with, and the torch.nn.init call that draws it."""
    if m.param.role in ("bias", "norm_bias"):
        return "zeros", "zeros_()"
    if m.param.role == "norm_weight":
        return "ones", "ones_()"
    if m.recommended is not None:
        return m.recommended.scheme, m.recommended.call
    return "normal (nn.Embedding default)", "normal_()"


def ties(measured: list[Measured], views: dict | None = None) -> dict[str, list[str]]:
    """Keys that hold the same tensor: tied weights (one stats object) or one ONNX initializer."""
    groups: dict[object, list[str]] = {}
    for m in measured:
        view = views.get(m.param.key) if views else None
        ident = ("view", view.source, repr(view.index)) if view else ("stats", id(m.stats))
        groups.setdefault(ident, []).append(m.param.key)
    return {k: keys for keys in groups.values() if len(keys) > 1 for k in keys}



def repair(analysis: Analysis, all_layers: bool = False, only: list[str] | None = None,
           seed: int | None = None) -> FixResult:
    """Plan the repair of an analysed model: which layers, and their new tensors."""
    views = getattr(analysis.loaded.container, "views", None)
    chosen = targets(analysis.graph.layers, analysis.report, all_layers, only)
    return plan(analysis.measured, chosen, ties(analysis.measured, views), analysis.loaded.tensors.__getitem__,
                new_seed() if seed is None else seed)


def fix(module: torch.nn.Module, *, activation: str | None = None, activations: dict[str, str] | None = None,
        all_layers: bool = False, only: list[str] | None = None, seed: int | None = None,
        select: list[str] | None = None, ignore: list[str] | None = None, options: Options | None = None) -> FixResult:
    """Re-initialize, in place, the layers of `module` that have error or warning findings; return what changed.

    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = torch.nn.init.zeros_(model[0].weight)
    >>> [c.tensor for c in fix(model, seed=0)]
    ['0.weight', '0.bias']
    """
    from .loaders import modules
    from .writers import apply_to_module

    options = make_options(options, activation, activations, select, ignore)
    result = repair(analyse(modules.from_module(module, None), options), all_layers, only, seed)
    apply_to_module(module, result.tensors)
    return result
