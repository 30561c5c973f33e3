"""The pipeline: loader → layer graph → stats → rules → report."""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import rules as rulebook
from . import depth, schemes, stats, weight_state
from .config import Options
from .graph import UNIT_KINDS, Layer, LayerGraph, Param, annotate, context, group_layers
from .loaders import Loaded, load
from .report import Finding, LayerRow, Report


@dataclass
class Measured:
    """One audited tensor: its layer, stats, fingerprint and the recommended scheme."""

    layer: Layer
    param: Param
    stats: stats.TensorStats
    fingerprint: schemes.Fingerprint | None
    recommended: schemes.Recommendation | None
    facts: dict[str, Any]
    verdict: weight_state.TensorState | None = None  # fresh/trained, measured while the tensor was in memory


def build_graph(loaded: Loaded, options: Options) -> LayerGraph:
    shapes = {k: s for k, s in loaded.tensors.shapes.items()}
    layers = group_layers(shapes, loaded.modules)
    # sorted, not registered (a Hugging Face folder's names are put in natural order when read)
    names_sorted = loaded.format in ("safetensors", "hf-folder") or list(shapes) == sorted(shapes)
    downstream, order = context(layers, loaded.flow, names_sorted)
    return annotate(layers, downstream, options.activation, options.activations, hints=loaded.activations, **order)


def measure(loaded: Loaded, graph: LayerGraph) -> list[Measured]:
    """Stats, fingerprint and facts for every audited tensor; tied tensors are read once.

    Tensors are measured on every core at once (torch's kernels release the GIL; each runs on one
    thread meanwhile), and each one's memory is handed back to its file as soon as it is measured
    (`TensorSource.release`): everything that reads its values (stats, fingerprint, the fresh/trained
    fit) runs while it is in memory. Ties are told by storage only where the source holds every
    tensor (a lazily read tensor's freed memory may be reused by the next one); ONNX shares
    initializers on purpose and audits them once per layer that uses them. Tensors that hold no
    real numbers (`stats.auditable`) are skipped with one note per reason in `loaded.notes`.
    """
    repeats = Counter(block_pattern(layer.name) for layer in graph if layer.weighted)
    params = [(layer, param) for layer in graph for param in layer.params if param.role != "buffer"]
    first: dict[tuple, int] = {}  # a storage's identity -> the first param that reads it
    owner = {}
    for i, (_, param) in enumerate(params):
        ident = _identity(loaded.tensors[param.key]) if loaded.tensors.resident else (param.key,)
        owner[i] = first.setdefault(ident, i)
    jobs = sorted(set(owner.values()))
    results = _run_parallel(loaded, [(params[i][0], params[i][1], repeats[block_pattern(params[i][0].name)])
                                     for i in jobs])
    by_job = dict(zip(jobs, results))
    out: list[Measured] = []
    skipped: dict[str, list[str]] = {}
    biases: dict[str, torch.Tensor] = {}  # read once: a remote tensor costs a request
    for i, (layer, param) in enumerate(params):
        reason, measured = by_job[owner[i]]
        if reason is not None:
            skipped.setdefault(reason, []).append(param.key)
            continue
        st, fp, rec, verdict, kept = measured
        if kept is not None:
            biases[param.key] = kept
        n_blocks = repeats[block_pattern(layer.name)]
        if owner[i] != i:  # a tied tensor: its first name's stats, its own context
            param.shared_with = params[owner[i]][1].key
            fp, rec = _scheme(layer, param, st, stats.auditable(loaded.tensors[param.key])[0], n_blocks)
            verdict = None
        bias = _bias_of(loaded, layer, biases)
        out.append(Measured(layer, param, st, fp, rec, facts(graph, layer, param, st, fp, rec, bias, n_blocks), verdict))
    _add_recipe_shares(out)
    for reason, keys in skipped.items():
        note = f"not audited ({reason}): {_short(keys, 5)}"
        if note not in loaded.notes:
            loaded.notes.append(note)
    return out


