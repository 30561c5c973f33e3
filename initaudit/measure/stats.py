"""One pass over a tensor, in cache-sized chunks of units (rows): moments, extremes (and how many values sit
exactly on them: counted only in chunks that reach the running extremes), zeros, non-finite
values, zero units, the spread of unit norms, and groups of identical (or near-identical) units
found by hashing each row to a random projection (no comparison of all pairs).

Each chunk is read from memory once and then worked on in the CPU's cache: its squares are the
only temporary, and every sum (the power sums of the moments, each unit's and each input's sum
of squares, the units' sums and two random projections) is a reduction over the chunk or its
squares. Narrow floats (fp16, float8; bf16 without the `fast` extra) are upcast chunk by chunk into a reused
buffer; bf16 weights are read once by a compiled pass that counts their bit patterns (bf16_pass.py). A
large tensor's chunks are shared out over the CPU's cores (`workers`) and the partial sums merged.
A tensor whose largest |value| lies where fourth powers overflow or underflow the pass's precision (garbage
up to 3.4e38, a layer of denormals) is read again in float64 with its values scaled by a power of two
(`safe_scale`): statistics never overflow, and the pass over ordinary weights is the same as ever.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from initaudit.measure import bf16_pass, garbage
from initaudit.measure.garbage import Garbage

CHUNK_ELEMENTS = 1 << 18        # units are read in chunks of about this many values (1 MB of fp32: fits L2)
SPLIT_ELEMENTS = 1 << 24        # a tensor this large is shared out over the cores in row ranges
DISTINCT_SAMPLE = 1 << 14       # distinct values are counted exactly up to this many entries
NEAR_DUPLICATE_TOLERANCE = 1e-3  # units differing by at most this fraction of the std in every entry are copies
CHANCE_MATCHES = 1e-3           # ... where independent draws would match that closely less often than this
MAX_REPORTED_GROUPS = 20
SPARSE_DENSE_LIMIT = 1 << 24   # sparse tensors are audited (made dense) up to this many entries
SHIFT_RATIO = 4.0               # a chunk's moments are summed about its own mean when |mean| > this many stds
_LINE = 64                      # bytes in a cache line
_SMALL = 64                     # tensors this small are summed and counted in Python (per-call torch overhead)
_WINDOW = 64                    # neighbours in projection order compared with each unit
_HASH_SEED = 0x1A17
COLUMN_SAMPLE = 64               # columns of a tall tensor kept while it is read (column_sample)


@dataclass
class TensorStats:
    numel: int
    n_units: int
    finite: int
    nan: int
    inf: int
    mean: float
    std: float
    min: float
    max: float
    abs_max: float
    excess_kurtosis: float
    zero_fraction: float
    distinct: int                 # exact for tensors up to DISTINCT_SAMPLE entries, else counted in a sample
    garbage: Garbage = field(default_factory=Garbage)  # signs of uninitialized memory, read from the sample
    norm_spread: float = math.nan  # (max - min) / mean of the unit norms (of the columns, for tall matrices)
    unit_norms: torch.Tensor | None = field(default=None, repr=False)   # each unit's (row's) norm
    input_norms: torch.Tensor | None = field(default=None, repr=False)  # each column's norm
    unit_sums: torch.Tensor | None = field(default=None, repr=False)  # the sum of each unit's (row's) values
    zero_units: list[int] = field(default_factory=list)      # output units whose weights are all 0
    duplicate_groups: list[list[int]] = field(default_factory=list)  # groups of identical units (>= 2 each)
    negligible_groups: int = 0     # of those, groups whose units have a negligible norm (weight decay's near-zeros)
    min_count: int = 0             # entries exactly equal to the minimum
    max_count: int = 0             # entries exactly equal to the maximum
    dtype: torch.dtype | None = None  # the tensor's own dtype (its rounding)

    def scaled(self, factor: float) -> "TensorStats":
        """The stats of the tensor times a constant `factor` > 0 (the weight the forward pass uses)."""
        if factor == 1.0:
            return self
        def times(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t * factor
        return replace(self, mean=self.mean * factor, std=self.std * factor, min=self.min * factor,
                       max=self.max * factor, abs_max=self.abs_max * factor, unit_norms=times(self.unit_norms),
                       input_norms=times(self.input_norms), unit_sums=times(self.unit_sums))

    @property
    def non_finite(self) -> int:
        return self.nan + self.inf

    @property
    def constant(self) -> bool:
        return self.finite > 0 and self.min == self.max

    @property
    def duplicate_units(self) -> int:
        """Units that repeat another one (a group of k identical units counts k - 1)."""
        return sum(len(g) - 1 for g in self.duplicate_groups)

    @property
    def substantial_duplicate_units(self) -> int:
        """Duplicate units of the groups whose norm is not negligible."""
        return sum(len(g) - 1 for g in self.duplicate_groups[self.negligible_groups:])


def as_units(tensor: torch.Tensor, unit_axis: int = 0) -> torch.Tensor:
    """A [units, values-per-unit] view (a copy only where the unit axis is not the first)."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(-1, 1)
    moved = tensor.movedim(unit_axis, 0)
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))  # not -1: ambiguous for 0 units


