"""A digest of a tensor's values that its shards add up to, whatever way it is split: each entry hashed with its
global index, the hashes summed modulo 2⁶⁴. Two tensors of one shape and dtype hold the same values (bit for bit,
±0 alike) exactly when their digests agree, up to a 2⁻⁶⁴ chance: ties and identical layers are then compared
across ranks without moving a value."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK = (1 << 64) - 1
MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # odd 64-bit constants (splitmix64's)
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ROWS_AT_ONCE = 1 << 20  # entries hashed at a time (three int64 temporaries of that size)


@dataclass
class Digest:
    """A partial digest: the sum of the entries' hashes (mod 2⁶⁴), how many entries it covers, and whether any is
    NaN (a NaN equals nothing, not even itself)."""

    total: int = 0
    count: int = 0
    nan: bool = False

    def __add__(self, other: "Digest") -> "Digest":
        return Digest((self.total + other.total) & MASK, self.count + other.count, self.nan or other.nan)


def inner_index(shape: tuple[int, ...], offset: tuple[int, ...], local: tuple[int, ...]) -> torch.Tensor:
    """The global flat index of each entry of one row of the block (all dims but the first), as int64."""
    index = torch.zeros((), dtype=torch.int64)
    stride = 1
    for dim in range(len(shape) - 1, 0, -1):
        positions = (torch.arange(local[dim], dtype=torch.int64) + offset[dim]) * stride
        index = positions.view(-1, *([1] * (len(shape) - 1 - dim))) + index
        stride *= shape[dim]
    return index.reshape(-1)


def hashed(values: torch.Tensor, index: torch.Tensor) -> int:
    """The sum of the hashes of entries (as int64 bit patterns) at their global indices, mod 2⁶⁴."""
    x = index * MIX[0] + values * MIX[1]
    x = (x ^ (x >> 31)) * MIX[2]
    x = x ^ (x >> 29)
    return int(x.sum()) & MASK


def block_digest(block: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...]) -> Digest:
    """The digest of one block of a tensor of global `shape`, the block at `offset`."""
    if block.numel() == 0:
        return Digest()
    if block.is_complex():
        return Digest(0, block.numel(), True)  # not compared (no layer of the audit holds complex weights)
    nan = bool(torch.isnan(block).any()) if block.is_floating_point() else False
    if block.is_floating_point():
        block = torch.where(block == 0, torch.zeros_like(block), block)  # -0.0 == 0.0, as torch.equal has it
    bits = block.contiguous().view(INT_OF_WIDTH[block.element_size()]).to(torch.int64)
    if block.dim() == 0:
        return Digest(hashed(bits.reshape(1), torch.zeros(1, dtype=torch.int64)), 1, nan)
    inner = inner_index(shape, offset, tuple(block.shape))
    rows = bits.reshape(block.shape[0], -1)
    row_stride = math.prod(shape[1:])
    step = max(1, ROWS_AT_ONCE // max(1, inner.numel()))
    total = 0
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        first = (torch.arange(chunk.shape[0], dtype=torch.int64) + offset[0] + start) * row_stride
        total += hashed(chunk, first[:, None] + inner[None, :])
    return Digest(total & MASK, block.numel(), nan)
