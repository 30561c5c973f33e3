"""Repair: re-draw flagged weights with the scheme the selection guide recommends, using torch.nn.init itself.

The unit of repair is a layer: its weights are re-drawn, its biases set to zeros (norm layers:
weights to ones). A layer is skipped, with the reason, when re-drawing would be a guess: it is a
free parameter, or its weight is shared with another layer.

Fix never destroys a model: weights that look trained (initaudit.weight_state) are re-drawn only
with `force`; even then the output (classifier) layer of trained weights is left alone unless
named with `only`, and a trained layer whose only faults are single units (copies, dead units)
gets just those units re-drawn. A layer whose activation is unknown gets a fallback instead of a refusal: the
scheme the rest of the (fresh) model was drawn with, else torch's own default for the layer type
(Linear/Conv: kaiming_uniform_(a=sqrt(5)); attention in-projections: xavier_uniform_). What was
drawn is audited again, and the result says which findings are gone.
"""

from __future__ import annotations

import fnmatch
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from initaudit.measure import depth, recipes, schemes, stats
from initaudit.measure.tensors import Measured, block_pattern
from initaudit.pipeline import Analysis, analyse, make_options
from initaudit.config import Options
from initaudit.common.errors import InputError
from initaudit.flow.layer import Layer, Param
from initaudit.load.source import TensorSource
from initaudit.judge.report import Finding, Report
from initaudit.measure.schemes import Recommendation

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
    trained: list[str] = field(default_factory=list)     # re-drawn layers whose weights looked trained (--force)
    resolved: list[Finding] = field(default_factory=list)  # error/warning findings on re-drawn layers now gone
    remaining: list[Finding] = field(default_factory=list)  # and those the re-audit still finds
    # initaudit.depth, per source ("predicted"; "measured" with fix --probe): (before, after), each a list of
    # (layer, forward scale, gradient scale) in forward order
    depth: dict[str, tuple[list, list]] = field(default_factory=dict)

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
    if any(f.rule in depth.RULES for f in report.findings if f.severity in FIXED_SEVERITIES):
        # the signal is lost (or blows up) through the whole stack, not on the one layer where it leaves the band
        flagged |= {layer.name for layer in depth.judged_layers(layers) if not layer.is_output}
    return [layer for layer in repairable if layer.name in flagged]


def plan(measured: list[Measured], chosen: list[Layer], shared: dict[str, list[str]],
         read, seed: int, units: dict[str, list[int]] | None = None) -> FixResult:
    """Draw the new tensors of the chosen layers; `read(key)` gives the current tensor; `units[layer]`
    limits a layer's re-draw to those output units (the rest of its tensors is kept)."""
    result = FixResult(seed)
    by_layer: dict[str, list[Measured]] = {}
    for m in measured:
        by_layer.setdefault(m.layer.name, []).append(m)
    model_scheme = _common_scheme(measured)
    by_pattern: dict[str, list[Measured]] = {}
    for m in measured:
        by_pattern.setdefault(block_pattern(m.layer.name), []).append(m)
    for layer in chosen:
        items = by_layer.get(layer.name, [])
        reason = _why_not(layer, items, shared)
        if reason:
            result.skipped.append(Skipped(layer.name, reason))
            continue
        for m in items:
            old = read(m.param.key)
            declared = m.facts.get("recipe")
            rec = (recipes.parse(declared).recommendation(m.param.fan_in, m.param.fan_out) if declared else
                   _like_siblings(m, by_pattern, chosen) or m.recommended
                   or _fallback(m, _common_scheme(by_pattern[block_pattern(layer.name)]) or model_scheme))
            new = _draw(layer, m, rec, old, seed)
            only_units = (units or {}).get(layer.name)
            if new is not None and only_units:
                new = _on_units(old, new, m.param.unit_axis, only_units)
            if new is None or torch.equal(new, old):
                continue
            result.tensors[m.param.key] = new
            st = stats.compute(new, m.param.unit_axis, units=False)
            scheme, call = _target(m, rec)
            if only_units:
                call += f" on units {', '.join(map(str, only_units[:8]))}{', …' if len(only_units) > 8 else ''} only"
            result.changes.append(Change(layer.name, m.param.key, _scheme_name(m), m.stats.std, scheme, st.std, call))
    return result


