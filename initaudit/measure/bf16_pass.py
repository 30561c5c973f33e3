"""bf16 measured from a histogram of its 65,536 bit patterns (with the `fast` extra: numba compiles the pass,
bf16_kernels.py). The counts make the extremes and how many values sit on them, zeros, NaN/Inf and the moments
exact and independent of how the tensor is cut (histograms add); the unit sums of squares, sums, projections and
column sums of squares come from the same read, in float64. Without numba bf16 takes the float32 pass of
stats._Scan (its moments then agree with these to float32 rounding)."""

from __future__ import annotations

import functools
import math
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


def tally(hist: np.ndarray) -> tuple[float, int, float, int, int, int, int]:
    """(min, how many at it, max, how many at it, zeros, NaN, Inf) of the counted values (the extremes of the
    finite ones: inf and -inf where there are none, as a pass over no values leaves them)."""
    seen = np.flatnonzero(hist)
    finite = seen[FINITE[seen]]
    nan = int(hist[seen[NAN[seen]]].sum())
    inf = int(hist[seen].sum()) - int(hist[finite].sum()) - nan
    zeros = int(hist[ZERO].sum())
    if not finite.size:
        return math.inf, 0, -math.inf, 0, zeros, nan, inf
    values = VALUES[finite]
    lo, hi = float(values.min()), float(values.max())
    return lo, int(hist[finite[values == lo]].sum()), hi, int(hist[finite[values == hi]].sum()), zeros, nan, inf


def finite_count(hist: np.ndarray) -> int:
    return int(hist[FINITE].sum())


def record(hist: np.ndarray) -> tuple[int, float, float, float, float, float] | None:
    """The counted values' power sums 1-4 as a pass record (count, shift, sums about the shift), about their mean
    rounded to bf16 (sums about 0 would lose a norm's variance to cancellation); None where none are finite."""
    seen = np.flatnonzero(hist)
    seen = seen[FINITE[seen]]
    if not seen.size:
        return None
    counts, values = hist[seen].astype(np.float64), VALUES[seen]
    n = int(hist[seen].sum())
    shift = float(torch.tensor(float(np.dot(counts, values)) / n).to(torch.bfloat16))
    d = values - shift
    d2 = d * d
    weighted = counts * d
    return n, shift, float(weighted.sum()), float(np.dot(weighted, d)), float(np.dot(weighted, d2)), \
        float(np.dot(counts * d2, d2))
