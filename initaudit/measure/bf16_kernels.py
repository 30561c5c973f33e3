"""The compiled loops of the bf16 pass (numba; imported only where the `fast` extra is installed): one read of a
chunk's bit patterns counts each pattern and, for units, adds each unit's sum of squares, sum and two random
projections and the chunk's column sums of squares in float64 (a bf16 value and its square are exact there).
Each unit's figures are added in its own order whichever chunk or block holds it."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def count(bits: np.ndarray, hist: np.ndarray) -> None:  # pragma: no cover - compiled
    """hist[pattern] += how many values of `bits` (any shape, flattened) hold it."""
    for b in bits.ravel():
        hist[b] += 1


@njit(nogil=True, cache=True)
def units(bits: np.ndarray, values: np.ndarray, basis: np.ndarray, hist: np.ndarray, column_sq: np.ndarray,
          unit_sq: np.ndarray, proj: np.ndarray, nonzero: np.ndarray) -> None:  # pragma: no cover - compiled
    """For a [rows, width] chunk of patterns: the histogram, and per row its sum of squares, its projections on
    basis[0] and basis[1] and its sum (proj[:, row]) and its count of nonzero patterns (NaN counts as nonzero);
    column_sq[c] += each row's square at c. `values`: each pattern's float64 value, non-finite ones 0."""
    rows, width = bits.shape
    for r in range(rows):
        nz = 0
        for c in range(width):
            b = bits[r, c]
            hist[b] += 1
            nz += (b & 0x7FFF) != 0
        s = 0.0
        p0 = 0.0
        p1 = 0.0
        p2 = 0.0
        for c in range(width):
            x = values[bits[r, c]]
            x2 = x * x
            s += x2
            p0 += basis[0, c] * x
            p1 += basis[1, c] * x
            p2 += x
            column_sq[c] += x2
        unit_sq[r] = s
        proj[0, r] = p0
        proj[1, r] = p1
        proj[2, r] = p2
        nonzero[r] = nz
