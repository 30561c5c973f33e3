"""Signs that a tensor holds what allocation left in memory (`torch.empty` never filled) rather than an init draw
or trained weights, read from the sorted sample of its values the statistics pass already made.

Memory that was never written holds other data read as floats: small integers and pointers' high words are
denormals, random bits span the whole exponent range (and a few are NaN or Inf), fill patterns repeat one
value. An init draw or a trained weight does none of that: its large magnitudes stay within a decade of its
typical one (near-zero values, such as a fixed filter's rounding residue of cos(pi/2), are no sign), and a normal at its own mean and std predicts its share of denormals (a small-std fp16 weight holds some).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

HUGE = 1e6             # no init draws and no training leaves a material share of entries beyond this
FAR_OUT = 8.0          # a pile counts this many robust stds (1.4826·MAD) from the median of the nonzero values
MIN_PILE = 8           # ... with at least this many entries of the sample on the one value
DENORMAL_SLACK = 10.0  # denormals count beyond this many times what the fitted normal predicts (peaked weights hold more)


@dataclass(frozen=True)
class Garbage:
    subnormal_share: float = 0.0    # share of finite entries that are subnormal in the tensor's dtype
    subnormal_excess: float = 0.0   # of it, the share beyond DENORMAL_SLACK × a normal's prediction (and 4 s.e.)
    magnitude_decades: float = 0.0  # log10 of the 90th percentile over the median of the nonzero |values|
    huge_share: float = 0.0         # share of finite entries beyond HUGE in magnitude
    median_magnitude: float = math.nan  # median nonzero |value|
    pile_share: float = 0.0         # share of finite entries on the most common value far out (see _pile)
    pile_value: float | None = None


def evidence(ordered: torch.Tensor, dtype: torch.dtype, mean: float, std: float, lo: float, hi: float) -> Garbage:
    """The signs of garbage in `ordered` (a sorted sample of a tensor of `dtype` whose finite values have these
    moments and extremes)."""
    values = ordered.numpy()
    finite = values[np.isfinite(values)]
    nonzero = finite[finite != 0]
    if nonzero.size == 0:
        return Garbage()
    magnitude = np.abs(nonzero)
    k50, k90 = (magnitude.size - 1) // 2, (magnitude.size - 1) * 9 // 10
    median, q90 = np.partition(magnitude, (k50, k90))[[k50, k90]]  # one partial sort: np.quantile's overhead is 10x
    share, excess = _subnormals(magnitude, finite.size, dtype, mean, std)
    pile_value, pile_count = _pile(nonzero, lo, hi) if _repeats(nonzero) else (None, 0)
    return Garbage(subnormal_share=share, subnormal_excess=excess, magnitude_decades=math.log10(float(q90) / float(median)),
                   huge_share=int(np.count_nonzero(magnitude > HUGE)) / finite.size, median_magnitude=float(median),
                   pile_share=pile_count / finite.size, pile_value=pile_value)


def _subnormals(magnitude: np.ndarray, n: int, dtype: torch.dtype, mean: float, std: float) -> tuple[float, float]:
    """The share of subnormal entries, and its excess over DENORMAL_SLACK times the share that a normal at the
    tensor's mean and std gives |x| < the dtype's smallest normal, beyond 4 standard errors."""
    tiny = torch.finfo(dtype).tiny
    share = int(np.count_nonzero(magnitude < tiny)) / n
    if not (std > 0 and math.isfinite(std) and math.isfinite(mean)):
        return share, 0.0
    expected = _normal_cdf((tiny - mean) / std) - _normal_cdf((-tiny - mean) / std)
    excess = share - DENORMAL_SLACK * expected - 4 * math.sqrt(expected * (1 - expected) / n)
    return share, max(excess, 0.0)


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def _repeats(ordered: np.ndarray) -> bool:
    """Some value of the sorted `ordered` repeats MIN_PILE times at least (a cheap test: most fp32 tensors repeat
    none)."""
    return int(np.count_nonzero(ordered[1:] == ordered[:-1])) >= MIN_PILE - 1


def _pile(nonzero: np.ndarray, lo: float, hi: float) -> tuple[float | None, int]:
    """The most common value FAR_OUT robust stds from the median of the sorted nonzero values, and its count (0
    if under MIN_PILE or none). On the tensor's min or max it counts only apart from the rest (more than a robust
    std from the nearest other value): a pile where the values run up to it is on a truncation bound, the
    truncation rule's."""
    nonzero = nonzero.astype(np.float64)  # garbage's differences overflow float32
    starts = np.flatnonzero(np.r_[True, nonzero[1:] != nonzero[:-1]])
    counts = np.diff(np.r_[starts, nonzero.size])
    center = float(nonzero[(nonzero.size - 1) // 2])  # sorted: the median
    spread = 1.4826 * float(np.median(np.abs(nonzero - center)))
    if not spread > 0:  # most values equal: that value is the bulk, not a pile far out
        return None, 0
    runs = nonzero[starts]
    gaps = np.diff(runs)
    apart = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf]) > spread  # from the nearest other value
    edge = (runs == lo) | (runs == hi)
    typical = float(np.median(np.abs(nonzero)))  # values in a few tight clusters (Adam's ±lr first step) have a
    # robust spread near 0: far out must also mean far beyond the values' typical magnitude
    far = (np.abs(runs - center) > FAR_OUT * spread) & (np.abs(runs) > FAR_OUT * typical) & (counts >= MIN_PILE) \
        & (apart | ~edge)
    if not far.any():
        return None, 0
    best = int(np.argmax(np.where(far, counts, 0)))
    return float(runs[best]), int(counts[best])