def _like_siblings(m: Measured, by_pattern: dict[str, list[Measured]], chosen: list[Layer]) -> Recommendation | None:
    """The scheme of the same layer in the model's other blocks, where those are not re-drawn themselves: a layer
    re-drawn otherwise would be off its siblings (sibling-scale-mismatch)."""
    pattern, redrawn = block_pattern(m.layer.name), {layer.name for layer in chosen}
    if pattern == m.layer.name:
        return None
    siblings = _common_scheme([s for s in by_pattern[pattern] if s.layer.name not in redrawn])
    return _fallback(m, siblings) if siblings is not None else None


def _why_not(layer: Layer, items: list[Measured], shared: dict[str, list[str]]) -> str | None:
    if layer.kind == "parameter":
        return "a free parameter: no scheme to re-draw it with"
    for m in items:
        if m.param.parts:
            return f"a {m.param.parametrization} weight, computed from {', '.join(m.param.parts)}: not re-drawn"
        others = [k for k in shared.get(m.param.key, []) if k != m.param.key]
        already_zero = m.stats.constant and m.stats.max == 0 and m.param.role in ("bias", "norm_bias")
        if others and not already_zero:
            return f"{m.param.key} is shared with {others[0]}: re-drawing it would change that layer too"
    return None


def _reproducible(fp: schemes.Fingerprint) -> bool:
    """A single named scheme that torch.nn.init can draw again on another layer."""
    return not fp.ambiguous and (fp.family in ("kaiming", "lecun", "xavier") and fp.shape in ("normal", "uniform")
                                 or fp.family in ("torch-default", "orthogonal", "fixed"))


def _common_scheme(measured: list[Measured]) -> tuple[schemes.Fingerprint, int, int] | None:
    """The scheme most of these fresh Linear/Conv weights were drawn with, if most share one (with the fans of a
    layer drawn with it)."""
    seen = [(m.fingerprint, m.param.fan_in, m.param.fan_out) for m in measured
            if m.param.is_weight and m.fingerprint is not None and m.facts.get("state") == "fresh"
            and m.layer.kind.startswith(("linear", "conv")) and m.param.fan_in and m.param.fan_out]
    counts = Counter(fp.scheme for fp, _, _ in seen if _reproducible(fp))
    if not counts:
        return None
    scheme, count = counts.most_common(1)[0]
    if 2 * count < len(seen):
        return None
    return next(item for item in seen if item[0].scheme == scheme)


def _like(model: tuple[schemes.Fingerprint, int, int], fan_in: int, fan_out: int) -> Recommendation:
    """The model's own scheme (family, shape, gain and fan mode as fingerprinted) drawn for a layer of these fans."""
    fp, model_in, model_out = model
    basis = f"activation unknown: the scheme the model draws such layers with ({fp.scheme})"
    gain_of = fp.gain or ("relu" if fp.family == "kaiming" else "linear")
    gain = schemes.GAINS.get(gain_of, 1.0)
    if fp.family in ("kaiming", "lecun"):
        mode = fp.fan if fp.fan in ("fan_in", "fan_out") else "fan_in"
        std = gain / math.sqrt(fan_in if mode == "fan_in" else fan_out)
        return Recommendation(fp.scheme, std, f"kaiming_{fp.shape}_", (("mode", mode), ("nonlinearity", gain_of)), basis)
    if fp.family == "xavier":
        kwargs = () if gain == 1.0 else (("gain", gain),)
        return Recommendation(fp.scheme, gain * math.sqrt(2 / (fan_in + fan_out)), f"xavier_{fp.shape}_", kwargs, basis,
                              None if gain == 1.0 else gain_of)
    if fp.family == "orthogonal":  # orthogonal_(gain=g) draws std g/sqrt(max(rows, columns))
        gain = fp.implied_std * math.sqrt(max(model_in, model_out))
        kwargs = () if abs(gain - 1) < 1e-3 else (("gain", gain),)
        return Recommendation(fp.scheme, gain / math.sqrt(max(fan_in, fan_out)), "orthogonal_", kwargs, basis)
    if fp.family == "fixed":
        if fp.shape == "normal":
            return Recommendation(fp.scheme, fp.implied_std, "normal_", (("std", fp.implied_std),), basis)
        sigma = fp.implied_std / schemes.TRUNC_2SIGMA_STD
        return Recommendation(fp.scheme, fp.implied_std, "trunc_normal_", (("std", sigma), ("a", -2 * sigma), ("b", 2 * sigma)),
                              basis)
    return Recommendation("torch-default", 1 / math.sqrt(3 * fan_in), "kaiming_uniform_", (("a", math.sqrt(5)),), basis)