def _scheme(layer: Layer, param: Param, st: stats.TensorStats, tensor: torch.Tensor | None,
            n_blocks: int) -> tuple[schemes.Fingerprint | None, schemes.Recommendation | None]:
    """A weight's fingerprint and the scheme recommended for it."""
    if not param.is_weight:
        return None, None
    fp = schemes.fingerprint(st, param.fan_in, param.fan_out, layer.kind, layer.activation,
                             tensor, param.hidden, n_blocks)
    role = "weight_hh" if "weight_hh" in param.key else "weight"
    return fp, schemes.recommend(layer.activation, param.fan_in, param.fan_out, layer.kind, param.hidden, role)


def _measure_one(loaded: Loaded, layer: Layer, param: Param, n_blocks: int,
                 split: bool = True) -> tuple[str | None, tuple | None]:
    """(why it is skipped, None) or (None, (stats, fingerprint, recommendation, fresh/trained verdict)) of one
    tensor, its memory handed back afterwards (`split`: as `stats.compute`'s)."""
    try:
        tensor, reason = stats.auditable(loaded.tensors[param.key])
        if tensor is None:
            return reason, None
        st = stats.compute(tensor, param.unit_axis, units=param.is_weight and layer.kind in UNIT_KINDS, split=split)
        fp, rec = _scheme(layer, param, st, tensor, n_blocks)
        verdict = weight_state.classify_any(st, tensor, param.unit_axis) if param.is_weight and layer.weighted else None
        kept = tensor.clone() if param.role == "bias" else None  # for dead-units, once the file's memory is back
        return None, (st, fp, rec, verdict, kept)
    finally:
        loaded.tensors.release(param.key)


PROGRESS_BYTES = 256 << 20  # a progress bar (on a terminal) for models at least this large


def _run_parallel(loaded: Loaded, jobs: list[tuple[Layer, Param, int]]) -> list[tuple[str | None, tuple | None]]:
    """`_measure_one` of every job, on every core, the largest first (the cores then finish together rather than
    one of them on a late large tensor); results in the jobs' order, a progress bar over bytes on a terminal.
    A tensor is itself split over the cores only where it holds at least a core's share of all the bytes:
    else the other cores are busy with other tensors, and splitting it would only oversubscribe them."""
    sizes = [loaded.tensors.nbytes(param.key) for _, param, _ in jobs]
    total = sum(sizes)
    n = stats.workers() if len(jobs) > 1 else 1
    share = total / stats.workers()
    threads = torch.get_num_threads()
    bar = _progress(total)
    pool = ThreadPoolExecutor(n, thread_name_prefix="initaudit-measure")
    try:
        if n > 1:
            torch.set_num_threads(1)  # one kernel thread per worker: the workers are the parallelism
        futures: list = [None] * len(jobs)
        for i in sorted(range(len(jobs)), key=lambda i: -sizes[i]):
            futures[i] = pool.submit(_measure_one, loaded, *jobs[i], sizes[i] >= share)
        job_of = {future: i for i, future in enumerate(futures)}
        for future in as_completed(futures):
            future.result()  # the first error stops the run
            bar(sizes[job_of[future]])
        return [future.result() for future in futures]
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the tensors not yet started are not read
        torch.set_num_threads(threads)
        bar(None)


def _progress(total: int):
    """An `advance(nbytes)` callable (None closes it): a rich progress bar on stderr when it is a terminal."""
    if total < PROGRESS_BYTES or not sys.stderr.isatty():
        return lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    progress = Progress("auditing", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        console=Console(stderr=True), transient=True)
    task = progress.add_task("audit", total=total)
    progress.start()

    def advance(n: int | None) -> None:
        if n is None:
            progress.stop()
        else:
            progress.advance(task, n)
    return advance