def auditable(tensor: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """`tensor` as dense real floating-point values that `compute` reads (upcast chunk by chunk there),
    or None and why it is skipped: quantized tensors are dequantized, sparse ones made dense up to
    SPARSE_DENSE_LIMIT entries; complex, integer, bool and packed sub-byte values are not audited."""
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        if tensor.numel() > SPARSE_DENSE_LIMIT:
            return None, f"sparse, over {SPARSE_DENSE_LIMIT:,} entries when dense"
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    if tensor.is_complex():
        return None, "complex values"
    if not tensor.is_floating_point():
        return None, "integer or bool values"
    try:
        torch.zeros(1, dtype=tensor.dtype).to(torch.float32)  # an empty tensor would convert without a kernel
    except (RuntimeError, NotImplementedError):
        return None, f"{str(tensor.dtype).removeprefix('torch.')} values torch cannot convert"
    return tensor, None


def workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


_THREADS_LOCK = threading.Lock()
_THREADS = [0, 0]  # passes running one kernel thread each, and the thread count to restore after them


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's kernels on one thread each while inside: a reduction split over threads adds in another order, and
    the same values must give the same figures in every process (the cores are shared out by `workers` instead)."""
    with _THREADS_LOCK:
        if _THREADS[0] == 0:
            _THREADS[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS[0] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS[0] -= 1
            if _THREADS[0] == 0:
                torch.set_num_threads(_THREADS[1])


def _pool() -> ThreadPoolExecutor:
    """The threads a large tensor's row ranges run on (torch releases the GIL inside its kernels)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(workers(), thread_name_prefix="initaudit-stats")
        return _POOL


def _scratch(n: int, dtype: torch.dtype, k: int, use: str, like: torch.Tensor | None = None) -> list[torch.Tensor]:
    """k work buffers of n values for one `use`, reused per thread: fresh multi-MB temporaries cost more in page
    faults than the math (buffers beyond a few chunks, for units wider than a chunk, are not kept). `like`: the
    first buffer starts at the same offset within a cache line as that tensor (BLAS's dot of two vectors
    aligned differently takes a path ten times slower; a mapped file's tensors sit at any multiple of 8 bytes)."""
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    pad = _LINE // dtype.itemsize
    buf = bufs.get((use, dtype))
    if buf is None or buf.numel() < k * n + pad:
        buf = torch.empty(k * n + pad, dtype=dtype)
        if k * n <= 8 * CHUNK_ELEMENTS:
            bufs[(use, dtype)] = buf
    start = 0
    if like is not None and like.dtype == dtype:
        start = (like.data_ptr() - buf.data_ptr()) % _LINE // buf.element_size()
    return [buf[start + i * n:start + (i + 1) * n] for i in range(k)]


def _python_sums(values: torch.Tensor, shift: float) -> list[float]:
    """Power sums 1-4 about `shift` of a few values, in Python floats (float64): cheaper than torch calls."""
    ds = [x - shift for x in values.reshape(-1).tolist()]
    d2 = [d * d for d in ds]
    return [math.fsum(ds), math.fsum(d2), math.fsum(a * b for a, b in zip(d2, ds)), math.fsum(a * a for a in d2)]


def _power_sums(values: torch.Tensor, shift: float) -> list[float]:
    """Power sums 1-4 about `shift` of flat, finite values (per chunk in their precision: torch sums with
    cascaded partial sums)."""
    if values.numel() <= _SMALL:
        return _python_sums(values, shift)
    d, d2 = _scratch(values.numel(), values.dtype, 2, "sums")
    torch.sub(values, shift, out=d)
    torch.mul(d, d, out=d2)
    return [float(d.sum()), float(d2.sum()), float(torch.dot(d2, d)), float(torch.dot(d2, d2))]


@dataclass
class Partial:
    """What a run of chunks adds up to, mergeable in any order with the parts of other row ranges: each chunk's
    power sums travel as a record (count, shift, sums 1-4) and are added exactly (math.fsum) at the end, so the
    moments do not depend on how the rows were split (chunks sit at multiples of their row count from the
    tensor's first row: a chunk is the same computation whoever reads it). Per-unit values are kept in row order."""

    records: list[tuple[int, float, float, float, float, float]] = field(default_factory=list)
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    lo_count: int = 0   # values exactly at lo (and at hi)
    hi_count: int = 0
    zero_units: list[int] = field(default_factory=list)
    proj: list[torch.Tensor] = field(default_factory=list)    # [3, rows]: two random projections and the sums
    norms: list[torch.Tensor] = field(default_factory=list)
    column_sq: torch.Tensor | None = None   # float64: sums of float32 chunk sums, exact but for rare rounding
    column_parts: list[torch.Tensor] = field(default_factory=list)  # float64 chunks' column sums, added exactly at the end
    scale: float = 1.0   # the records, norms and projections are of the values times this (a power of two)
    hist: bf16_pass.Counts | None = None   # bf16: how many values hold each bit pattern, besides the records

    @property
    def n(self) -> int:
        return sum(r[0] for r in self.records) + (bf16_pass.finite_count(self.hist) if self.hist is not None else 0)

    def all_records(self) -> list[tuple[int, float, float, float, float, float]]:
        """The records, and the histogram's as one more."""
        counted = bf16_pass.record(self.hist) if self.hist is not None else None
        return self.records + ([counted] if counted else [])

    def add_hist(self, hist: bf16_pass.Counts | None) -> None:
        if hist is not None:
            self.hist = hist if self.hist is None else self.hist + hist

    def add_sums(self, sums: list[float], n: int, shift: float = 0.0) -> None:
        self.records.append((n, shift, *sums))

    def extremes(self, lo: float, lo_count: int, hi: float, hi_count: int) -> None:
        """Merge extremes and how many values sit exactly on them."""
        if lo < self.lo:
            self.lo, self.lo_count = lo, lo_count
        elif lo == self.lo:
            self.lo_count += lo_count
        if hi > self.hi:
            self.hi, self.hi_count = hi, hi_count
        elif hi == self.hi:
            self.hi_count += hi_count

    def count_extremes(self, values: torch.Tensor, lo: float, hi: float) -> None:
        """Merge a chunk's extremes: its values are counted on them only where they reach the running ones (a new
        extreme in a chunk of random order is rare: about log(chunks) counts in all, not one per chunk)."""
        if values.numel() <= _SMALL:  # a tiny tensor (a bias): counted in Python, far cheaper than torch calls
            listed = values.reshape(-1).tolist()
            lo_count, hi_count = listed.count(lo), listed.count(hi)
        else:
            lo_count = int(torch.count_nonzero(values == lo)) if lo <= self.lo else 0
            hi_count = int(torch.count_nonzero(values == hi)) if hi >= self.hi else 0
        self.extremes(lo, lo_count, hi, hi_count)

    def merge(self, other: "Partial") -> None:
        """Add the part of the rows that follow these (their per-unit values go after these)."""
        self.records += other.records
        self.add_hist(other.hist)
        self.nan, self.inf, self.zeros = self.nan + other.nan, self.inf + other.inf, self.zeros + other.zeros
        self.extremes(other.lo, other.lo_count, other.hi, other.hi_count)
        self.zero_units += other.zero_units
        self.proj += other.proj
        self.norms += other.norms
        self.column_parts += other.column_parts
        if other.column_sq is not None:
            self.column_sq = other.column_sq if self.column_sq is None else self.column_sq + other.column_sq


class _Scan:
    """The chunked pass over rows [start, stop) of a [units, width] view whose first row is the tensor's row `row0`
    and first column its column `col0` of `full_width` (a block of a larger tensor): chunks end at the tensor's
    multiples of `step` rows, so a chunk is the same computation in whichever block it is read."""

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype, units: bool, columns: torch.Tensor | None = None,
                 scale: float = 1.0, row0: int = 0, col0: int = 0, full_width: int | None = None):
        self.rows, self.dtype, self.units, self.columns = rows, dtype, units, columns
        self.scale = scale  # every value is read times this (a power of two): sums, norms are in its units
        self.row0 = row0
        self.picked = None if columns is None else torch.empty(rows.shape[0], columns.numel(), dtype=dtype)  # [rows, sampled]
        self.width = rows.shape[1]
        full_width = self.width if full_width is None else full_width
        self.step = chunk_rows(full_width)
        self.basis = _basis(full_width, dtype)[:, col0:col0 + self.width].contiguous() if units else None
        self.ones = torch.ones(self.step, dtype=dtype) if units else None
        self.counted = bf16_pass.takes(rows.dtype, full_width, scale)  # bf16: the compiled pass, patterns counted

    def sizes(self, start: int, stop: int) -> list[int]:
        """The chunks' row counts over [start, stop): each ends at a multiple of `step` of the tensor's rows."""
        out, a = [], start
        while a < stop:
            b = min(stop, ((self.row0 + a) // self.step + 1) * self.step - self.row0)
            out.append(b - a)
            a = b
        return out

    def __call__(self, start: int, stop: int) -> Partial:
        if self.counted:
            return self._counted(start, stop)
        part = Partial(scale=self.scale)
        units = self.units
        if units:
            part.column_sq = torch.zeros(self.width, dtype=torch.float64)
        results = torch.empty(7, dtype=self.dtype)  # a chunk's scalars, read into Python at once
        out = results.unbind()
        # every view made in one call: each torch call may hand the GIL over to another worker
        rows = self.rows[start:stop]
        sizes = self.sizes(start, stop)
        chunks = rows.split(sizes)
        direct = rows.dtype == self.dtype and rows.is_contiguous() and self.scale == 1.0  # else chunks are copied
        flats = rows.view(-1).split([s * self.width for s in sizes]) if direct else None
        transposed = rows.T.split(sizes, dim=1) if direct and units else None
        picked = self.picked[start:stop].split(sizes) if self.columns is not None else None
        work: dict[tuple[int, int], tuple] = {}  # the squares' views, per chunk shape and alignment
        first = self.row0 + start
        for i, chunk in enumerate(chunks):
            if direct:
                flat, chunk_t = flats[i], transposed[i] if units else None
            else:
                if chunk.dtype != self.dtype or not chunk.is_contiguous() or self.scale != 1.0:
                    chunk = _scratch(chunk.numel(), self.dtype, 1, "chunk")[0].view(chunk.shape).copy_(chunk)
                    if self.scale != 1.0:
                        chunk.mul_(self.scale)
                flat, chunk_t = chunk.view(-1), chunk.T
            key = (chunk.shape[0], chunk.data_ptr() % _LINE)
            views = work.get(key)
            if views is None:
                sq = _scratch(chunk.numel(), self.dtype, 1, "squares", like=chunk)[0]
                square = sq.view(chunk.shape)
                views = work[key] = (sq, square, square.T, self.ones[:chunk.shape[0]] if units else None, results, out)
            self._chunk(part, first, chunk, flat, chunk_t, views)
            first += chunk.shape[0]
            if picked is not None:  # gathered while the chunk is in cache: from memory, 10x dearer
                torch.index_select(chunk, 1, self.columns, out=picked[i])
        return part

    def _counted(self, start: int, stop: int) -> Partial:
        """The compiled bf16 pass over rows [start, stop) (bf16_pass): the same chunks, patterns counted; one call
        for the rows where they lie in one piece of memory, else one per chunk (copied)."""
        part, hist = Partial(), np.zeros(bf16_pass.PATTERNS, dtype=np.int64)
        kernels, units, n = bf16_pass.kernels(), self.units, stop - start
        columns = bf16_pass.NO_COLUMNS if self.columns is None else self.columns.numpy()
        picked = bf16_pass.NO_PICKS if self.columns is None else self.picked[start:stop].numpy()
        sizes = self.sizes(start, stop)
        rows = self.rows[start:stop]
        pieces = [(0, n, sizes)] if rows.is_contiguous() else \
            [(a, a + size, [size]) for a, size in zip(np.cumsum([0] + sizes[:-1]).tolist(), sizes)]
        if units:
            basis = self.basis.to(torch.float64).numpy()
            unit_sq, proj, nonzero = np.empty(n), np.empty((3, n)), np.empty(n, dtype=np.int64)
            column_sq = np.zeros(self.width)
        for a, b, chunks in pieces:
            bits = bf16_pass.patterns(rows[a:b].contiguous())
            if units:
                kernels.units(bits, np.array(chunks, dtype=np.int64), basis, hist, column_sq, unit_sq[a:b],
                              proj[:, a:b], nonzero[a:b], bf16_pass.RAW, columns, picked[a:b])
            else:
                kernels.count(bits, hist, bf16_pass.RAW, columns, picked[a:b])
        if units:
            part.norms, part.proj = [torch.from_numpy(unit_sq)], [torch.from_numpy(proj)]
            part.column_sq = torch.from_numpy(column_sq)
            part.zero_units = (self.row0 + start + np.flatnonzero(nonzero == 0)).tolist()
        part.hist = bf16_pass.Counts.of(hist)
        part.lo, part.lo_count, part.hi, part.hi_count, part.zeros, part.nan, part.inf = bf16_pass.tally(part.hist)
        return part

    def _chunk(self, part: Partial, first: int, chunk: torch.Tensor, flat: torch.Tensor, chunk_t: torch.Tensor | None,
               views: tuple) -> None:
        sq, square, columns, ones, results, out = views
        n, units = flat.numel(), self.units
        torch.aminmax(flat, out=out[:2])
        sq = torch.mul(flat, flat, out=sq)
        if units:
            proj = torch.mm(self.basis, chunk_t)
            unit_sq = square.sum(dim=1)  # each unit's sum of squares
        fused = n > _SMALL  # about 0: the squares are those of the norms, the sums the units'
        if fused:
            torch.sum(proj[2] if units else flat, dim=0, out=out[2])
            torch.sum(unit_sq if units else sq, dim=0, out=out[3])
            torch.dot(sq, flat, out=out[4])
            torch.dot(sq, sq, out=out[5])
        torch.amin(sq, dim=0, out=out[6])
        lo, hi, s1, s2, s3, s4, least = results.tolist()  # one call for all (each call may hand the GIL over)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or Inf somewhere
            return self._non_finite(part, first, chunk)
        if lo <= part.lo or hi >= part.hi:
            part.count_extremes(flat, lo, hi)
        self._record(part, flat, [s1, s2, s3, s4] if fused else _python_sums(flat, 0.0))
        zeros = 0
        if lo <= 0 <= hi and least == 0:  # squares underflow too: then count exactly
            zeros = n - int(torch.count_nonzero(flat))
            part.zeros += zeros
        if units:
            if zeros >= self.width:  # only then can a whole unit be zero
                nonzero_per_unit = torch.count_nonzero(chunk, dim=1)
                part.zero_units.extend((first + torch.nonzero(nonzero_per_unit == 0).flatten()).tolist())
            part.proj.append(proj)
            part.norms.append(unit_sq)  # the square roots are taken at the end, in one call
            self._columns(part, torch.mv(columns, ones))  # a column sum as BLAS does it: 2x torch's

    def _record(self, part: Partial, values: torch.Tensor, sums: list[float]) -> None:
        """A chunk's power sums about 0, or about its own mean where that is large next to its spread (a norm's
        weights about 1: sums about 0 would lose the variance to cancellation)."""
        n = values.numel()
        mean = sums[0] / n
        var = sums[1] / n - mean * mean
        shift = 0.0
        if mean != 0 and math.isfinite(mean) and abs(mean) > SHIFT_RATIO * math.sqrt(max(var, 0.0)):
            shift = torch.tensor(mean, dtype=self.dtype).item()  # a value of the chunk's precision
            sums = (_python_sums if n <= _SMALL else _power_sums)(values, shift)
        part.add_sums(sums, n, shift)

    def _non_finite(self, part: Partial, first: int, chunk: torch.Tensor) -> None:
        """A chunk with NaN or Inf: counted, then left out of every sum (set to 0, yet not counted as zeros)."""
        finite = torch.isfinite(chunk)
        part.nan += int(torch.isnan(chunk).sum())
        part.inf += int(torch.isinf(chunk).sum())
        values = chunk[finite]
        if values.numel():
            lo, hi = (float(v) for v in torch.aminmax(values))
            part.count_extremes(values, lo, hi)
            self._record(part, values, _power_sums(values, 0.0))
        clean = torch.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
        bad_per_unit = (~finite).sum(dim=1)
        zeros = clean.numel() - int(torch.count_nonzero(clean)) - int(bad_per_unit.sum())
        part.zeros += zeros
        if self.units:
            if zeros >= self.width:
                nonzero_per_unit = torch.count_nonzero(clean, dim=1) + bad_per_unit
                part.zero_units.extend((first + torch.nonzero(nonzero_per_unit == 0).flatten()).tolist())
            sq = clean * clean
            part.proj.append(torch.mm(self.basis, clean.T))
            part.norms.append(sq.sum(dim=1))
            self._columns(part, sq.sum(dim=0))

    def _columns(self, part: Partial, sums: torch.Tensor) -> None:
        """A chunk's column sums of squares: added into float64 (exact for float32 sums but for rare rounding), or kept
        to be added exactly where they are float64 already."""
        if self.dtype == torch.float64:
            part.column_parts.append(sums)
        else:
            part.column_sq.add_(sums)


def chunk_rows(width: int) -> int:
    """The rows of one chunk of a tensor whose units hold `width` values (blocks that start at its multiples are
    measured exactly as the whole tensor is)."""
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def _ranges(n_units: int, step: int, width: int, split: bool, row0: int = 0) -> list[tuple[int, int]]:
    """Row ranges, one per core for a large tensor (on whole chunks) that may be split, else one."""
    parts = workers() if split and n_units * width >= SPLIT_ELEMENTS else 1
    if parts <= 1 or getattr(_LOCAL, "in_pool", False):
        return [(0, n_units)]
    size = -(-n_units // parts // step) * step or step
    cuts = [0] + list(range(size - row0 % step, n_units, size)) + [n_units]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _in_pool(scan: _Scan, start: int, stop: int) -> Partial:
    _LOCAL.in_pool = True
    return scan(start, stop)


def compute(tensor: torch.Tensor, unit_axis: int = 0, units: bool = True, split: bool = True) -> TensorStats:
    """All statistics of `tensor` in one pass over chunks of its units.

    `units=False` skips the per-unit work (biases, norms, embeddings). `split=False` keeps a large tensor on
    one core (where the other cores have tensors of their own: sharing them out then only costs switches).
    """
    rows = as_units(tensor.detach(), unit_axis)
    n_units, width = rows.shape
    if rows.numel() == 0:
        return empty_stats(n_units)
    tall = unit_axis == 0 and tensor.dim() >= 2 and n_units > width >= 2
    scan, total = scan_rows(rows, units, sample_indices(width) if tall else None, split)
    if tall:
        _keep("columns", tensor, scan.picked.T)
    with one_thread():
        return assemble(total, n_units, width, tensor.dtype, sorted_sample(tensor), units, entrywise(rows))


def empty_stats(n_units: int) -> TensorStats:
    nan_ = math.nan
    return TensorStats(0, n_units, 0, 0, 0, nan_, nan_, nan_, nan_, nan_, nan_, 0.0, 0)


def scan_rows(rows: torch.Tensor, units: bool, columns: torch.Tensor | None = None, split: bool = True, row0: int = 0,
              col0: int = 0, full_width: int | None = None) -> tuple[_Scan, Partial]:
    """The pass over a [units, width] view (rows `row0`.. and columns `col0`.. of a tensor `full_width` wide), read
    again in float64 with its values scaled by a power of two where its peak lies beyond the pass's precision."""
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    where = dict(row0=row0, col0=col0, full_width=full_width)
    with one_thread():
        scan, total = _scan_all(rows, dtype, units, columns, split, **where)
        scale = safe_scale(total, dtype)
        if scale != 1.0:  # garbage magnitudes or denormals: read again, scaled, in float64
            _, scaled = _scan_all(rows, torch.float64, units, None, split, scale, **where)
            total.records, total.norms, total.proj = scaled.records, scaled.norms, scaled.proj
            total.column_sq, total.column_parts = scaled.column_sq, scaled.column_parts
            total.scale = scale
    return scan, total


def _scan_all(rows: torch.Tensor, dtype: torch.dtype, units: bool, columns: torch.Tensor | None, split: bool,
              scale: float = 1.0, row0: int = 0, col0: int = 0, full_width: int | None = None) -> tuple[_Scan, Partial]:
    """The chunked pass over all rows (on every core for a large tensor), its parts merged in row order."""
    scan = _Scan(rows, dtype, units, columns, scale, row0, col0, full_width)
    ranges = _ranges(rows.shape[0], scan.step, rows.shape[1], split, row0)
    if len(ranges) == 1:
        parts = [scan(*ranges[0])]
    else:
        parts = [f.result() for f in [_pool().submit(_in_pool, scan, a, b) for a, b in ranges]]
    total = parts[0]
    for part in parts[1:]:
        total.merge(part)
    return scan, total


def safe_scale(part: Partial, dtype: torch.dtype) -> float:
    """1, or the power of two that brings the largest finite |value| to [0.5, 1) where it lies beyond 2^±(a fifth
    of `dtype`'s exponent range) (fp32: 3.4e7 and 3e-8): there a chunk's sum of fourth powers overflows, or the
    squares underflow."""
    peak = max(-part.lo, part.hi) if part.records else 0.0
    limit = 2.0 ** (int(math.log2(torch.finfo(dtype).max)) // 5)
    if peak > limit or 0 < peak < 1 / limit:
        return 2.0 ** min(-math.frexp(peak)[1], 1023)
    return 1.0


def _keep(name: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Keep `value`, derived from `tensor`, for this thread while the tensor lives unchanged (one per name)."""
    _LOCAL.__dict__[name] = (weakref.ref(tensor), _version(tensor), value)


def _kept(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    memo = _LOCAL.__dict__.get(name)
    if memo is None or memo[0]() is not tensor or memo[1] is None or memo[1] != _version(tensor):
        return None
    return memo[2]


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor counts no versions: nothing kept for it is reused
        return None


@functools.lru_cache(maxsize=256)
def sample_indices(count: int) -> torch.Tensor:
    """COLUMN_SAMPLE of range(count) (all of a smaller range), drawn with a fixed seed, in increasing order (the
    same tensor for the same count: read, never written)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:COLUMN_SAMPLE].sort().values


def column_sample(tensor: torch.Tensor) -> torch.Tensor:
    """The columns sample_indices picks of `tensor` flattened to [rows, values] from dim 0, as [picked, rows].
    compute() keeps them (upcast as it reads) for the last tall tensor it read in this thread while that tensor
    lives unchanged (the orthogonality test needs whole columns, a gather from memory that costs as much as the
    rest of the test); otherwise they are gathered here."""
    kept = _kept("columns", tensor)
    if kept is not None:
        return kept
    flat = tensor.detach().reshape(tensor.shape[0], -1)
    return flat.index_select(1, sample_indices(flat.shape[1])).T


def moments(records: list[tuple[int, float, float, float, float, float]], scale: float = 1.0) -> tuple[float, float, float]:
    """Mean, population std, excess kurtosis from chunks' power sums (count, shift, sums 1-4 about the shift) of
    values read times `scale`. Each chunk's sums are moved to one centre (0, or the mean where a chunk was
    shifted) term by term and every term is added exactly (math.fsum): the result depends on the chunks, never
    on the order or grouping they arrive in."""
    n = sum(r[0] for r in records)
    if n == 0:
        return math.nan, math.nan, math.nan
    if all(r[1] == 0 for r in records):
        centre = 0.0
        sums = [math.fsum(r[k] for r in records) for k in (2, 3, 4, 5)]
    else:
        centre = math.fsum([r[0] * r[1] for r in records] + [r[2] for r in records]) / n
        sums = [math.fsum(_moved(r, centre, k) for r in records) for k in (1, 2, 3, 4)]
    m1, m2, m3, m4 = (s / n for s in sums)
    var = max(m2 - m1 * m1, 0.0)
    c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
    return (centre + m1) / scale, math.sqrt(var) / scale, (c4 / (var * var) - 3.0 if var > 0 else math.nan)


def _moved(record: tuple[int, float, float, float, float, float], centre: float, k: int) -> float:
    """The k-th power sum of a chunk about `centre` from its sums about its own shift (binomial expansion)."""
    n, shift, *t = record
    d = shift - centre
    sums = [float(n), *t]
    return math.fsum(math.comb(k, j) * sums[j] * d ** (k - j) for j in range(k + 1))


def column_squares(part: Partial) -> torch.Tensor:
    """The columns' sums of squares of a merged pass (float64 chunks' sums added exactly, column by column)."""
    if not part.column_parts:
        return part.column_sq
    vectors = part.column_parts + ([part.column_sq] if part.column_sq is not None else [])
    return torch.tensor([math.fsum(c) for c in torch.stack(vectors).T.tolist()], dtype=torch.float64)


def entrywise(rows: torch.Tensor) -> Callable[[int, int, float], bool]:
    """Whether two units of `rows` are within `tol` of each other in every entry."""
    def close(a: int, b: int, tol: float) -> bool:
        return float((rows[a].to(torch.float64) - rows[b].to(torch.float64)).abs().max()) <= tol
    return close


def assemble(part: Partial, n_units: int, width: int, dtype: torch.dtype, ordered: torch.Tensor, units: bool,
             close: Callable[[int, int, float], bool]) -> TensorStats:
    """The stats of a tensor from its merged pass (`ordered`: its sorted sample; `close(a, b, tol)`: whether two
    units found near each other by their projections are copies)."""
    mean, std, kurt = moments(part.all_records(), part.scale)
    lo, hi = part.lo, part.hi
    spread = math.nan
    unit_norms = input_norms = unit_sums = None
    groups, negligible = [], 0
    if units and n_units:
        unit_norms, input_norms = torch.cat(part.norms).sqrt_(), column_squares(part).sqrt()
        if part.scale != 1.0:
            unit_norms, input_norms = unit_norms / part.scale, input_norms / part.scale
        longer = unit_norms if n_units <= width else input_norms  # the norms over more values each
        mid = float(longer.mean())
        spread = float(longer.max() - longer.min()) / mid if mid > 0 else math.nan
        proj = torch.cat(part.proj, dim=1).T / part.scale  # small: [units, 3]
        unit_sums = proj[:, 2].to(torch.float64)
        tol = _copy_tolerance(n_units, width, std, dtype)
        if n_units > 1 and lo < hi and tol is not None:
            groups = _duplicate_groups(proj, width, tol, set(part.zero_units), close)
            groups, negligible = _negligible_first(unit_norms, width, groups, math.hypot(std, mean))
    found = part.n > 0
    return TensorStats(
        numel=n_units * width, n_units=n_units, finite=part.n, nan=part.nan, inf=part.inf, mean=mean, std=std,
        min=lo if found else math.nan, max=hi if found else math.nan,
        abs_max=max(abs(lo), abs(hi)) if found else math.nan, excess_kurtosis=kurt,
        zero_fraction=part.zeros / (n_units * width), distinct=_distinct(ordered),
        garbage=garbage.evidence(ordered, dtype, mean, std, lo, hi) if found else Garbage(),
        norm_spread=spread, unit_norms=unit_norms, input_norms=input_norms,
        unit_sums=unit_sums, zero_units=sorted(part.zero_units), duplicate_groups=groups, negligible_groups=negligible,
        min_count=part.lo_count, max_count=part.hi_count, dtype=dtype)


def _basis(width: int, dtype: torch.dtype) -> torch.Tensor:
    """Two random directions (to hash units) and a row of ones (each unit's sum), [3, width]: one matmul for all three."""
    random = torch.randn(width, 2, generator=torch.Generator().manual_seed(_HASH_SEED), dtype=dtype)
    return torch.cat([random, torch.ones(width, 1, dtype=dtype)], dim=1).T.contiguous()


NEGLIGIBLE_NORM = 0.05  # a unit whose norm is under this fraction of a typical unit's is negligible


def _negligible_first(norms: torch.Tensor, width: int, groups: list[list[int]],
                      rms: float) -> tuple[list[list[int]], int]:
    """Groups whose units are near zero (weight decay drives unused units there) first, and how many there are."""
    typical = rms * math.sqrt(width)
    small = [g for g in groups if float(norms[g[0]]) < NEGLIGIBLE_NORM * typical]
    return small + [g for g in groups if g not in small], len(small)


def sample(tensor: torch.Tensor) -> torch.Tensor:
    """At most DISTINCT_SAMPLE of the tensor's values, strided over all of it (all of a smaller tensor)."""
    flat = tensor.detach().reshape(-1)
    return flat[:: flat.numel() // DISTINCT_SAMPLE + 1] if flat.numel() > DISTINCT_SAMPLE else flat


def sorted_sample(tensor: torch.Tensor) -> torch.Tensor:
    """sample(tensor) sorted (NaNs last), as float32 or float64. The last one sorted in this thread is kept
    while its tensor lives unchanged: compute() sorts it to count distinct values, the fresh/trained fit reuses it."""
    kept = _kept("sorted", tensor)
    if kept is not None:
        return kept
    flat = sample(tensor)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)  # exact for every narrower float; sort has no float8 kernel
    ordered = torch.from_numpy(np.sort(flat.numpy()))  # numpy's vectorised sort: 4x torch's; NaNs last too
    _keep("sorted", tensor, ordered)
    return ordered


def _distinct(ordered: torch.Tensor) -> int:
    """The distinct values in a sorted sample (each NaN counted, as torch.unique counts them)."""
    if ordered.numel() <= _SMALL:
        return len(set(ordered.tolist()))  # a tiny tensor: far cheaper than a torch call
    return 1 + int(torch.count_nonzero(ordered[1:] != ordered[:-1]))


def _copy_tolerance(n_units: int, width: int, std: float, dtype: torch.dtype) -> float | None:
    """How far apart two units may be and still be called copies: NEAR_DUPLICATE_TOLERANCE of the std, else
    exact, else None, whichever chance alone would not produce among this many units (expected chance
    matches under CHANCE_MATCHES). Two independent draws agree within t·std in one entry with probability
    at most 0.8·t (a normal's peak density), so in every entry of a unit (0.8·t)^width; units of one value
    (MobileOne's per-channel scale convs) match by chance even at the dtype's resolution."""
    pairs = n_units * (n_units - 1) / 2
    resolution = torch.finfo(dtype).eps if dtype.is_floating_point else 1.0
    for t, tol in ((NEAR_DUPLICATE_TOLERANCE, std * NEAR_DUPLICATE_TOLERANCE), (resolution, 0.0)):
        if pairs * min(1.0, 0.8 * t) ** width <= CHANCE_MATCHES:
            return tol
    return None


def _duplicate_groups(proj: torch.Tensor, width: int, tol: float, zero_units: set[int],
                      close: Callable[[int, int, float], bool]) -> list[list[int]]:
    """Units within `tol` of each other in every entry.

    `proj` holds each unit's two random projections and its sum: copies land next to each other in
    the order of the first (their projections differ by about the norm of their difference), so only
    neighbours within a small window whose other projection and sum (at most width·tol apart) are as
    close are compared (`close`: entry by entry where the rows are at hand).
    """
    reach = 4 * tol * math.sqrt(width) + 1e-12 * float(proj[:, :2].abs().max())
    sum_reach = width * tol + 1e-6 * float(proj[:, 2].abs().max())  # float32 rounding of the sums
    order = torch.argsort(proj[:, 0])
    p = proj[order].T.contiguous().numpy()  # [3, units], in that order: numpy's small ops cost a fifth of torch's
    reach, sum_reach = p.dtype.type(reach), p.dtype.type(sum_reach)  # compared in the projections' dtype
    parent = list(range(proj.shape[0]))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    touched: set[int] = set()
    with np.errstate(all="ignore"):  # inf - inf: NaN, never near
        last = min(_WINDOW, _widest_gap(p[0], float(reach)), proj.shape[0] - 1)
        near = [np.flatnonzero((gap[1] <= reach) & (gap[2] <= sum_reach) & (gap[0] <= reach))
                for gap in (np.abs(p[:, offset:] - p[:, :-offset]) for offset in range(1, last + 1))]
    for offset, ks in enumerate(near, 1):
        for k in ks.tolist():
            a, b = int(order[k]), int(order[k + offset])
            if a in zero_units or b in zero_units or find(a) == find(b):
                continue
            if close(a, b, tol):
                parent[find(a)] = find(b)
                touched.update((a, b))
    members: dict[int, list[int]] = {}
    for i in sorted(touched):
        members.setdefault(find(i), []).append(i)
    return sorted(members.values(), key=lambda g: g[0])[:MAX_REPORTED_GROUPS]


def _widest_gap(first: np.ndarray, reach: float) -> int:
    """At least the largest offset at which two of the sorted values `first` lie within `reach` (as the search
    computes gaps: in their dtype; gaps grow with the offset, so beyond it none is near): a bound from a
    binary search with room for the gaps' rounding, instead of testing offset after offset until none is."""
    finite = first[np.isfinite(first)].astype(np.float64)  # sorted too (-inf first, +inf and NaN last)
    if finite.size < 2:
        return 0
    ends = np.searchsorted(finite, finite + reach + (reach * 1e-6 + np.abs(finite) * 1e-12), side="right")
    return int((ends - np.arange(1, finite.size + 1)).max())
