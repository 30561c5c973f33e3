"""One pass over a tensor, in bounded chunks of units (rows): moments, extremes, zeros, non-finite
values, zero units, the spread of unit norms, and groups of identical (or near-identical) units
found by hashing each row to a random projection (no comparison of all pairs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

CHUNK_ELEMENTS = 1 << 22        # units are read in chunks of about this many values
DISTINCT_SAMPLE = 1 << 14       # distinct values are counted exactly up to this many entries
NEAR_DUPLICATE_TOLERANCE = 1e-3  # units differing by at most this fraction of the std in every entry are copies
MAX_REPORTED_GROUPS = 20
SPARSE_DENSE_LIMIT = 1 << 24   # sparse tensors are audited (made dense) up to this many entries
_SMALL = 64                     # tensors this small are summed and counted in Python (per-call torch overhead)
_WINDOW = 64                    # neighbours in projection order compared with each unit
_HASH_SEED = 0x1A17


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
    norm_spread: float = math.nan  # (max - min) / mean of the unit norms (of the columns, for tall matrices)
    unit_norms: torch.Tensor | None = field(default=None, repr=False)   # each unit's (row's) norm
    input_norms: torch.Tensor | None = field(default=None, repr=False)  # each column's norm
    unit_sums: torch.Tensor | None = field(default=None, repr=False)  # the sum of each unit's (row's) values
    zero_units: list[int] = field(default_factory=list)      # output units whose weights are all 0
    duplicate_groups: list[list[int]] = field(default_factory=list)  # groups of identical units (>= 2 each)
    negligible_groups: int = 0     # of those, groups whose units have a negligible norm (weight decay's near-zeros)

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


_SCRATCH: dict[torch.dtype, torch.Tensor] = {}


def _scratch(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable work buffers of n values: fresh multi-MB temporaries cost more in page faults than the math."""
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < 2 * n:
        buf = _SCRATCH[dtype] = torch.empty(2 * n, dtype=dtype)
    return buf[:n], buf[n:2 * n]


class _Moments:
    """Power sums about a fixed shift (the first chunk's mean): per chunk in the tensor's precision
    (torch sums with cascaded partial sums), across chunks in float64."""

    def __init__(self) -> None:
        self.n, self.shift, self.sums = 0, None, [0.0, 0.0, 0.0, 0.0]

    def add(self, values: torch.Tensor) -> None:
        if not values.numel():
            return
        if values.numel() <= _SMALL:  # a few values: Python floats (float64) beat a dozen torch calls
            xs = values.reshape(-1).tolist()
            if self.shift is None:
                self.shift = math.fsum(xs) / len(xs)
            ds = [x - self.shift for x in xs]
            d2 = [d * d for d in ds]
            for i, part in enumerate((ds, d2, [a * b for a, b in zip(d2, ds)], [a * a for a in d2])):
                self.sums[i] += math.fsum(part)
            self.n += len(xs)
            return
        if self.shift is None:
            self.shift = float(values.mean())
        d, d2 = _scratch(values.numel(), values.dtype)
        torch.sub(values.reshape(-1), self.shift, out=d)
        torch.mul(d, d, out=d2)
        for i, part in enumerate((d.sum(), d2.sum(), torch.dot(d2, d), torch.dot(d2, d2))):  # dot: no temporaries
            self.sums[i] += float(part)
        self.n += values.numel()

    def result(self) -> tuple[float, float, float]:
        """Mean, population variance, excess kurtosis."""
        if self.n == 0:
            return math.nan, math.nan, math.nan
        m1, m2, m3, m4 = (s / self.n for s in self.sums)
        var = max(m2 - m1 * m1, 0.0)
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        return self.shift + m1, var, (c4 / (var * var) - 3.0 if var > 0 else math.nan)