def _add_recipe_shares(measured: list[Measured]) -> None:
    """`recipe_share`: the share of the model's weighted layers drawn with a fixed std (normal 0.02 on every
    Linear, depth-scaled 0.02 on the projections: a recipe, not a per-layer choice); a near-tie with a fixed
    std among its names counts (normal 0.02 on a depthwise conv is also Xavier's std at some widths)."""
    def fixed(m: Measured) -> bool:
        return m.fingerprint is not None and "fixed" in m.fingerprint.family.split("|")

    weights = [m for m in measured if m.param.is_weight and m.layer.weighted and m.fingerprint is not None]
    share = sum(map(fixed, weights)) / len(weights) if weights else 0.0
    for m in measured:
        m.facts["recipe_share"] = share if fixed(m) else 0.0


def block_pattern(name: str) -> str:
    """'transformer.h.3.attn.c_proj' -> 'transformer.h.#.attn.c_proj': layers repeated once per block."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "#", name)


def _identity(tensor: torch.Tensor) -> tuple:
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
    except (RuntimeError, NotImplementedError):
        return (id(tensor),)


def _bias_of(loaded: Loaded, layer: Layer, read: dict[str, torch.Tensor]) -> torch.Tensor | None:
    bias = layer.param("bias")
    if bias is not None and bias.key in read:
        return read[bias.key]
    return stats.auditable(loaded.tensors[bias.key])[0] if bias is not None else None


def facts(graph: LayerGraph, layer: Layer, param: Param, st: stats.TensorStats,
          fp: schemes.Fingerprint | None, rec: schemes.Recommendation | None, bias: torch.Tensor | None,
          n_blocks: int = 1) -> dict[str, Any]:
    """Everything a rule may test about one tensor in its context (names: rules.FACTS).

    With the activation unknown a weight is held to the envelope of every common scheme (schemes.envelope):
    its expected std is the envelope's nearest edge, its own std when inside.
    """
    dead = st.zero_units
    if bias is not None and dead and bias.numel() == st.n_units:
        b = bias.detach().reshape(-1)
        dead = [u for u in dead if float(b[u]) <= 0]
    expected, expected_scheme = (rec.std, rec.scheme) if rec else (None, None)
    envelope_ratio = None
    if param.is_weight and layer.weighted and math.isfinite(st.std) and st.std > 0:
        bounds = schemes.envelope(param.fan_in, param.fan_out, layer.kind, param.hidden, n_blocks)
        edge, nearest = bounds.nearest(st.std)
        envelope_ratio = st.std / edge
        if rec is None:
            expected, expected_scheme = edge, f"{nearest} (activation unknown)"
    ratio = st.std / expected if expected and math.isfinite(st.std) else None
    groups = st.duplicate_groups
    bias_ratio = None
    if bias is not None and param.is_weight and param.fan_in and st.std > 0 and math.isfinite(st.std):
        bias_ratio = float(bias.detach().float().pow(2).mean().sqrt()) / (st.std * math.sqrt(param.fan_in))
    return {
        "layer": layer.name, "tensor": param.key, "role": param.role, "kind": layer.kind,
        "module_type": layer.module_type, "activation": str(layer.activation),
        "activation_family": layer.activation.family, "norm_after": layer.norm_after,
        "residual_after": layer.residual_after, "gate_after": layer.gate_after,
        "residual_branch": layer.residual_branch, "position": layer.position,
        "depth": graph.depth, "run_depth": layer.run_depth, "is_output": layer.is_output,
        "order_known": layer.order_known, "norm_folded": layer.norm_folded, "envelope_ratio": envelope_ratio,
        "is_last": layer.position == graph.depth - 1,
        "fan_in": param.fan_in, "fan_out": param.fan_out, "numel": st.numel, "units": st.n_units,
        "non_finite": st.non_finite, "nan": st.nan, "inf": st.inf, "mean": st.mean, "std": st.std,
        "min": st.min, "max": st.max, "abs_max": st.abs_max, "kurtosis": st.excess_kurtosis,
        "zero_fraction": st.zero_fraction, "distinct": st.distinct, "constant": st.constant,
        "value": st.min if st.constant else None, "zero_units": len(st.zero_units), "dead_units": len(dead),
        "dead_unit_list": _short(dead), "duplicate_units": st.duplicate_units, "duplicate_groups": len(groups),
        "duplicate_fraction": st.duplicate_units / st.n_units if st.n_units else 0.0,
        "substantial_duplicate_units": st.substantial_duplicate_units,
        "dead_fraction": len(dead) / st.n_units if st.n_units else 0.0,
        "peak_share": _peak_share(st),
        "duplicate_example": _short(groups[0]) if groups else None,
        "scheme": fp.scheme if fp else None, "scheme_family": fp.family if fp else None,
        "scheme_gain": fp.gain if fp else None, "scheme_fan": fp.fan if fp else None,
        "scheme_ambiguous": fp.ambiguous if fp else False,
        rulebook.ALTERNATIVES: [{"scheme": a.scheme, "scheme_family": a.family, "scheme_gain": a.gain,
                                 "scheme_fan": a.fan, "implied_std": a.implied_std} for a in fp.alternatives] if fp else [],
        "implied_std": fp.implied_std if fp else None,
        "expected_scheme": expected_scheme,
        "expected_std": expected, "expected_call": rec.call if rec else None,
        "std_ratio": ratio, "variance_gain": ratio * ratio if ratio is not None else None,
        "shared": param.shared_with is not None, "bias_ratio": bias_ratio,
    }


def _peak_share(st: stats.TensorStats) -> float | None:
    """The share of the tensor's squared deviations its largest entry holds."""
    if not st.std > 0:
        return None
    peak = max(abs(st.max - st.mean), abs(st.min - st.mean))
    return min(peak * peak / (st.finite * st.std * st.std), 1.0)


