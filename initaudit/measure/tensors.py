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
from initaudit.measure import schemes, stats, weight_state


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


@dataclass
class Pass:
    """What one pass over a model's tensors gives: the measured tensors, and the ones skipped (reason -> keys)."""

    measured: list[Measured]
    skipped: dict[str, list[str]]


def measure(tensors: Tensors, graph: LayerGraph) -> Pass:
    """Stats, fingerprint and verdict for every audited tensor; tied tensors are read once.

    Tensors are measured on every core at once (torch's kernels release the GIL; each runs on one thread
    meanwhile), and each one's memory is handed back to its file as soon as it is measured (`release`):
    everything that reads its values runs while it is in memory. Ties are told by storage only where the source
    holds every tensor (a lazily read tensor's freed memory may be reused by the next one); ONNX shares
    initializers on purpose and audits them once per layer that uses them. Tensors that hold no real numbers
    (`stats.auditable`) are skipped, by reason.
    """
    repeats = Counter(block_pattern(layer.name) for layer in graph if layer.weighted)
    params = [(layer, param) for layer in graph for param in layer.params if param.role != "buffer"]
    first: dict[tuple, int] = {}  # a storage's identity -> the first param that reads it
    owner = {i: first.setdefault(_identity(tensors[p.key]) if tensors.resident else (p.key,), i)
             for i, (_, p) in enumerate(params)}
    jobs = sorted(set(owner.values()))
    results = _run_parallel(tensors, [(params[i][0], params[i][1], repeats[block_pattern(params[i][0].name)])
                                      for i in jobs])
    by_job = dict(zip(jobs, results))
    out: list[Measured] = []
    skipped: dict[str, list[str]] = {}
    biases: dict[str, torch.Tensor] = {}  # read once: a remote tensor costs a request
    for i, (layer, param) in enumerate(params):
        reason, found = by_job[owner[i]]
        if reason is not None:
            skipped.setdefault(reason, []).append(param.key)
            continue
        st, fp, rec, verdict, kept = found
        if kept is not None:
            biases[param.key] = kept
        n_blocks = repeats[block_pattern(layer.name)]
        if owner[i] != i:  # a tied tensor: its first name's stats, its own context
            param.shared_with = params[owner[i]][1].key
            fp, rec = _scheme(layer, param, st, stats.auditable(tensors[param.key])[0], n_blocks)
            verdict = None
        out.append(Measured(layer, param, st, fp, rec, _bias_of(tensors, layer, biases, param), n_blocks, verdict))
    return Pass(out, skipped)


def _scheme(layer: Layer, param: Param, st: stats.TensorStats, tensor: torch.Tensor | None,
            n_blocks: int) -> tuple[schemes.Fingerprint | None, schemes.Recommendation | None]:
    """A weight's fingerprint and the scheme recommended for it."""
    if not param.is_weight:
        return None, None
    fp = schemes.fingerprint(st, param.fan_in, param.fan_out, layer.kind, layer.activation,
                             tensor, param.hidden, n_blocks)
    role = "weight_hh" if "weight_hh" in param.key else "weight"
    return fp, schemes.recommend(layer.activation, param.fan_in, param.fan_out, layer.kind, param.hidden, role)


def _measure_one(tensors: Tensors, layer: Layer, param: Param, n_blocks: int,
                 split: bool = True) -> tuple[str | None, tuple | None]:
    """(why it is skipped, None) or (None, (stats, fingerprint, recommendation, fresh/trained verdict)) of one
    tensor, its memory handed back afterwards (`split`: as `stats.compute`'s)."""
    try:
        tensor, reason = stats.auditable(tensors[param.key])
        if tensor is None:
            return reason, None
        st = stats.compute(tensor, param.unit_axis, units=param.is_weight and layer.kind in UNIT_KINDS, split=split)
        fp, rec = _scheme(layer, param, st, tensor, n_blocks)
        verdict = weight_state.classify_any(st, tensor, param.unit_axis) if param.is_weight and layer.weighted else None
        kept = tensor.clone() if param.role == "bias" else None  # for dead-units, once the file's memory is back
        return None, (st, fp, rec, verdict, kept)
    finally:
        tensors.release(param.key)


def _run_parallel(tensors: Tensors, jobs: list[tuple[Layer, Param, int]]) -> list[tuple[str | None, tuple | None]]:
    """`_measure_one` of every job, on every core, the largest first (the cores then finish together rather than
    one of them on a late large tensor); results in the jobs' order, a progress bar over bytes on a terminal.
    A tensor is itself split over the cores only where it holds at least a core's share of all the bytes:
    else the other cores are busy with other tensors, and splitting it would only oversubscribe them."""
    sizes = [tensors.nbytes(param.key) for _, param, _ in jobs]
    total = sum(sizes)
    n = stats.workers() if len(jobs) > 1 else 1
    share = total / stats.workers()
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix="initaudit-measure")
    try:
        with byte_bar(total) as advance:
            if n > 1:
                torch.set_num_threads(1)  # one kernel thread per worker: the workers are the parallelism
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
        torch.set_num_threads(threads)


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