def _fallback(m: Measured, model_scheme: tuple[schemes.Fingerprint, int, int] | None) -> Recommendation | None:
    """For a weight whose activation is unknown: the scheme the same layer of the model's other blocks uses
    (`transformer.h.#.mlp.c_fc`), else the one the rest of the model uses, else torch's default."""
    if not m.param.is_weight or m.layer.kind == "embedding":
        return None
    fan_in, fan_out = max(m.param.fan_in, 1), max(m.param.fan_out, 1)
    if model_scheme is not None:
        return _like(model_scheme, fan_in, fan_out)
    if m.layer.kind == "attention":
        return Recommendation("xavier-uniform", math.sqrt(2 / (fan_in + fan_out)), "xavier_uniform_", (),
                              "activation unknown: torch's default for attention in-projections")
    return Recommendation("torch-default", 1 / math.sqrt(3 * fan_in), "kaiming_uniform_", (("a", math.sqrt(5)),),
                          "activation unknown: torch's default for the layer type")


def _on_units(old: torch.Tensor, new: torch.Tensor, unit_axis: int, units: list[int]) -> torch.Tensor:
    """`old` with just these output units taken from `new`."""
    axis = unit_axis if old.dim() > 1 else 0
    idx = torch.tensor(units, dtype=torch.long)
    return old.clone().index_copy_(axis, idx, new.index_select(axis, idx))


UNIT_RULES = frozenset({"duplicate-units", "dead-units"})  # faults of single units: on trained weights only those are re-drawn


def _unit_repairs(analysis: Analysis, layers: list[Layer], state: dict[str, str | None]) -> dict[str, list[int]]:
    """Trained layers whose only findings are unit faults: the units to re-draw (copies after the first, dead units)."""
    flagged: dict[str, set[str]] = {}
    for f in analysis.report.findings:
        if f.severity in FIXED_SEVERITIES:
            flagged.setdefault(f.layer, set()).add(f.rule)
    out = {}
    for m in analysis.measured:
        rules = flagged.get(m.layer.name, set())
        if not m.param.is_weight or state.get(m.layer.name) != "trained" or not rules or not rules <= UNIT_RULES:
            continue
        units = set(m.stats.zero_units) if "dead-units" in rules else set()
        if "duplicate-units" in rules:
            units |= {u for g in m.stats.duplicate_groups[m.stats.negligible_groups:] for u in g[1:]}
        if units:
            out[m.layer.name] = sorted(units)
    return {name: units for name, units in out.items() if any(layer.name == name for layer in layers)}


def _draw(layer: Layer, m: Measured, rec: Recommendation | None, old: torch.Tensor, seed: int) -> torch.Tensor | None:
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
                rec.draw(fresh)
    if swapped:
        fresh = fresh.transpose(0, 1)
    return fresh.to(old.dtype).contiguous()


def _torch_layout_swapped(layer: Layer, param: Param) -> bool:
    """Linear weights stored [in, out] (ONNX MatMul, Gemm without transB, HF Conv1D) are drawn as [out, in]."""
    return layer.kind == "linear" and param.unit_axis == 1


def _tensor_seed(seed: int, key: str) -> int:
    """Each tensor's draw depends on the seed and its name only, not on what else is fixed."""
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode("utf-8", "surrogatepass"))) % (2 ** 63)


def _scheme_name(m: Measured) -> str:
    if m.fingerprint is not None:
        return m.fingerprint.scheme
    if m.stats.non_finite:
        return "non-finite"
    return "zeros" if m.stats.constant and m.stats.max == 0 else "constant" if m.stats.constant else "-"