def _short(units: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, units[:most]))
    return shown + (f", … ({len(units)} in all)" if len(units) > most else "")


def evaluate(measured: list[Measured], rules: list[rulebook.Rule], options: Options) -> list[Finding]:
    findings = []
    for m in measured:
        if m.param.shared_with is not None:
            continue  # a tied tensor is reported once, under its first name
        for rule in rules:
            severity = rule.verdict(m.facts)
            if severity is None or options.ignored(m.layer.name, rule.name, rule.code):
                continue
            findings.append(Finding(
                rule=rule.name, code=rule.code, severity=severity, layer=m.layer.name, tensor=m.param.key,
                message=rule.render(m.facts), expected=_plain(m.facts.get(rule.expected)) if rule.expected else None,
                actual=_plain(m.facts.get(rule.actual)) if rule.actual else None, fix=_fix_text(rule, m),
                origin=m.facts.get("origin") if rule.name in depth.RULES else None))
    order = {s: i for i, s in enumerate(reversed(rulebook.SEVERITIES))}
    return sorted(findings, key=lambda f: (order[f.severity], f.code))


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fix_text(rule: rulebook.Rule, m: Measured) -> str | None:
    if rule.fix == "zeros" or (rule.fix == "reinit" and m.param.role in ("bias", "norm_bias")):
        return "zeros_()"
    if m.param.role == "norm_weight":
        return "ones_()"
    if m.param.role == "parameter":
        return None  # a free parameter has no scheme to re-draw it with
    if rule.fix == "reinit":
        return m.recommended.call if m.recommended else "re-draw with a random scheme (activation unknown: pass --activation)"
    return None


def layer_rows(measured: list[Measured]) -> list[LayerRow]:
    rows = []
    for m in measured:
        if not m.param.is_weight:
            continue
        rows.append(LayerRow(
            name=m.layer.name, kind=m.layer.kind, fan_in=m.param.fan_in, fan_out=m.param.fan_out,
            activation=str(m.layer.activation), std=m.stats.std, expected_std=m.facts["expected_std"],
            scheme=m.fingerprint.scheme if m.fingerprint else "unknown", tensor=m.param.key,
            norm_after=m.layer.norm_after, run_depth=m.layer.run_depth, state=m.facts.get("layer_state", "unknown"),
            fit=_fit_evidence(m.fingerprint),
            predicted_gain=m.facts.get("predicted_gain"), predicted_scale=m.facts.get("predicted_scale"),
            predicted_grad_scale=m.facts.get("predicted_grad_scale")))
    return rows


