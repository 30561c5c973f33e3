"""The compiled loops of the bf16 pass (numba; imported only where the `fast` extra is installed): one read of a
chunk's bit patterns counts each pattern and, for units, adds each unit's sum of squares, sum and two random
projections in float64 (a bf16 value and its square are exact there) and the chunk's column sums of squares in
float32, as the float32 pass takes them.

A row's sums are vectorized (`fastmath` reassociation only: no assumption about NaN or Inf, which are read as 0
before): their order is the compiled loop's, fixed on one machine, the same for a row whichever chunk or block
holds it."""

from __future__ import annotations

import numpy as np
from numba import njit

_SUMS = {"reassoc", "contract"}
_EXPONENT = 0x7F800000   # a float32's exponent bits: all set for NaN and Inf


@njit(nogil=True, cache=True)
def _pick(bits: np.ndarray, r: int, raw: np.ndarray, columns: np.ndarray,
          picked: np.ndarray) -> None:  # pragma: no cover - compiled
    """picked[r] = row r's values at `columns` (`raw`: each pattern's float32 value)."""
    for j in range(columns.size):
        picked[r, j] = raw[bits[r, columns[j]]]


@njit(nogil=True, cache=True)
def _count_row(bits: np.ndarray, r: int, hist: np.ndarray) -> None:  # pragma: no cover - compiled
    for c in range(bits.shape[1]):
        hist[bits[r, c]] += 1


@njit(nogil=True, cache=True)
def count(bits: np.ndarray, hist: np.ndarray, raw: np.ndarray, columns: np.ndarray,
          picked: np.ndarray) -> None:  # pragma: no cover - compiled
    """hist[pattern] += how many values of a [rows, width] chunk of patterns hold it; picked[row] = the row's
    values at `columns`."""
    for r in range(bits.shape[0]):
        _pick(bits, r, raw, columns, picked)
        _count_row(bits, r, hist)


@njit(nogil=True, cache=True)
def _counted_row(bits: np.ndarray, r: int, hist: np.ndarray, wide: np.ndarray) -> int:  # pragma: no cover - compiled
    """Row r's patterns counted into `hist` and widened into `wide` as float32 bit patterns (a bf16 is a
    float32's upper half; NaN and Inf as 0); how many of its values are nonzero (NaN counts, -0 does not)."""
    nonzero = 0
    for c in range(bits.shape[1]):
        b = bits[r, c]
        hist[b] += 1
        v = np.uint32(b) << 16
        nonzero += (v & 0x7FFF0000) != 0
        wide[c] = v if (v & _EXPONENT) != _EXPONENT else 0
    return nonzero


@njit(nogil=True, cache=True, fastmath=_SUMS)
def _row_sums(x: np.ndarray, basis: np.ndarray, column_sq: np.ndarray) -> tuple:  # pragma: no cover - compiled
    """A row's sum of squares, projections on basis[0] and basis[1], and sum, in float64; column_sq (float32,
    as the float32 pass sums a chunk's columns) += its squares (exact in float32)."""
    s = a = b = t = 0.0
    for c in range(x.size):
        column_sq[c] += x[c] * x[c]
        v = np.float64(x[c])
        s += v * v
        a += basis[0, c] * v
        b += basis[1, c] * v
        t += v
    return s, a, b, t


@njit(nogil=True, cache=True)
def units(bits: np.ndarray, sizes: np.ndarray, basis: np.ndarray, hist: np.ndarray, column_sq: np.ndarray,
          unit_sq: np.ndarray, proj: np.ndarray, nonzero: np.ndarray, raw: np.ndarray, columns: np.ndarray,
          picked: np.ndarray) -> None:  # pragma: no cover - compiled
    """For [rows, width] patterns read in chunks of `sizes` rows: the histogram, and per row its sum of squares,
    its projections on basis[0] and basis[1] and its sum (proj[:, row]) and its count of nonzero values;
    column_sq (float64) += each chunk's column sums of squares (float32 sums, exact there: the float32 pass's);
    picked[row] = the row's values at `columns`."""
    wide = np.empty(bits.shape[1], dtype=np.uint32)
    values = wide.view(np.float32)
    chunk = np.empty(bits.shape[1], dtype=np.float32)
    first = 0
    for size in sizes:
        chunk[:] = 0.0
        for r in range(first, first + size):
            _pick(bits, r, raw, columns, picked)
            nonzero[r] = _counted_row(bits, r, hist, wide)
            unit_sq[r], proj[0, r], proj[1, r], proj[2, r] = _row_sums(values, basis, chunk)
        first += size
        column_sq += chunk.astype(np.float64)