def _target(m: Measured, rec: Recommendation | None) -> tuple[str, str]:
    """The scheme a tensor is re-drawn with, and the torch.nn.init call that draws it."""
    if m.param.role in ("bias", "norm_bias"):
        return "zeros", "zeros_()"
    if m.param.role == "norm_weight":
        return "ones", "ones_()"
    if rec is not None:
        return rec.scheme + (" (fallback)" if rec is not m.recommended else ""), rec.call
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
           seed: int | None = None, force: bool = False) -> FixResult:
    """Plan the repair of an analysed model: which layers, and their new tensors; then audit what was drawn.

    Raises InputError (naming the layers and `force`) when a layer to re-draw looks trained.
    """
    views = getattr(analysis.loaded.container, "views", None)
    state = {m.layer.name: m.facts.get("state") for m in analysis.measured}
    chosen, kept = [], []
    last = max((layer.position for layer in analysis.graph.layers if layer.weighted), default=-1)
    for layer in targets(analysis.graph.layers, analysis.report, all_layers, only):
        output = layer.is_output or (layer.weighted and layer.position == last)
        named = only and any(fnmatch.fnmatchcase(layer.name, p) for p in only)
        if state.get(layer.name) == "trained" and output and not named:
            kept.append(Skipped(layer.name, "the output layer of trained weights is never re-drawn by default "
                                            f"(name it with --only '{layer.name}' to re-draw it)"))
        else:
            chosen.append(layer)
    units = {} if all_layers or only else _unit_repairs(analysis, chosen, state)
    result = plan(analysis.measured, chosen, ties(analysis.measured, views), analysis.loaded.tensors.__getitem__,
                  new_seed() if seed is None else seed, units)
    result.skipped[:0] = kept
    result.trained = sorted({c.layer for c in result.changes if state.get(c.layer) == "trained"})
    if result.trained and not force:
        shown = ", ".join(result.trained[:6]) + (f", … ({len(result.trained)} in all)" if len(result.trained) > 6 else "")
        raise InputError(f"refusing to re-draw layers whose weights look trained ({shown}): that would discard what "
                         "they learned; pass --force to re-draw them anyway")
    if result.changes:
        _reaudit(analysis, result)
    return result


def _reaudit(analysis: Analysis, result: FixResult) -> None:
    """Audit the model with the new tensors in place: which findings on the re-drawn layers are gone."""
    src = analysis.loaded.tensors
    patched = TensorSource(src.shapes, lambda key: result.tensors[key] if key in result.tensors else src[key], src.resident,
                           release=src.release)
    again = analyse(replace(analysis.loaded, tensors=patched), analysis.options or Options()).report
    layers = {c.layer for c in result.changes}

    def serious(report: Report) -> list[Finding]:
        return [f for f in report.findings if f.layer in layers and f.severity in FIXED_SEVERITIES]

    after = {(f.rule, f.tensor) for f in serious(again)}
    result.resolved = [f for f in serious(analysis.report) if (f.rule, f.tensor) not in after]
    result.remaining = serious(again)
    result.depth["predicted"] = (depth_rows(analysis.report), depth_rows(again))


def depth_rows(report: Report) -> list[tuple[str, float | None, float | None]]:
    """(layer, predicted forward scale, predicted gradient scale) of a report's layers, in order."""
    return [(row.name, row.predicted_scale, row.predicted_grad_scale) for row in report.layers]


def fix(module: torch.nn.Module, *, activation: str | None = None, activations: dict[str, str] | None = None,
        all_layers: bool = False, only: list[str] | None = None, seed: int | None = None,
        select: list[str] | None = None, ignore: list[str] | None = None, state: str | None = None,
        force: bool = False, options: Options | None = None) -> FixResult:
    """Re-initialize, in place, the layers of `module` that have error or warning findings; return what changed.

    Weights that look trained are re-drawn only with `force` (else InputError, the module untouched).

    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = torch.nn.init.zeros_(model[0].weight)
    >>> [c.tensor for c in fix(model, seed=0)]
    ['0.weight', '0.bias']
    """
    from initaudit.load import modules
    from initaudit.repair.writers import apply_to_module

    options = make_options(options, activation, activations, select, ignore, state)
    result = repair(analyse(modules.from_module(module, None), options), all_layers, only, seed, force)
    apply_to_module(module, result.tensors)
    return result