def _fit_evidence(fp: schemes.Fingerprint | None) -> dict[str, Any] | None:
    """Why the fingerprint names what it names: the shape, implied std and std z-score of the named scheme,
    the runner-up's, and a near-tie's names (JSON-safe: no NaN)."""
    if fp is None:
        return None
    out = {"shape": fp.shape, "implied_std": fp.implied_std, "gain": fp.gain, "fan": fp.fan, **fp.evidence}
    return {k: v for k, v in out.items() if v not in ("", None) and not (isinstance(v, float) and not math.isfinite(v))}


def depth_weights(measured: list[Measured]) -> dict[str, depth.Weights]:
    """Each weighted layer's fans and second moments (E[w²], E[b²]), for the depth analysis."""
    out, biases = {}, {}
    for m in measured:
        moment = m.stats.std ** 2 + m.stats.mean ** 2
        if m.param.role == "bias":
            biases[m.layer.name] = moment
        elif m.param is m.layer.param("weight") and m.layer.weighted:
            out[m.layer.name] = depth.Weights(m.param.fan_in, m.param.fan_out, moment)
    return {name: depth.Weights(w.fan_in, w.fan_out, w.second_moment, biases.get(name, 0.0))
            for name, w in out.items() if math.isfinite(w.second_moment)}


def predict_depth(loaded: Loaded, graph: LayerGraph, measured: list[Measured],
                  band: tuple[float, float]) -> dict[str, depth.LayerDepth]:
    """The depth analysis (initaudit.depth): each weighted layer's predicted gain and scales, as facts of its weight."""
    found = depth.predict(graph, loaded.flow, depth_weights(measured))
    forward, backward = depth.judged(list(graph), {n: d.scale for n, d in found.items()},
                                     {n: d.grad_scale for n, d in found.items()}, band)
    for m in measured:
        if m.param is m.layer.param("weight") and m.layer.weighted:
            m.facts.update(depth.facts(m.layer, found.get(m.layer.name), forward, backward))
    return found


@dataclass
class Analysis:
    """Everything one pass produced: the graph, the measured tensors and the report (the fixer needs all three)."""

    loaded: Loaded
    graph: LayerGraph
    measured: list[Measured]
    report: Report
    options: Options | None = None


def analyse(loaded: Loaded, options: Options, rules: list[rulebook.Rule] | None = None) -> Analysis:
    """Audit an already loaded model."""
    rules = rulebook.select(rules if rules is not None else rulebook.builtin_rules(), options.select, options.ignore)
    graph = build_graph(loaded, options)
    measured = measure(loaded, graph)
    state = weight_state.assess(loaded, measured, options.state)
    weight_state.apply(measured, state)
    predict_depth(loaded, graph, measured, options.signal_band)
    aside = weight_state.set_aside(measured, rules, state)
    notes = list(loaded.notes)
    if options.activation is not None or options.activations:
        notes = [n for n in notes if "activations are unknown" not in n]
    notes += [line for line in [weight_state.note(state, aside)] if line]
    report = Report(model=loaded.name, format=loaded.format,
                    layers=layer_rows(measured), findings=evaluate(measured, rules, options), notes=notes,
                    weights_state=state.state, state_evidence={**state.evidence(), "rules_set_aside": aside})
    return Analysis(loaded, graph, measured, report, options)


def run(loaded: Loaded, options: Options, rules: list[rulebook.Rule] | None = None) -> Report:
    return analyse(loaded, options, rules).report


def make_options(options: Options | None = None, activation: str | None = None,
                 activations: dict[str, str] | None = None, select: list[str] | None = None,
                 ignore: list[str] | None = None, state: str | None = None) -> Options:
    """Options for the Python API: keyword arguments over `options` (or the defaults)."""
    from .activations import parse

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
        from .loaders import modules
        loaded = modules.from_module(target, None)
    else:
        loaded = load(target, trust_pickle=trust_pickle, factory=model, optimizer_state=optimizer_state)
    return run(loaded, options)
