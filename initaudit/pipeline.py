"""The pipeline, one way through the stages: load → flow (the layer graph) → measure → judge → report; and the
Python API's `audit()`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from initaudit.config import Options
from initaudit.flow.layers import annotate, context, group_layers
from initaudit.flow.layer import LayerGraph
from initaudit.judge import rules as rulebook
from initaudit.judge.conventions import add_convention_facts
from initaudit.judge.declared import add_declared_facts, declarations
from initaudit.judge.evaluate import evaluate, layer_rows, set_aside
from initaudit.judge.facts import (add_block_zeros, add_recipe_shares, add_zero_feeds, effective_stats, signal_facts,
                                   tensor_facts)
from initaudit.judge.relations import relate
from initaudit.judge.report import Coverage, Report
from initaudit.load.dispatch import load
from initaudit.load.source import Loaded
from initaudit.load.containers import file_signs, optimizer_tensors, packed_tensors
from initaudit.measure import depth, weight_state
from initaudit.measure.summary import Finished
from initaudit.measure.tensors import Measured, Pass, measure, measure_summaries


def build_graph(loaded: Loaded, options: Options) -> LayerGraph:
    """The layer graph of a loaded model, each layer with its context (activation, norms, depth)."""
    shapes = {k: s for k, s in loaded.tensors.shapes.items()}
    layers = group_layers(shapes, loaded.modules)
    # sorted, not registered (a Hugging Face folder's names are put in natural order when read)
    names_sorted = loaded.format in ("safetensors", "hf-folder") or list(shapes) == sorted(shapes)
    downstream, order = context(layers, loaded.flow, names_sorted)
    return annotate(layers, downstream, options.activation, options.activations, hints=loaded.activations, **order)


def measure_and_describe(loaded: Loaded, graph: LayerGraph, measured_from: dict[str, Finished | str] | None = None) -> Pass:
    """Every audited tensor measured, with its facts; those left out are in the pass's `skipped` (`measured_from`:
    merged summaries of the tensors, measure/summary.py, read instead of the tensors)."""
    done = measure(loaded.tensors, graph) if measured_from is None else measure_summaries(measured_from, graph)
    for m in done.measured:
        m.facts = tensor_facts(graph, m)
    add_recipe_shares(done.measured)
    add_block_zeros(done.measured)
    flow = loaded.flow
    add_zero_feeds(done.measured, flow.next_layers() if flow is not None and flow.sees_activations else {})
    return done


def kept_values(measured: list[Measured]) -> Callable[[str], torch.Tensor | None]:
    """A tensor's values where its summary kept them whole (small tensors, biases, norms), else None."""
    values = {m.param.key: m.samples.values for m in measured if m.samples is not None}
    return values.get


def coverage(loaded: Loaded, done: Pass) -> Coverage:
    """What of the model was audited: its stored tensors, those the loader left out, the optimizer's state."""
    skipped = {**{(kind, reason): list(keys) for (kind, reason), keys in loaded.unread.items()}, **done.skipped}
    root = getattr(loaded.container, "root", None)
    trail = getattr(loaded.container, "path", ())  # a torch checkpoint's keys down to its state_dict
    packed = packed_tensors(root, trail) if isinstance(trail, tuple) else []
    if packed:
        skipped[("packed weight", "packed in a quantized layer's parameters: not audited yet")] = packed
    optimizer = optimizer_tensors(root)
    if optimizer:
        skipped[("optimizer tensor", "an optimizer's state, taken as a sign of training, not audited")] = optimizer
    return Coverage.of(list(loaded.tensors.shapes), done.audited, skipped)


def depth_weights(measured: list[Measured]) -> dict[str, depth.Weights]:
    """Each weighted layer's fans and second moments (E[w²], E[b²]) of the weight the forward pass uses (times the
    layer's `weight_scale`), for the depth analysis."""
    out, biases = {}, {}
    for m in measured:
        st = effective_stats(m)
        moment = st.std ** 2 + st.mean ** 2
        if m.param.role == "bias":
            biases[m.layer.name] = moment
        elif m.param is m.layer.param("weight") and m.layer.weighted:
            out[m.layer.name] = depth.Weights(*m.param.signal_fans, moment)
    return {name: depth.Weights(w.fan_in, w.fan_out, w.second_moment, biases.get(name, 0.0))
            for name, w in out.items() if math.isfinite(w.second_moment)}


def norm_gains(measured: list[Measured]) -> dict[str, float]:
    """Each norm's E[γ²] of the gain it scales by (1 + w where the norm adds one: Gemma's), for the depth analysis;
    left out where the convention is unknown and the gain all zero (x·w or x·(1+w): the file cannot tell)."""
    out = {}
    for m in measured:
        if m.layer.kind != "norm" or m.param.role != "norm_weight" or m.stats.non_finite or not m.stats.finite:
            continue
        st, offset = effective_stats(m), m.layer.gain_offset
        if offset is None and m.stats.zero_fraction >= 0.999:
            continue
        out[m.layer.name] = st.std ** 2 + (st.mean + (1.0 if offset else 0.0)) ** 2
    return {name: gain for name, gain in out.items() if math.isfinite(gain)}


