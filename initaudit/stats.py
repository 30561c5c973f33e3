"""One pass over a tensor, in bounded chunks of rows: moments, extremes, zeros, non-finite values,
zero rows and groups of identical (or near-identical) rows found by hashing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

CHUNK_ELEMENTS = 1 << 22   # rows are read in chunks of about this many values (32 MiB as float64)
MAX_EXACT_DISTINCT = 1 << 22
NEAR_DUPLICATE_TOLERANCE = 1e-3  # rows equal after rounding to this fraction of the tensor's std
MAX_REPORTED_GROUPS = 20
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
    distinct: int                 # exact up to MAX_EXACT_DISTINCT values; for larger tensors a lower bound
    zero_units: list[int] = field(default_factory=list)      # output units whose weights are all 0
    duplicate_groups: list[list[int]] = field(default_factory=list)  # groups of identical units (>= 2 each)

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


def as_units(tensor: torch.Tensor, unit_axis: int = 0) -> torch.Tensor:
    """A [units, values-per-unit] view (a copy only where the unit axis is not the first)."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(-1, 1)
    return tensor.movedim(unit_axis, 0).reshape(tensor.shape[unit_axis], -1)


def compute(tensor: torch.Tensor, unit_axis: int = 0, units: bool = True) -> TensorStats:
    """All statistics of `tensor` in one pass over chunks of its units (rows).

    Moments are accumulated in float64 about a shift (the first chunk's mean) so that a
    near-constant tensor keeps its precision. `units=False` skips the per-row work (biases, norms).
    """
    rows = as_units(tensor.detach(), unit_axis)
    n_units, width = rows.shape
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    shift = None
    s1 = s2 = s3 = s4 = 0.0
    finite = nan = inf = zeros = 0
    lo, hi = math.inf, -math.inf
    zero_units: list[int] = []
    hashes = []
    scale = None
    for start in range(0, n_units, step):
        chunk = rows[start:start + step].to(torch.float64)
        ok = torch.isfinite(chunk)
        n_nan = int(torch.isnan(chunk).sum())
        nan += n_nan
        inf += int((~ok).sum()) - n_nan
        values = chunk[ok] if not bool(ok.all()) else chunk.reshape(-1)
        if values.numel():
            if shift is None:
                shift = float(values.mean())
            d = values - shift
            d2 = d * d
            s1 += float(d.sum()); s2 += float(d2.sum()); s3 += float((d2 * d).sum()); s4 += float((d2 * d2).sum())
            finite += values.numel()
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        is_zero = chunk == 0
        zeros += int(is_zero.sum())
        if units and width:
            zero_units.extend((start + torch.nonzero(is_zero.all(dim=1)).flatten()).tolist())
            if scale is None:
                scale = _hash_scale(values)
            hashes.append(_row_hashes(chunk, scale, width))
    mean, var, kurt = _moments(finite, shift or 0.0, s1, s2, s3, s4)
    groups = _duplicate_groups(rows, torch.cat(hashes), scale, set(zero_units)) if hashes else []
    return TensorStats(
        numel=rows.numel(), n_units=n_units, finite=finite, nan=nan, inf=inf, mean=mean, std=math.sqrt(var),
        min=lo if finite else math.nan, max=hi if finite else math.nan,
        abs_max=max(abs(lo), abs(hi)) if finite else math.nan, excess_kurtosis=kurt,
        zero_fraction=zeros / rows.numel() if rows.numel() else 0.0,
        distinct=_distinct(tensor), zero_units=zero_units, duplicate_groups=groups)


def _moments(n: int, shift: float, s1: float, s2: float, s3: float, s4: float) -> tuple[float, float, float]:
    """Mean, population variance and excess kurtosis from power sums about `shift`."""
    if n == 0:
        return math.nan, math.nan, math.nan
    m1, m2, m3, m4 = s1 / n, s2 / n, s3 / n, s4 / n
    var = max(m2 - m1 * m1, 0.0)
    c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
    kurt = c4 / (var * var) - 3.0 if var > 0 else math.nan
    return shift + m1, var, kurt


def _distinct(tensor: torch.Tensor) -> int:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > MAX_EXACT_DISTINCT:
        flat = flat[:: flat.numel() // MAX_EXACT_DISTINCT + 1]
    return int(torch.unique(flat).numel())


def _hash_scale(values: torch.Tensor) -> float:
    """The rounding step for near-duplicate rows: a small fraction of the first chunk's spread."""
    spread = float(values.std()) if values.numel() > 1 else 0.0
    return spread * NEAR_DUPLICATE_TOLERANCE if spread > 0 else 1.0


def _quantize(chunk: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nan_to_num(torch.round(chunk / scale), nan=0.0, posinf=0.0, neginf=0.0).to(torch.int64)


def _row_hashes(chunk: torch.Tensor, scale: float, width: int) -> torch.Tensor:
    """A 64-bit hash per row of the rounded values: a random integer projection (wrapping)."""
    gen = torch.Generator().manual_seed(_HASH_SEED)
    weights = torch.randint(1, 2 ** 61, (width,), generator=gen, dtype=torch.int64)
    return (_quantize(chunk, scale) * weights).sum(dim=1)


def _duplicate_groups(rows: torch.Tensor, hashes: torch.Tensor, scale: float, zero_units: set[int]) -> list[list[int]]:
    """Groups of rows with equal hashes, confirmed by comparing their rounded values."""
    _, inverse, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    groups = []
    for bucket in torch.nonzero(counts > 1).flatten().tolist():
        members = [i for i in torch.nonzero(inverse == bucket).flatten().tolist() if i not in zero_units]
        while len(members) > 1:
            q = _quantize(rows[members].to(torch.float64), scale)
            same = (q == q[0]).all(dim=1).tolist()
            group = [m for m, s in zip(members, same) if s]
            if len(group) > 1:
                groups.append(group)
            members = [m for m, s in zip(members, same) if not s]
        if len(groups) >= MAX_REPORTED_GROUPS:
            break
    return groups