def compute(tensor: torch.Tensor, unit_axis: int = 0, units: bool = True) -> TensorStats:
    """All statistics of `tensor` in one pass over chunks of its units.

    `units=False` skips the per-unit work (biases, norms, embeddings).
    """
    rows = as_units(tensor.detach(), unit_axis)
    n_units, width = rows.shape
    if rows.numel() == 0:
        nan_ = math.nan
        return TensorStats(0, n_units, 0, 0, 0, nan_, nan_, nan_, nan_, nan_, nan_, 0.0, 0)
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    moments = _Moments()
    nan = inf = zeros = 0
    lo, hi = math.inf, -math.inf
    zero_units: list[int] = []
    projections, norms = [], []
    column_sq = torch.zeros(width, dtype=torch.float64) if units else None
    basis = _basis(width, dtype) if units else None
    for start in range(0, n_units, step):
        chunk = rows[start:start + step].to(dtype)
        c_lo, c_hi = torch.aminmax(chunk)
        if not math.isfinite(float(c_lo)) or not math.isfinite(float(c_hi)):  # NaN or Inf somewhere
            n_nan = int(torch.isnan(chunk).sum())
            nan += n_nan
            inf += int(torch.isinf(chunk).sum())
            finite = torch.isfinite(chunk)
            values = chunk[finite]
            chunk = torch.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
            bad_per_unit = (~finite).sum(dim=1)  # set to 0 above, yet not zeros
            if values.numel():
                c_lo, c_hi = torch.aminmax(values)
        else:
            values = chunk.reshape(-1)
            bad_per_unit = None
        moments.add(values)
        if values.numel():
            lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        chunk_zeros = chunk.numel() - int(torch.count_nonzero(chunk))  # a whole-chunk count is ~15x faster
        if bad_per_unit is not None:
            chunk_zeros -= int(bad_per_unit.sum())
        zeros += chunk_zeros
        if units:
            if chunk_zeros >= width:  # only then can a whole unit be zero
                nonzero_per_unit = torch.count_nonzero(chunk, dim=1)
                if bad_per_unit is not None:
                    nonzero_per_unit += bad_per_unit
                zero_units.extend((start + torch.nonzero(nonzero_per_unit == 0).flatten()).tolist())
            projections.append(chunk @ basis)  # two random projections and the unit's sum
            norms.append(torch.linalg.vector_norm(chunk, dim=1))
            column_sq += torch.linalg.vector_norm(chunk, dim=0).to(torch.float64) ** 2
    mean, var, kurt = moments.result()
    std = math.sqrt(var) if var == var else math.nan
    spread = math.nan
    unit_norms = input_norms = unit_sums = None
    if units and n_units:
        unit_norms, input_norms = torch.cat(norms), column_sq.sqrt()
        longer = unit_norms if n_units <= width else input_norms  # the norms over more values each
        mid = float(longer.mean())
        spread = float(longer.max() - longer.min()) / mid if mid > 0 else math.nan
    groups, negligible = [], 0
    if units and n_units:
        proj = torch.cat(projections)
        unit_sums = proj[:, 2].to(torch.float64)
        if n_units > 1 and lo < hi:
            groups = _duplicate_groups(rows, proj[:, :2], std * NEAR_DUPLICATE_TOLERANCE, set(zero_units))
            groups, negligible = _negligible_first(rows, groups, math.sqrt(var + mean * mean))
    return TensorStats(
        numel=rows.numel(), n_units=n_units, finite=moments.n, nan=nan, inf=inf, mean=mean, std=std,
        min=lo if moments.n else math.nan, max=hi if moments.n else math.nan,
        abs_max=max(abs(lo), abs(hi)) if moments.n else math.nan, excess_kurtosis=kurt,
        zero_fraction=zeros / rows.numel() if rows.numel() else 0.0, distinct=_distinct(tensor),
        norm_spread=spread, unit_norms=unit_norms, input_norms=input_norms,
        unit_sums=unit_sums, zero_units=zero_units, duplicate_groups=groups, negligible_groups=negligible)


def _basis(width: int, dtype: torch.dtype) -> torch.Tensor:
    """Two random directions (to hash units) and a column of ones (each unit's sum), one matmul for all three."""
    random = torch.randn(width, 2, generator=torch.Generator().manual_seed(_HASH_SEED), dtype=dtype)
    return torch.cat([random, torch.ones(width, 1, dtype=dtype)], dim=1)


NEGLIGIBLE_NORM = 0.05  # a unit whose norm is under this fraction of a typical unit's is negligible


def _negligible_first(rows: torch.Tensor, groups: list[list[int]], rms: float) -> tuple[list[list[int]], int]:
    """Groups whose units are near zero (weight decay drives unused units there) first, and how many there are."""
    typical = rms * math.sqrt(rows.shape[1])
    small = [g for g in groups if float(torch.linalg.vector_norm(rows[g[0]].to(torch.float64))) < NEGLIGIBLE_NORM * typical]
    return small + [g for g in groups if g not in small], len(small)


def _distinct(tensor: torch.Tensor) -> int:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > DISTINCT_SAMPLE:
        flat = flat[:: flat.numel() // DISTINCT_SAMPLE + 1]
    if flat.numel() <= _SMALL:
        return len(set(flat.tolist()))  # a tiny tensor: far cheaper than a torch call
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)  # exact for every narrower float; unique has no float8 kernel
    return int(torch.unique(flat).numel())


def _duplicate_groups(rows: torch.Tensor, proj: torch.Tensor, tol: float, zero_units: set[int]) -> list[list[int]]:
    """Units within `tol` of each other in every entry.

    Each unit is hashed to two random projections; copies land next to each other in projection
    order (their projections differ by about the norm of their difference), so only neighbours
    within a small window are compared entry by entry.
    """
    width = rows.shape[1]
    reach = 4 * tol * math.sqrt(width) + 1e-12 * float(proj.abs().max())
    order = torch.argsort(proj[:, 0])
    p = proj[order]
    parent = list(range(rows.shape[0]))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    touched: set[int] = set()
    for offset in range(1, min(_WINDOW, rows.shape[0] - 1) + 1):
        gap = p[offset:] - p[:-offset]
        near_first = gap[:, 0] <= reach  # sorted on the first projection: beyond here nothing is nearer
        if not bool(near_first.any()):
            break
        for k in torch.nonzero(near_first & (gap[:, 1].abs() <= reach)).flatten().tolist():
            a, b = int(order[k]), int(order[k + offset])
            if a in zero_units or b in zero_units or find(a) == find(b):
                continue
            if float((rows[a].to(torch.float64) - rows[b].to(torch.float64)).abs().max()) <= tol:
                parent[find(a)] = find(b)
                touched.update((a, b))
    members: dict[int, list[int]] = {}
    for i in sorted(touched):
        members.setdefault(find(i), []).append(i)
    return sorted(members.values(), key=lambda g: g[0])[:MAX_REPORTED_GROUPS]
