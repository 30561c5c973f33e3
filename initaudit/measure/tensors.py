"""The measuring pass: every audited tensor of a layer graph read once, on every core, into its statistics,
fingerprint, recommended scheme and fresh/trained verdict. It reads tensors through anything shaped like a
loader's `TensorSource` and judges nothing: the facts the rules test are made from what it returns."""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from initaudit.common.progress import byte_bar
from initaudit.flow.layer import UNIT_KINDS, Layer, LayerGraph, Param
from initaudit.flow.layers import SPECTRAL_NORM, WEIGHT_NORM, not_audited_reason
from initaudit.measure import schemes, stats, weight_state
from initaudit.measure.samples import Samples
from initaudit.measure.summary import Finished


class Tensors(Protocol):
    """What the pass reads tensors through (a loader's TensorSource)."""

    resident: bool

    def __getitem__(self, key: str) -> torch.Tensor: ...

    def nbytes(self, key: str) -> int: ...

    def release(self, key: str) -> None: ...


@dataclass
class Measured:
    """One audited tensor: its layer, stats, fingerprint, the recommended scheme, and (once judged) its facts."""

    layer: Layer
    param: Param
    stats: stats.TensorStats
    fingerprint: schemes.Fingerprint | None
    recommended: schemes.Recommendation | None
    bias: torch.Tensor | None = None     # the layer's bias, for dead units
    n_blocks: int = 1                    # how many blocks repeat this layer
    verdict: weight_state.TensorState | None = None  # fresh/trained, measured while the tensor was in memory
    facts: dict[str, Any] = field(default_factory=dict)
    samples: Samples | None = None       # what the fingerprint and the fresh/trained test read of it
    digest: str | None = None            # of its merged summary (equal values, equal digests), where measured so


@dataclass
class Pass:
    """What one pass over a model's tensors gives: the measured tensors, the stored tensors they were read from,
    and the ones not audited ((kind, reason) -> keys)."""

    measured: list[Measured]
    skipped: dict[tuple[str, str], list[str]]
    audited: set[str] = field(default_factory=set)


class Effective:
    """A source's tensors, where a parametrized weight's key (`Param.parts`) reads the weight its module computes
    (weight norm: g·v/‖v‖; spectral norm: the original over its largest singular value), one at a time."""

    def __init__(self, tensors: Tensors, graph: LayerGraph):
        self.tensors = tensors
        self.resident = tensors.resident
        self.derived = {p.key: p for layer in graph for p in layer.params if p.parts}

    def __getitem__(self, key: str) -> torch.Tensor:
        param = self.derived.get(key)
        if param is None:
            return self.tensors[key]
        return effective_weight(param, [self.tensors[k] for k in param.parts])

    def nbytes(self, key: str) -> int:
        param = self.derived.get(key)
        return self.tensors.nbytes(key) if param is None else sum(self.tensors.nbytes(k) for k in param.parts)

    def release(self, key: str) -> None:
        for k in self.derived[key].parts if key in self.derived else (key,):
            self.tensors.release(k)

    def stored(self, key: str) -> tuple[str, ...]:
        """The stored tensors a key reads."""
        return self.derived[key].parts if key in self.derived else (key,)


def effective_weight(param: Param, parts: list[torch.Tensor]) -> torch.Tensor:
    """The weight a parametrized module computes from its stored parts, in float32 (torch's formulas)."""
    if param.parametrization == WEIGHT_NORM:
        g, v = (t.detach().float() for t in parts)
        axes = [d for d in range(v.dim()) if g.dim() == v.dim() and g.shape[d] == 1] if g.dim() else None
        return g * v / torch.linalg.vector_norm(v, dim=axes, keepdim=True)
    if param.parametrization == SPECTRAL_NORM:
        w = parts[0].detach().float()
        sigma = torch.linalg.matrix_norm(w.movedim(param.unit_axis, 0).flatten(1), ord=2) if w.numel() else 0
        return w / sigma if sigma > 0 else w
    raise ValueError(f"unknown parametrization {param.parametrization!r}")


