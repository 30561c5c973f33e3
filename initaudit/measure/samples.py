"""The values of a tensor that the fingerprint and the fresh/trained test read beyond its statistics, each picked
by its global index so that a block of the tensor (a shard, a checkpoint chunk) gives exactly its share of them:
the strided sample of every value (distinct count, uninitialized memory, the shape fit), the rows or columns the
orthogonality test samples, the strided block whose top singular value the spectrum test measures, and the whole
tensor where it is small (conventions, dead units' biases). `Samples.of(tensor)` picks them from a tensor at hand
(`source`: it stays reachable for the re-measures that need every value); a merged summary gives the same
picks from its blocks (measure/summary.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from initaudit.measure.stats import DISTINCT_SAMPLE, as_units, column_sample, sample_indices, sorted_sample

SPECTRUM_BLOCK = 512      # rows and columns of the strided block whose top singular value is measured
SMALL_VALUES = 1 << 17    # a tensor of at most this many values (or of one dim: a bias, a norm) travels whole


@dataclass
class Samples:
    """What is read of a tensor beyond its stats (see the module's docstring)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ordered: torch.Tensor            # sorted strided sample of the flat values (float32 or float64)
    ortho: torch.Tensor | None       # [k, length]: the sampled rows (or columns) of the dim-0 flattening
    spectrum: torch.Tensor | None    # [rows, cols]: the strided block of the units' view (rows: spectrum_rows)
    spectrum_rows: torch.Tensor | None
    values: torch.Tensor | None = None   # the whole tensor, where small
    source: torch.Tensor | None = None   # the tensor itself, where at hand

    @classmethod
    def of(cls, tensor: torch.Tensor, unit_axis: int = 0) -> "Samples":
        """The picks of a tensor at hand."""
        ortho = ortho_vectors(tensor)  # before detach: the columns stats.compute kept are found by this object
        tensor = tensor.detach()
        rows_idx, block = spectrum_block(as_units(tensor, unit_axis)) if tensor.dim() >= 2 else (None, None)
        return cls(tuple(tensor.shape), tensor.dtype, sorted_sample(tensor), ortho, block, rows_idx,
                   tensor if travels_whole(tuple(tensor.shape)) else None, tensor)

    def kept(self) -> "Samples":
        """What is kept once the tensor is judged: a small tensor's values (copied: the tensor's memory goes back to
        its file), for the conventions and dead units; the picks are dropped (a model's weights would hold them all)."""
        return replace(self, ordered=self.ordered[:0], ortho=None, spectrum=None, spectrum_rows=None, source=None,
                       values=None if self.values is None else self.values.clone())

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "Samples":
        """A tensor no fingerprint reads (a bias, a norm): its values where it travels whole, no picks."""
        tensor = tensor.detach()
        return cls(tuple(tensor.shape), tensor.dtype, tensor.new_empty(0), None, None, None,
                   tensor if travels_whole(tuple(tensor.shape)) else None)

    def scaled(self, factor: float) -> "Samples":
        """The picks of the tensor times `factor` (the weight the forward pass uses)."""
        if factor == 1.0:
            return self
        def times(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t * factor
        return replace(self, ordered=self.ordered * factor, ortho=times(self.ortho), spectrum=times(self.spectrum),
                       values=times(self.values), source=times(self.source))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def travels_whole(shape: tuple[int, ...]) -> bool:
    """Whether a tensor's values are kept whole: small ones, and those of one dim (biases, norms: dead units read
    their layer's bias)."""
    return len(shape) <= 1 or math.prod(shape) <= SMALL_VALUES


def flat_stride(numel: int) -> int:
    """The stride of the flat sample (stats.sample): every value of a small tensor, about DISTINCT_SAMPLE else."""
    return numel // DISTINCT_SAMPLE + 1 if numel > DISTINCT_SAMPLE else 1


def ortho_rows(shape: tuple[int, ...]) -> tuple[bool, torch.Tensor] | None:
    """Whether the orthogonality test samples rows (else columns) of the dim-0 flattening, and which; None where
    it runs no test (fewer than 2 dims)."""
    if len(shape) < 2 or shape[0] < 1 or math.prod(shape) == 0:
        return None
    rows, cols = shape[0], math.prod(shape[1:])
    return (True, sample_indices(rows)) if rows <= cols else (False, sample_indices(cols))


def ortho_vectors(tensor: torch.Tensor) -> torch.Tensor | None:
    """The rows (or columns, whichever are fewer) of the dim-0 flattening the orthogonality test samples."""
    pick = ortho_rows(tuple(tensor.shape))
    if pick is None:
        return None
    by_rows, idx = pick
    return tensor.detach().reshape(tensor.shape[0], -1)[idx] if by_rows else column_sample(tensor)


def spectrum_strides(n_units: int, width: int) -> tuple[int, int]:
    """Every how many units and columns the spectrum block takes one."""
    return n_units // SPECTRUM_BLOCK + 1, width // SPECTRUM_BLOCK + 1


def spectrum_block(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit indices, values) of the strided block of a [units, width] view."""
    rs, cs = spectrum_strides(*rows.shape)
    return torch.arange(0, rows.shape[0], rs), rows[::rs, ::cs]
