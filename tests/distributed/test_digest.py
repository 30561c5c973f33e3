"""The value digest ties and identical layers are compared by across ranks: its shards add up to the whole tensor's
digest however the tensor is split (rows, columns, empty blocks), and it tells values apart bit for bit."""

from __future__ import annotations

import torch

from initaudit.distributed.digest import Digest, block_digest


def whole(t: torch.Tensor) -> Digest:
    return block_digest(t, tuple(t.shape), (0,) * t.dim())


def split(t: torch.Tensor, rows: list[int], cols: list[int]) -> Digest:
    """The digests of `t` cut at those rows and columns (empty pieces included), added up."""
    total = Digest()
    for r0, r1 in zip(rows, rows[1:]):
        for c0, c1 in zip(cols, cols[1:]):
            total = total + block_digest(t[r0:r1, c0:c1], tuple(t.shape), (r0, c0) + (0,) * (t.dim() - 2))
    return total


def test_shards_add_up_to_the_whole_tensor():
    t = torch.randn(37, 10, 3, generator=torch.Generator().manual_seed(0))
    assert split(t, [0, 19, 37], [0, 10]) == whole(t)               # FSDP2 on two ranks
    assert split(t, [0, 10, 20, 30, 37, 37], [0, 10]) == whole(t)   # four ranks and an empty shard
    assert split(t, [0, 37], [0, 3, 7, 10]) == whole(t)             # columns (tensor parallel)
    assert split(t, [0, 5, 37], [0, 4, 10]) == whole(t)
    assert whole(t).count == t.numel()


def test_values_are_told_apart_bit_for_bit():
    t = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    nudged = t.clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(1.0))
    swapped = t.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert whole(t.clone()) == whole(t)
    assert whole(nudged).total != whole(t).total
    assert whole(swapped).total != whole(t).total                   # the same values elsewhere are not the same tensor
    assert whole(t.bfloat16()) == whole(t.bfloat16().clone())


def test_signed_zeros_are_equal_and_nan_equals_nothing():
    zeros = torch.zeros(4, 4)
    assert whole(-zeros) == whole(zeros)                           # as torch.equal has it
    with_nan = torch.randn(4, 4)
    with_nan[1, 1] = float("nan")
    assert whole(with_nan).nan and not whole(zeros).nan