def measure(tensors: Tensors, graph: LayerGraph) -> Pass:
    """Stats, fingerprint and verdict for every audited tensor; tied tensors are read once.

    Tensors are measured on every core at once (torch's kernels release the GIL; each runs on one thread
    meanwhile), and each one's memory is handed back to its file as soon as it is measured (`release`):
    everything that reads its values runs while it is in memory. Ties are told by storage only where the source
    holds every tensor (a lazily read tensor's freed memory may be reused by the next one); ONNX shares
    initializers on purpose and audits them once per layer that uses them. A parametrized weight (weight norm,
    spectral norm) is measured as the weight its module computes (`Effective`). Tensors that hold no real numbers
    (`stats.auditable`) and the layers' buffers are skipped, by kind and reason.
    """
    tensors = Effective(tensors, graph)
    repeats = Counter(block_pattern(layer.name) for layer in graph if layer.weighted)
    params = [(layer, param) for layer in graph for param in layer.params if param.role != "buffer"]
    first: dict[tuple, int] = {}  # a storage's identity -> the first param that reads it
    owner = {i: first.setdefault(_identity(tensors[p.key]) if tensors.resident and not p.parts else (p.key,), i)
             for i, (_, p) in enumerate(params)}
    jobs = sorted(set(owner.values()))
    results = _run_parallel(tensors, [(params[i][0], params[i][1], repeats[block_pattern(params[i][0].name)])
                                      for i in jobs])
    by_job = dict(zip(jobs, results))
    out: list[Measured] = []
    skipped = _buffers(graph)
    audited: set[str] = set()
    biases: dict[str, torch.Tensor] = {}  # read once: a remote tensor costs a request
    for i, (layer, param) in enumerate(params):
        reason, found = by_job[owner[i]]
        if reason is not None:
            skipped.setdefault(("sparse tensor" if reason.startswith("sparse") else "non-float tensor", reason),
                               []).extend(tensors.stored(param.key))
            continue
        audited.update(tensors.stored(param.key))
        st, fp, rec, verdict, kept, samples = found
        if kept is not None:
            biases[param.key] = kept
        n_blocks = repeats[block_pattern(layer.name)]
        if owner[i] != i:  # a tied tensor: its first name's stats, its own context
            param.shared_with = params[owner[i]][1].key
            tensor = stats.auditable(tensors[param.key])[0]
            fp, rec = _scheme(layer, param, st, None if tensor is None else Samples.of(tensor, param.unit_axis), n_blocks)
            verdict = None
        out.append(Measured(layer, param, st, fp, rec, _bias_of(tensors, layer, biases, param), n_blocks, verdict,
                            samples=samples))
    return Pass(out, skipped, audited)


def _buffers(graph: LayerGraph) -> dict[tuple[str, str], list[str]]:
    """The layers' buffers, not audited: (kind, reason) -> keys."""
    out: dict[tuple[str, str], list[str]] = {}
    for layer in graph:
        for param in layer.params:
            reason = not_audited_reason(param)
            if reason is not None:
                out.setdefault(("buffer", reason), []).append(param.key)
    return out


def _scheme(layer: Layer, param: Param, st: stats.TensorStats, samples: Samples | None,
            n_blocks: int) -> tuple[schemes.Fingerprint | None, schemes.Recommendation | None]:
    """A weight's fingerprint and the scheme recommended for it."""
    if not param.is_weight:
        return None, None
    scale = layer.weight_scale if param is layer.param("weight") else 1.0  # the weight the forward pass uses
    fp = schemes.fingerprint(st.scaled(scale), param.fan_in, param.fan_out, layer.kind, layer.activation,
                             samples.scaled(scale) if samples is not None else None, param.hidden, n_blocks)
    role = "weight_hh" if "weight_hh" in param.key else "weight"
    rec = schemes.recommend(layer.activation, *param.signal_fans, layer.kind, param.hidden, role)
    if rec is not None and param.signal_fans != (param.fan_in, param.fan_out):
        # torch.nn.init would count a transposed conv's fan from dim 1: the std itself is what to draw
        rec = schemes.Recommendation(f"{rec.scheme} (at the signal's fan {param.signal_fans[0]})", rec.std, "normal_",
                                     (("std", float(f"{rec.std:.4g}")),), rec.basis)
    return fp, rec


def _measure_one(tensors: Tensors, layer: Layer, param: Param, n_blocks: int,
                 split: bool = True) -> tuple[str | None, tuple | None]:
    """(why it is skipped, None) or (None, (stats, fingerprint, recommendation, fresh/trained verdict)) of one
    tensor, its memory handed back afterwards (`split`: as `stats.compute`'s)."""
    try:
        tensor, reason = stats.auditable(tensors[param.key])
        if tensor is None:
            return reason, None
        st = stats.compute(tensor, param.unit_axis, units=per_unit(layer, param), split=split)
        samples = Samples.of(tensor, param.unit_axis)
        fp, rec, verdict = _judged(layer, param, st, samples, n_blocks)
        kept = tensor.clone() if param.role == "bias" else None  # for dead-units, once the file's memory is back
        return None, (st, fp, rec, verdict, kept, samples.kept())
    finally:
        tensors.release(param.key)


def per_unit(layer: Layer, param: Param) -> bool:
    """Whether a tensor's units (rows) are measured one by one (stats.compute's `units`)."""
    return param.is_weight and layer.kind in UNIT_KINDS


def _judged(layer: Layer, param: Param, st: stats.TensorStats, samples: Samples,
            n_blocks: int) -> tuple[schemes.Fingerprint | None, schemes.Recommendation | None, weight_state.TensorState | None]:
    """A tensor's fingerprint, recommended scheme and fresh/trained verdict (weights of weighted layers only)."""
    fp, rec = _scheme(layer, param, st, samples, n_blocks)
    verdict = weight_state.classify_any(st, samples, param.unit_axis) if param.is_weight and layer.weighted else None
    return fp, rec, verdict


