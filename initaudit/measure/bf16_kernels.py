"""The compiled loops of the bf16 pass (numba; imported only where the `fast` extra is installed): one read of a
chunk's bit patterns counts each pattern and, for units, adds each unit's sum of squares, sum and two random
projections and the chunk's column sums of squares in float64 (a bf16 value and its square are exact there).
Each unit's figures are added in its own order whichever chunk or block holds it."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _pick(bits: np.ndarray, r: int, raw: np.ndarray, columns: np.ndarray,
          picked: np.ndarray) -> None:  # pragma: no cover - compiled
    """picked[r] = row r's values at `columns` (`raw`: each pattern's float32 value)."""
    for j in range(columns.size):
        picked[r, j] = raw[bits[r, columns[j]]]


@njit(nogil=True, cache=True)
def count(bits: np.ndarray, hist: np.ndarray, raw: np.ndarray, columns: np.ndarray,
          picked: np.ndarray) -> None:  # pragma: no cover - compiled
    """hist[pattern] += how many values of a [rows, width] chunk of patterns hold it; picked[row] = the row's
    values at `columns`."""
    rows, width = bits.shape
    for r in range(rows):
        _pick(bits, r, raw, columns, picked)
        for c in range(width):
            hist[bits[r, c]] += 1


@njit(nogil=True, cache=True)
def _counted_row(bits: np.ndarray, r: int, hist: np.ndarray) -> int:  # pragma: no cover - compiled
    """Row r's patterns counted into `hist`; how many are nonzero (NaN counts as nonzero, -0 as zero)."""
    nonzero = 0
    for c in range(bits.shape[1]):
        b = bits[r, c]
        hist[b] += 1
        nonzero += (b & 0x7FFF) != 0
    return nonzero


@njit(nogil=True, cache=True)
def _row_sums(bits: np.ndarray, r: int, values: np.ndarray, basis: np.ndarray,
              column_sq: np.ndarray) -> tuple:  # pragma: no cover - compiled
    """Row r's sum of squares, projections on basis[0] and basis[1], and sum; column_sq[c] += its square at c.
    Four lanes of each sum (columns c mod 4), added pairwise at the end: the same order for a row wherever it is
    read, and four independent chains for the CPU to overlap."""
    s0 = s1 = s2 = s3 = a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = t0 = t1 = t2 = t3 = 0.0
    width = bits.shape[1]
    tail = width - width % 4
    for c in range(0, tail, 4):
        x0, x1 = values[bits[r, c]], values[bits[r, c + 1]]
        x2, x3 = values[bits[r, c + 2]], values[bits[r, c + 3]]
        q0, q1, q2, q3 = x0 * x0, x1 * x1, x2 * x2, x3 * x3
        s0, s1, s2, s3 = s0 + q0, s1 + q1, s2 + q2, s3 + q3
        a0, a1 = a0 + basis[0, c] * x0, a1 + basis[0, c + 1] * x1
        a2, a3 = a2 + basis[0, c + 2] * x2, a3 + basis[0, c + 3] * x3
        b0, b1 = b0 + basis[1, c] * x0, b1 + basis[1, c + 1] * x1
        b2, b3 = b2 + basis[1, c + 2] * x2, b3 + basis[1, c + 3] * x3
        t0, t1, t2, t3 = t0 + x0, t1 + x1, t2 + x2, t3 + x3
        column_sq[c] += q0
        column_sq[c + 1] += q1
        column_sq[c + 2] += q2
        column_sq[c + 3] += q3
    for c in range(tail, width):
        x0 = values[bits[r, c]]
        s0, a0, b0, t0 = s0 + x0 * x0, a0 + basis[0, c] * x0, b0 + basis[1, c] * x0, t0 + x0
        column_sq[c] += x0 * x0
    return (s0 + s1) + (s2 + s3), (a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3), (t0 + t1) + (t2 + t3)


@njit(nogil=True, cache=True)
def units(bits: np.ndarray, values: np.ndarray, basis: np.ndarray, hist: np.ndarray, column_sq: np.ndarray,
          unit_sq: np.ndarray, proj: np.ndarray, nonzero: np.ndarray, raw: np.ndarray, columns: np.ndarray,
          picked: np.ndarray) -> None:  # pragma: no cover - compiled
    """For a [rows, width] chunk of patterns: the histogram, and per row its sum of squares, its projections on
    basis[0] and basis[1] and its sum (proj[:, row]) and its count of nonzero patterns; column_sq[c] += each
    row's square at c; picked[row] = the row's values at `columns`. `values`: each pattern's float64 value,
    non-finite ones 0."""
    for r in range(bits.shape[0]):
        _pick(bits, r, raw, columns, picked)
        nonzero[r] = _counted_row(bits, r, hist)
        unit_sq[r], proj[0, r], proj[1, r], proj[2, r] = _row_sums(bits, r, values, basis, column_sq)
