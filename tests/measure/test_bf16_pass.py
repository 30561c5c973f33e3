"""The compiled bf16 pass (the `fast` extra): the histogram of bit patterns gives exact extremes, counts and
moments whatever way the tensor is cut (column splits too), the per-unit figures are float64, garbage magnitudes
and denormals need no second pass, and without numba the float32 pass gives the same verdicts."""

from __future__ import annotations

import math

import pytest
import torch

from initaudit.measure import bf16_pass, stats, summary


def planted(rows: int = 3000, width: int = 700, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, width, generator=g) * 0.02).to(torch.bfloat16)
    w[3] = w[rows - 2]
    w[7] = 0
    w[11, :5] = -0.0
    w.view(-1)[width * 5 + 1] = math.nan
    w.view(-1)[width * 6 + 2] = math.inf
    return w


def exact(w: torch.Tensor) -> dict:
    """The reference figures in float64 over the finite values (a bf16 value and its powers up to 4 are exact there)."""
    x = w.double().flatten()
    x = x[torch.isfinite(x)]
    mean = float(x.mean())
    d = x - mean
    var = float((d * d).mean())
    return {"mean": mean, "std": math.sqrt(var), "excess_kurtosis": float((d ** 4).mean()) / var ** 2 - 3,
            "min": float(x.min()), "max": float(x.max()), "finite": x.numel()}


def test_the_compiled_pass_is_installed_for_the_suite():
    """The suite installs the `fast` extra: every bf16 test below runs the compiled pass, not the fallback."""
    assert bf16_pass.kernels() is not None and bf16_pass.takes(torch.bfloat16, 700, 1.0)
    assert not bf16_pass.takes(torch.bfloat16, 1, 1.0) and not bf16_pass.takes(torch.float32, 700, 1.0)


def test_counts_and_moments_are_exact():
    w = planted()
    got, want = stats.compute(w), exact(w)
    for name in ("mean", "std", "excess_kurtosis"):
        assert getattr(got, name) == pytest.approx(want[name], rel=1e-12, abs=1e-15), name
    assert (got.min, got.max, got.finite, got.nan, got.inf) == (want["min"], want["max"], want["finite"], 1, 1)
    zeros = int((w == 0).sum())
    assert got.zero_fraction == zeros / w.numel()
    assert got.min_count == int((w == got.min).sum()) and got.max_count == int((w == got.max).sum())
    assert got.zero_units == [7] and got.duplicate_groups == [[3, 2998]]
    clean = torch.nan_to_num(w.double(), 0.0, 0.0, 0.0)
    assert torch.allclose(got.unit_norms, clean.norm(dim=1), rtol=1e-12)
    assert torch.allclose(got.input_norms, clean.norm(dim=0), rtol=1e-6)  # float32 chunk sums, as the float32 pass
    assert torch.allclose(got.unit_sums, clean.sum(dim=1), rtol=1e-12, atol=1e-15)


def test_units_on_another_dim_are_read_chunk_by_chunk_alike():
    """Units on dim 1 (a weight stored [in, out]): their rows are not one piece of memory, so each chunk is
    copied and read on its own; the figures are those of the same values laid out with the units first."""
    w = planted(384, 300)
    assert not stats.as_units(w, 1).is_contiguous()
    moved = stats.compute(w, unit_axis=1)
    first = stats.compute(w.T.contiguous(), unit_axis=0)
    for name in ("mean", "std", "excess_kurtosis", "min", "max", "finite", "nan", "zero_fraction", "zero_units"):
        assert getattr(moved, name) == getattr(first, name), name
    assert torch.equal(moved.unit_norms, first.unit_norms) and torch.equal(moved.input_norms, first.input_norms)


def test_the_figures_do_not_depend_on_threads_or_where_blocks_are_cut():
    """A chunk's column sums of squares are float32 sums (exact in float64, where they are added), so the input
    norms do not depend on how chunks group into threads' ranges or blocks; nor does anything else."""
    g = torch.Generator().manual_seed(1)
    big = (torch.randn(1 << 18, 64, generator=g) * 0.02).to(torch.bfloat16)   # 2**24 values: split over threads
    one = stats.compute(big, split=False)
    for got in (stats.compute(big), summary.finish(summary.merge(
            summary.summarize(big[a:b], "w", tuple(big.shape), (a, 0)) for a, b in ((0, 12293), (12293, 1 << 18))))
            .stats):
        for name in ("mean", "std", "excess_kurtosis", "norm_spread", "zero_units", "duplicate_groups"):
            assert getattr(got, name) == getattr(one, name), name
        assert torch.equal(got.unit_norms, one.unit_norms) and torch.equal(got.input_norms, one.input_norms)


def test_a_block_carries_the_patterns_it_holds_not_all_65536():
    """Summaries travel to rank 0: a block's histogram is its patterns seen and their counts."""
    import pickle

    w = planted(64, 64)
    part = summary.summarize(w, "w", (64, 64), (0, 0)).blocks[(0, 0)].part
    assert part.hist.patterns.size <= len(set(w.view(torch.int16).flatten().tolist()))
    assert len(pickle.dumps(part.hist)) < 40 * w.numel()


def test_column_splits_give_the_same_moments_and_counts():
    """A tensor-parallel column split cuts every chunk: the float32 pass then agrees to reassociation only; the
    histograms add exactly."""
    w = planted(1001, 384)
    one = stats.compute(w)
    split = summary.finish(summary.merge(
        [summary.summarize(w[:, a:a + 96], "w", (1001, 384), (0, a)) for a in range(0, 384, 96)])).stats
    for name in ("mean", "std", "excess_kurtosis", "min", "max", "min_count", "max_count", "finite", "nan", "inf",
                 "zero_fraction", "zero_units", "duplicate_groups"):
        assert getattr(split, name) == getattr(one, name), name


def test_garbage_magnitudes_and_denormals_stay_finite():
    """Values near bf16's largest (uninitialized memory) or denormal overflow or underflow float32's fourth powers;
    float64 holds them, so no second, scaled pass is needed."""
    big = torch.full((64, 128), 3.0e38).to(torch.bfloat16)
    big[::2] *= -0.5
    tiny = (torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 1e-39).to(torch.bfloat16)
    for w in (big, tiny):
        got, want = stats.compute(w), exact(w)
        assert got.std == pytest.approx(want["std"], rel=1e-12)
        assert got.unit_norms.isfinite().all() and (got.unit_norms > 0).all()


def test_without_numba_the_float32_pass_gives_the_same_verdicts(monkeypatch):
    w = planted()
    fast = stats.compute(w)
    fast_columns = stats.column_sample(w)  # a tall weight's sampled columns, gathered by the pass
    monkeypatch.setattr(bf16_pass, "kernels", lambda: None)
    assert not bf16_pass.takes(torch.bfloat16, 700, 1.0)
    slow = stats.compute(w)
    assert torch.equal(stats.column_sample(w).nan_to_num(), fast_columns.nan_to_num())
    assert slow.std == pytest.approx(fast.std, rel=1e-6)
    assert slow.excess_kurtosis == pytest.approx(fast.excess_kurtosis, abs=1e-4)
    for name in ("min", "max", "min_count", "max_count", "finite", "nan", "inf", "zero_fraction", "zero_units",
                 "duplicate_groups"):
        assert getattr(slow, name) == getattr(fast, name), name
    assert torch.allclose(slow.unit_norms.double(), fast.unit_norms, rtol=1e-5)