def _run_parallel(tensors: Tensors, jobs: list[tuple[Layer, Param, int]]) -> list[tuple[str | None, tuple | None]]:
    """`_measure_one` of every job, on every core, the largest first (the cores then finish together rather than
    one of them on a late large tensor); results in the jobs' order, a progress bar over bytes on a terminal.
    A tensor is itself split over the cores only where it holds at least a core's share of all the bytes:
    else the other cores are busy with other tensors, and splitting it would only oversubscribe them."""
    sizes = [tensors.nbytes(param.key) for _, param, _ in jobs]
    total = sum(sizes)
    n = stats.workers() if len(jobs) > 1 else 1
    share = total / stats.workers()
    pool = ThreadPoolExecutor(n, thread_name_prefix="initaudit-measure")
    try:
        with byte_bar(total) as advance, stats.one_thread():  # one kernel thread per worker: the workers are the parallelism
            futures: list = [None] * len(jobs)
            for i in sorted(range(len(jobs)), key=lambda i: -sizes[i]):
                futures[i] = pool.submit(_measure_one, tensors, *jobs[i], sizes[i] >= share)
            job_of = {future: i for i, future in enumerate(futures)}
            for future in as_completed(futures):
                future.result()  # the first error stops the run
                advance(sizes[job_of[future]])
            return [future.result() for future in futures]
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the tensors not yet started are not read


def block_pattern(name: str) -> str:
    """'transformer.h.3.attn.c_proj' -> 'transformer.h.#.attn.c_proj': layers repeated once per block."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "#", name)


def _identity(tensor: torch.Tensor) -> tuple:
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
    except (RuntimeError, NotImplementedError):
        return (id(tensor),)


def _bias_of(tensors: Tensors, layer: Layer, read: dict[str, torch.Tensor], param: Param) -> torch.Tensor | None:
    """The layer's bias; a bias's own values (an LSTM's bias_hh_l1 is not its bias_ih_l0)."""
    bias = param if param.role == "bias" else layer.param("bias")
    if bias is not None and bias.key in read:
        return read[bias.key]
    return stats.auditable(tensors[bias.key])[0] if bias is not None else None


def measure_summaries(finished: dict[str, Finished | str], graph: LayerGraph) -> Pass:
    """The measuring pass from merged summaries (measure/summary.py) instead of tensors: `finished` maps each stored
    tensor to what its summaries finished into, or to why it was not measured (non-float values). Names that map to
    one Finished object are one tensor (a tied parameter): measured once, the first name's stats, each its own
    context; a parametrized weight (weight norm, spectral norm) is computed from whole tensors and is not measured
    here."""
    with stats.one_thread():  # as the pass over tensors judges them: the same figures
        return _from_summaries(finished, graph)


def _from_summaries(finished: dict[str, Finished | str], graph: LayerGraph) -> Pass:
    repeats = Counter(block_pattern(layer.name) for layer in graph if layer.weighted)
    params = [(layer, param) for layer in graph for param in layer.params if param.role != "buffer"]
    first: dict[int, int] = {}  # a Finished object's identity -> the first param that reads it
    out: list[Measured] = []
    skipped = _buffers(graph)
    audited: set[str] = set()
    for i, (layer, param) in enumerate(params):
        done = finished.get(param.key, "no summary of it") if not param.parts else "parametrized: needs whole tensors"
        if isinstance(done, str):
            kind = "parametrized weight" if param.parts else "non-float tensor"
            skipped.setdefault((kind, done), []).extend(param.parts or (param.key,))
            continue
        audited.add(param.key)
        owner = first.setdefault(id(done), i)
        n_blocks = repeats[block_pattern(layer.name)]
        fp, rec, verdict = _judged(layer, param, done.stats, done.samples, n_blocks)
        if owner != i:
            param.shared_with = params[owner][1].key
            verdict = None
        out.append(Measured(layer, param, done.stats, fp, rec, _summary_bias(finished, layer, param), n_blocks, verdict,
                            samples=done.samples, digest=done.digest))
    return Pass(out, skipped, audited)


def _summary_bias(finished: dict[str, Finished | str], layer: Layer, param: Param) -> torch.Tensor | None:
    """The layer's bias (a bias's own values), as its summary kept it."""
    bias = param if param.role == "bias" else layer.param("bias")
    done = finished.get(bias.key) if bias is not None else None
    return done.samples.values if isinstance(done, Finished) else None


def summary_targets(graph: LayerGraph) -> dict[str, tuple[bool, int]]:
    """Each stored tensor the pass measures: how its blocks are summarized (`units`, `unit_axis` of
    summary.summarize), as its first name in the graph reads it."""
    out: dict[str, tuple[bool, int]] = {}
    for layer in graph:
        for param in layer.params:
            if param.role != "buffer" and not param.parts:
                out.setdefault(param.key, (per_unit(layer, param), param.unit_axis))
    return out
