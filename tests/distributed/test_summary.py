"""Mergeable summaries: a tensor measured block by block, the blocks merged in any order (a retried block once),
gives the single-process statistics and samples bit for bit wherever dim-0 blocks are cut (on chunk boundaries, or
inside a chunk, as FSDP2's uneven shards are), and within float32 reassociation for column splits (tensor
parallelism)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from initaudit.measure import stats, summary
from initaudit.measure.samples import Samples


def identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bit for bit (NaN where NaN)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    return x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)


def assert_same_stats(a: stats.TensorStats, b: stats.TensorStats) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and identical(x, y), f.name
        elif isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), f.name
        else:
            assert x == y, (f.name, x, y)


def assert_same_samples(a: Samples, b: Samples) -> None:
    assert identical(a.ordered, b.ordered)
    for name in ("ortho", "spectrum", "spectrum_rows"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert identical(x, y), name


def row_blocks(w: torch.Tensor, n: int, aligned: bool = True) -> list[summary.Summary]:
    """`w` cut into n dim-0 blocks (on chunk boundaries where `aligned`), each summarized."""
    rows = w.shape[0]
    step = stats.chunk_rows(math.prod(w.shape[1:]))
    cuts = {0, rows}
    for i in range(1, n):
        cut = rows * i // n
        cuts.add(cut // step * step if aligned else cut)
    cuts = sorted(cuts)
    rest = (0,) * (w.dim() - 1)
    return [summary.summarize(w[a:b], "w", tuple(w.shape), (a, *rest)) for a, b in zip(cuts, cuts[1:])]


def planted(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A normal(0, 0.02) weight with a copied unit (across chunks), a zero unit and a NaN."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w[3] = w[shape[0] - 2]
    w[7] = 0
    w.view(-1)[shape[0] * 5 + 1] = math.nan
    return w


@pytest.mark.parametrize("shape,dtype", [((3000, 700), torch.float32), ((600, 3000), torch.bfloat16),
                                         ((40000, 16), torch.float32), ((96, 8, 3, 3), torch.float16),
                                         ((5000, 300), torch.float64)])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_blocks_on_chunk_boundaries_give_the_single_process_stats_bit_for_bit(shape, dtype, n):
    w = planted(shape, dtype)
    blocks = row_blocks(w, n)
    random.Random(n).shuffle(blocks)
    done = summary.finish(summary.merge(blocks))
    assert_same_stats(done.stats, stats.compute(w))
    assert_same_samples(done.samples, Samples.of(w))
    assert done.stats.duplicate_groups == [[3, shape[0] - 2]] and done.stats.zero_units == [7] and done.stats.nan == 1


def test_a_retried_block_counts_once_and_the_order_never_matters():
    w = planted((2048, 512))
    blocks = row_blocks(w, 4)
    once = summary.finish(summary.merge(blocks))
    retried = summary.finish(summary.merge(blocks[::-1] + blocks[1:3]))
    assert_same_stats(retried.stats, once.stats)
    assert retried.digest == once.digest and retried.stats.numel == w.numel()


def test_a_missing_block_is_refused_not_reported_as_a_smaller_tensor():
    blocks = row_blocks(planted((2048, 512)), 4)
    with pytest.raises(ValueError, match="part of the tensor"):
        summary.finish(summary.merge(blocks[:3]))


@pytest.mark.parametrize("shape,dtype", [((1001, 384), torch.float32), ((37, 64), torch.float32),
                                         ((3001, 700), torch.bfloat16), ((97, 8, 3, 3), torch.float16)])
@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_uneven_row_shards_give_the_single_process_stats_bit_for_bit(shape, dtype, n):
    """Cuts inside a chunk (FSDP2's ceil(rows / ranks) shards, an empty last shard): the pieces of a chunk the
    blocks split are measured as that chunk once merged, so nothing depends on where the cuts fell."""
    w = planted(shape, dtype)
    blocks = row_blocks(w, n, aligned=False)
    assert any(b.pieces for b in blocks)
    random.Random(n).shuffle(blocks)
    done = summary.finish(summary.merge(blocks + blocks[:1]))
    assert_same_stats(done.stats, stats.compute(w))
    assert_same_samples(done.samples, Samples.of(w))
    assert done.digest == summary.finish(summary.merge(row_blocks(w, 1))).digest


def test_an_empty_shard_anywhere_changes_nothing():
    """FSDP2 gives a rank past the last row an empty shard: summarized at any row (at 0 too, merged first, where a
    real block sits at the same offset), it adds nothing and hides nothing."""
    w = planted((1001, 384))
    empty = [summary.summarize(w[r:r], "w", (1001, 384), (r, 0)) for r in (0, 500, 1001)]
    done = summary.finish(summary.merge(empty + row_blocks(w, 3, aligned=False)))
    assert_same_stats(done.stats, stats.compute(w))


def test_a_chunk_missing_a_piece_is_refused():
    blocks = row_blocks(planted((1001, 384)), 3, aligned=False)
    with pytest.raises(ValueError, match="part of the tensor"):
        summary.finish(summary.merge(blocks[:2]))


def test_column_splits_agree_to_reassociation_with_exact_counts():
    w = planted((1001, 384))
    ref = stats.compute(w)
    got = summary.finish(summary.merge(
        [summary.summarize(w[:, a:a + 96], "w", (1001, 384), (0, a)) for a in range(0, 384, 96)])).stats
    assert got.std == pytest.approx(ref.std, rel=1e-6)
    assert got.excess_kurtosis == pytest.approx(ref.excess_kurtosis, abs=1e-5)
    assert (got.min, got.max, got.min_count, got.max_count, got.nan, got.zero_fraction, got.finite) == \
        (ref.min, ref.max, ref.min_count, ref.max_count, ref.nan, ref.zero_fraction, ref.finite)
    assert got.zero_units == ref.zero_units and got.duplicate_groups == ref.duplicate_groups
    assert torch.allclose(got.unit_norms, ref.unit_norms, rtol=1e-5)
    assert torch.allclose(got.input_norms, ref.input_norms, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thousands_of_units_find_no_chance_copies_and_find_a_near_copy(dtype):
    """8192 units of 2048 (a GPT MLP's fc1): without the values, the pass's two projections, the sum and the norm
    let chance pairs through (the fan-out once reported units 596 and 5065 of such a bf16 weight as copies); a unit
    within the near-copy tolerance of another is a copy in both paths."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(8192, 2048, generator=g) * 0.02).to(dtype)
    w[100] = w[7000] + (torch.rand(2048, generator=g) - 0.5).to(dtype) * 0.02 * stats.NEAR_DUPLICATE_TOLERANCE
    ref = stats.compute(w)
    got = summary.finish(summary.merge(row_blocks(w, 2, aligned=False))).stats
    assert ref.duplicate_groups == got.duplicate_groups == [[100, 7000]]


def test_digest_tells_a_one_value_change_and_equal_tensors_apart():
    w = planted((512, 256))
    other = w.clone()
    other[100, 3] += 0.5
    digest = summary.finish(summary.merge(row_blocks(w, 2))).digest
    assert summary.finish(summary.merge(row_blocks(w.clone(), 4))).digest == digest
    assert summary.finish(summary.merge(row_blocks(other, 2))).digest != digest


def test_a_small_tensor_travels_whole_and_a_large_one_does_not():
    small, large = planted((256, 64)), planted((1024, 512))
    assert identical(summary.finish(summary.merge(row_blocks(small, 2))).samples.values, small)
    assert summary.finish(summary.merge(row_blocks(large, 2))).samples.values is None


def test_a_block_split_along_dim_2_is_refused():
    w = torch.randn(8, 4, 6)
    with pytest.raises(ValueError, match="dims 0 and 1"):
        summary.summarize(w[:, :, :3], "w", (8, 4, 6), (0, 0, 0))


def test_the_figures_do_not_depend_on_how_many_threads_torch_runs():
    """A rank under torchrun runs one OpenMP thread, a notebook all the cores: the same tensor, the same figures."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1500, 1000, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = summary.finish(summary.merge(row_blocks(w, 2)))
        torch.set_num_threads(max(2, threads))
        many = stats.compute(w, units=False), stats.compute(w)
    finally:
        torch.set_num_threads(threads)
    assert_same_stats(many[1], one.stats)
    assert many[0].std == stats.compute(w, units=False).std
