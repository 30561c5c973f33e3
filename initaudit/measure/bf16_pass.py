"""bf16 measured from a histogram of its 65,536 bit patterns (with the `fast` extra: numba compiles the pass,
bf16_kernels.py). The counts make the extremes and how many values sit on them, zeros and NaN/Inf exact, and the
moments float64 sums of exact terms (about the mean rounded to bf16), all independent of how the tensor is cut
(histograms add); the unit sums of squares, sums and projections come from the same read in float64, the column
sums of squares as the float32 pass sums them. A histogram travels as the patterns seen and their counts
(`Counts`). Without numba bf16 takes the float32 pass of stats._Scan (its moments then agree with these to
float32 rounding)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

PATTERNS = 1 << 16
MIN_WIDTH = 64   # tensors with units this wide go through the compiled pass (biases, norms: the float32 one)

_RAW = torch.arange(PATTERNS, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double().numpy()
NO_COLUMNS = np.empty(0, dtype=np.int64)   # no column sample kept (a wide tensor)
NO_PICKS = np.empty((0, 0), dtype=np.float32)
FINITE = np.isfinite(_RAW)
NAN = np.isnan(_RAW)
VALUES = np.where(FINITE, _RAW, 0.0)   # every pattern's value; NaN and Inf read as 0 in every sum
RAW = _RAW.astype(np.float32)         # every pattern's value as float32 (exact; NaN and Inf kept)
ZERO = np.array([0x0000, 0x8000])      # +0 and -0


@functools.lru_cache(maxsize=1)
def kernels() -> ModuleType | None:
    """The compiled loops, or None where numba is not installed."""
    try:
        from initaudit.measure import bf16_kernels
    except ImportError:
        return None
    return bf16_kernels


def takes(dtype: torch.dtype, width: int, scale: float) -> bool:
    """Whether a pass over `dtype` values `width` to a unit (read times `scale`) is the compiled one."""
    return dtype == torch.bfloat16 and width >= MIN_WIDTH and scale == 1.0 and kernels() is not None


def patterns(chunk: torch.Tensor) -> np.ndarray:
    """A contiguous bf16 tensor's bit patterns, as a numpy view."""
    return chunk.view(torch.int16).numpy().view(np.uint16)


@dataclass(frozen=True)
class Counts:
    """A histogram of bit patterns as it travels: the patterns seen (increasing) and how many values hold each."""

    patterns: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, dense: np.ndarray) -> "Counts":
        """From a dense [PATTERNS] histogram."""
        seen = np.flatnonzero(dense)
        return cls(seen.astype(np.uint16), dense[seen])

    def __add__(self, other: "Counts") -> "Counts":
        dense = np.zeros(PATTERNS, dtype=np.int64)
        dense[self.patterns] += self.counts
        dense[other.patterns] += other.counts
        return Counts.of(dense)

    def finite(self) -> "Counts":
        keep = FINITE[self.patterns]
        return Counts(self.patterns[keep], self.counts[keep])


def tally(hist: Counts) -> tuple[float, int, float, int, int, int, int]:
    """(min, how many at it, max, how many at it, zeros, NaN, Inf) of the counted values (the extremes of the
    finite ones, +0 for a signed zero: inf and -inf where there are none, as a pass over no values leaves them)."""
    finite = hist.finite()
    nan = int(hist.counts[NAN[hist.patterns]].sum())
    inf = int(hist.counts.sum()) - int(finite.counts.sum()) - nan
    zeros = int(hist.counts[np.isin(hist.patterns, ZERO)].sum())
    if not finite.patterns.size:
        return math.inf, 0, -math.inf, 0, zeros, nan, inf
    values = VALUES[finite.patterns]
    lo, hi = float(values.min()), float(values.max())
    lo_count, hi_count = int(finite.counts[values == lo].sum()), int(finite.counts[values == hi].sum())
    return lo + 0.0, lo_count, hi + 0.0, hi_count, zeros, nan, inf


def finite_count(hist: Counts) -> int:
    return int(hist.finite().counts.sum())


def record(hist: Counts) -> tuple[int, float, float, float, float, float] | None:
    """The counted values' power sums 1-4 as a pass record (count, shift, sums about the shift), about their mean
    rounded to bf16 (sums about 0 would lose a norm's variance to cancellation); None where none are finite."""
    finite = hist.finite()
    if not finite.patterns.size:
        return None
    counts, values = finite.counts.astype(np.float64), VALUES[finite.patterns]
    n = int(finite.counts.sum())
    shift = float(torch.tensor(float(np.dot(counts, values)) / n).to(torch.bfloat16))
    d = values - shift
    d2 = d * d
    weighted = counts * d
    return n, shift, float(weighted.sum()), float(np.dot(weighted, d)), float(np.dot(weighted, d2)), \
        float(np.dot(counts * d2, d2))