def predict_depth(loaded: Loaded, graph: LayerGraph, measured: list[Measured],
                  band: tuple[float, float]) -> dict[str, depth.LayerDepth]:
    """The depth analysis (measure/depth.py): each weighted layer's predicted gain and scales, as facts of its weight."""
    found = depth.predict(graph, loaded.flow, depth_weights(measured), norm_gains(measured))
    depth.judge_streams(found, band)
    forward, backward = depth.judged(list(graph), {n: d.scale for n, d in found.items()},
                                     {n: d.grad_scale for n, d in found.items()}, band,
                                     {n for n, d in found.items() if d.after_norm})
    for m in measured:
        if m.param is m.layer.param("weight") and m.layer.weighted:
            m.facts.update(signal_facts(m.layer, found.get(m.layer.name), forward, backward))
    return found


@dataclass
class Analysis:
    """Everything one pass produced: the graph, the measured tensors and the report (the fixer needs all three)."""

    loaded: Loaded
    graph: LayerGraph
    measured: list[Measured]
    report: Report
    options: Options | None = None


def analyse(loaded: Loaded, options: Options, rules: list[rulebook.Rule] | None = None,
            measured_from: dict[str, Finished | str] | None = None) -> Analysis:
    """Audit an already loaded model; `measured_from`: its tensors' merged summaries (measure/summary.py: shards of a
    live model, a checkpoint fanned out), read instead of its tensors (each key: what its summaries finished into,
    or why it is not measured)."""
    rules = rulebook.select(rules if rules is not None else rulebook.builtin_rules(), options.select, options.ignore)
    graph = build_graph(loaded, options)
    done = measure_and_describe(loaded, graph, measured_from)
    measured = done.measured
    source = loaded.tensors if measured_from is None else None
    relate(measured, source, loaded.ties, live=loaded.module is not None)
    signs = file_signs(getattr(loaded.container, "root", None))
    state = weight_state.assess(loaded.tensors, measured, signs, options.state)
    weight_state.apply(measured, state)
    add_declared_facts(measured, options.expect, options.recipes, loaded.declared_init)
    flow_seen = loaded.flow is not None and loaded.flow.sees_activations
    for m in measured:
        m.facts["flow_seen"] = flow_seen
    add_convention_facts(measured, loaded.tensors.__getitem__ if source is not None else kept_values(measured))
    predict_depth(loaded, graph, measured, options.signal_band)
    aside = set_aside(measured, rules)
    notes = list(loaded.notes)
    if options.activation is not None or options.activations:
        notes = [n for n in notes if "activations are unknown" not in n]
    notes += [line for line in [weight_state.note(state, aside)] if line]
    report = Report(model=loaded.name, format=loaded.format,
                    layers=layer_rows(measured), findings=evaluate(measured, rules, options.ignored), notes=notes,
                    weights_state=state.state, state_evidence={**state.evidence(), "rules_set_aside": aside},
                    declared=declarations(options.expect, options.recipes, loaded.declared_init),
                    coverage=coverage(loaded, done))
    return Analysis(loaded, graph, measured, report, options)


def run(loaded: Loaded, options: Options, rules: list[rulebook.Rule] | None = None) -> Report:
    """The report of an already loaded model."""
    return analyse(loaded, options, rules).report


def make_options(options: Options | None = None, activation: str | None = None,
                 activations: dict[str, str] | None = None, select: list[str] | None = None,
                 ignore: list[str] | None = None, state: str | None = None) -> Options:
    """Options for the Python API: keyword arguments over `options` (or the defaults)."""
    from initaudit.flow.activations import parse

    options = options or Options()
    if activation is not None:
        options.activation = parse(activation)
    if activations:
        options.activations = {**options.activations, **{k: parse(v) for k, v in activations.items()}}
    options.select = select if select is not None else options.select
    options.ignore = ignore if ignore is not None else options.ignore
    options.state = state if state is not None else options.state
    return options


def audit(target: str | Path | torch.nn.Module | None = None, *, model: str | None = None,
          activation: str | None = None, activations: dict[str, str] | None = None,
          trust_pickle: bool = False, select: list[str] | None = None, ignore: list[str] | None = None,
          state: str | None = None, optimizer_state: bool = False, options: Options | None = None) -> Report:
    """Audit a model file, a live `nn.Module`, or a module built by `model='package.module:factory'`.

    >>> report = audit(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
    >>> report.summary["errors"]
    0

    `state` ('auto', 'fresh' or 'trained') overrides the fresh/trained verdict on the weights;
    `optimizer_state` audits a distributed checkpoint's optimizer state too (health rules only apply to it).
    """
    options = make_options(options, activation, activations, select, ignore, state)
    if isinstance(target, torch.nn.Module):
        from initaudit.load import modules
        loaded = modules.from_module(target, None)
    else:
        loaded = load(target, trust_pickle=trust_pickle, factory=model, optimizer_state=optimizer_state)
    return run(loaded, options)
