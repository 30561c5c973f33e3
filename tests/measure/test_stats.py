"""The one-pass statistics, checked against torch on real tensors."""

from __future__ import annotations

import math

import pytest
import torch

import initaudit
from initaudit.measure import stats


def test_moments_match_torch_and_known_kurtosis():
    torch.manual_seed(0)
    uniform = torch.empty(256, 512).uniform_(-1, 1)
    normal = torch.randn(256, 512) * 3 + 0.5
    su, sn = stats.compute(uniform), stats.compute(normal)
    assert su.std == pytest.approx(float(uniform.double().std(unbiased=False)), rel=1e-6)
    assert sn.mean == pytest.approx(float(normal.double().mean()), rel=1e-5)
    assert su.excess_kurtosis == pytest.approx(-1.2, abs=0.03)
    assert sn.excess_kurtosis == pytest.approx(0.0, abs=0.05)
    assert (su.min, su.max) == (float(uniform.min()), float(uniform.max()))


def test_chunked_pass_equals_single_pass(monkeypatch):
    torch.manual_seed(1)
    w = torch.randn(300, 70)
    w[5] = w[9]
    w[11] = 0
    whole = stats.compute(w)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 70 * 7)  # 43 chunks of 7 rows
    chunked = stats.compute(w)
    assert chunked.std == pytest.approx(whole.std, rel=1e-5)
    assert chunked.excess_kurtosis == pytest.approx(whole.excess_kurtosis, abs=1e-5)
    assert chunked.zero_units == whole.zero_units == [11]
    assert chunked.duplicate_groups == whole.duplicate_groups == [[5, 9]]


def test_a_tensor_split_over_the_cores_has_the_stats_of_one_kept_on_one(monkeypatch):
    torch.manual_seed(2)
    w = torch.randn(400, 64)
    w[7] = w[300]  # a copy across the two halves
    w[350] = 0
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(stats, "SPLIT_ELEMENTS", 1)
    monkeypatch.setattr(stats, "workers", lambda: 2)
    assert stats._ranges(400, 10, 64, split=True) == [(0, 200), (200, 400)]
    assert stats._ranges(400, 10, 64, split=False) == [(0, 400)]
    split, single = stats.compute(w, split=True), stats.compute(w, split=False)
    assert split.std == pytest.approx(single.std, rel=1e-6)
    assert split.excess_kurtosis == pytest.approx(single.excess_kurtosis, abs=1e-6)
    assert (split.min, split.max, split.zero_fraction) == (single.min, single.max, single.zero_fraction)
    assert split.zero_units == single.zero_units == [350]
    assert split.duplicate_groups == single.duplicate_groups == [[7, 300]]
    assert torch.allclose(split.unit_norms, single.unit_norms) and torch.allclose(split.input_norms, single.input_norms)


def test_near_constant_tensor_keeps_precision():
    w = torch.full((64, 64), 1000.0, dtype=torch.float64) + torch.randn(64, 64, dtype=torch.float64) * 1e-6
    s = stats.compute(w)
    assert s.std == pytest.approx(float(w.std(unbiased=False)), rel=1e-6)


def test_non_finite_values_are_counted_and_excluded():
    w = torch.randn(32, 32)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), float("-inf")
    s = stats.compute(w)
    assert (s.nan, s.inf, s.finite) == (1, 2, 32 * 32 - 3)
    assert math.isfinite(s.std) and math.isfinite(s.max)


def test_constant_and_distinct():
    s = stats.compute(torch.ones(16, 8))
    assert s.constant and s.distinct == 1 and s.std == 0
    assert not stats.compute(torch.randn(16, 8)).constant


def test_duplicate_groups_exact_and_near_but_not_merely_close():
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    w[3] = w[0]
    w[7] = w[0]
    w[10] = w[20] + 1e-7  # float noise: still the same unit
    w[30] = w[40] + 0.05  # a real difference (5 % of the std): not a duplicate
    s = stats.compute(w)
    assert sorted(map(sorted, s.duplicate_groups)) == [[0, 3, 7], [10, 20]]
    assert s.duplicate_units == 3


@pytest.mark.parametrize("channels, dtype, copies_found", [(256, torch.float32, False), (48, torch.float32, True),
                                                            (48, torch.bfloat16, False)])
def test_units_of_one_value_are_copies_only_where_chance_would_not_match_them(channels, dtype, copies_found):
    """MobileOne's per-channel scale conv, [C, 1, 1, 1] at torch's default: among 256 single values some lie within
    1e-3 std of each other by chance (about 20 pairs), so only exact copies could count, and at 256 channels even
    float32 values repeat by chance too often; among 48 exact float32 copies are telling, in bfloat16 they are not."""
    torch.manual_seed(0)
    w = torch.nn.Conv2d(channels, channels, 1, groups=channels).weight.detach().to(dtype)
    assert stats.compute(w).duplicate_groups == []
    w[5] = w[9]
    assert (stats.compute(w).duplicate_groups == [[5, 9]]) == copies_found


def test_unit_axis_for_transposed_layouts():
    w = torch.randn(128, 64)  # [in, out], as ONNX MatMul and HF Conv1D store it
    w[:, 5] = 0
    s = stats.compute(w, unit_axis=1)
    assert s.n_units == 64 and s.zero_units == [5]


def test_bf16_and_half_tensors():
    w = torch.randn(64, 64).to(torch.bfloat16)
    assert stats.compute(w).std == pytest.approx(float(w.float().std(unbiased=False)), rel=1e-3)


def test_empty_and_scalar_tensors():
    empty = stats.compute(torch.empty(10, 0))
    assert empty.numel == 0 and empty.finite == 0 and not empty.constant
    assert stats.compute(torch.tensor(3.0)).constant


def test_non_finite_entries_are_not_counted_as_zeros():
    """An all-NaN weight is non-finite, not zero: no zero-weights or dead-units besides non-finite."""
    weight = torch.full((8, 16), float("nan"))
    weight[0] = 0.0
    weight[1, 3] = float("inf")
    st = stats.compute(weight)
    assert (st.nan, st.inf) == (8 * 16 - 16 - 1, 1)
    assert st.zero_fraction == 16 / (8 * 16) and st.zero_units == [0]


def test_only_a_tensor_larger_than_a_cores_share_of_the_model_is_split(monkeypatch):
    """Tensors run on all cores at once; splitting one as well would only oversubscribe them, unless it alone
    holds more than a core's share of the bytes (else one core would end the run on it alone)."""
    seen = {}
    real = stats.compute

    def spy(tensor, unit_axis=0, units=True, split=True):
        seen[tuple(tensor.shape)] = split
        return real(tensor, unit_axis, units, split)

    monkeypatch.setattr(stats, "compute", spy)
    monkeypatch.setattr(stats, "workers", lambda: 2)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10))
    initaudit.audit(model)
    assert seen[(512, 512)] and not seen[(64, 512)] and not seen[(10, 64)]
    seen.clear()
    initaudit.audit(torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)))
    assert seen[(512, 512)] is False  # two equal halves: one per core


def _scaled_reference(values: torch.Tensor) -> tuple[float, float, float]:
    """Mean, std and excess kurtosis in float64 numpy, of the finite values scaled to about 1 (no overflow)."""
    import numpy as np
    x = values.double().numpy().ravel()
    x = x[np.isfinite(x)]
    scale = float(np.abs(x).max())
    y = x / scale
    d = y - y.mean()
    return y.mean() * scale, y.std() * scale, float((d ** 4).mean() / (d ** 2).mean() ** 2 - 3)


def _random_bits(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    import numpy as np
    return torch.frombuffer(bytearray(np.random.default_rng(seed).bytes(n * dtype.itemsize)), dtype=dtype).clone()


@pytest.mark.parametrize("dtype, top", [(torch.float32, 2.9e38), (torch.bfloat16, 2.9e38), (torch.float16, 6e4),
                                        (torch.float64, 1e300)])
def test_statistics_never_overflow(dtype, top, monkeypatch):
    """Garbage up to the dtype's largest values (random bits, NaN/Inf dropped): mean, std, kurtosis and the unit
    norms are finite and exact, chunked or not, on one core or split."""
    x = _random_bits(96 * 80, dtype, seed=7).nan_to_num(0.0, 0.0, 0.0)
    x = x.clamp(-top, top) if dtype != torch.float64 else (x.double().clamp(-1, 1) * top).to(dtype)
    x = x.reshape(96, 80)
    mean, std, kurt = _scaled_reference(x)
    whole = stats.compute(x)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 80 * 7)
    monkeypatch.setattr(stats, "SPLIT_ELEMENTS", 1)
    monkeypatch.setattr(stats, "workers", lambda: 2)
    split = stats.compute(x)
    for st in (whole, split):
        assert st.std == pytest.approx(std, rel=1e-6) and math.isfinite(st.std)  # fp16 stays in the fp32 pass
        assert st.mean == pytest.approx(mean, rel=1e-6, abs=std * 1e-12)
        assert st.excess_kurtosis == pytest.approx(kurt, rel=1e-5)
        norms = x.double().div(float(x.double().abs().max())).norm(dim=1) * float(x.double().abs().max())
        assert torch.allclose(st.unit_norms.double(), norms, rtol=1e-6)
        assert (st.min, st.max) == (float(x.min()), float(x.max()))


def test_a_layer_of_denormals_keeps_its_std():
    """fp32 squares of denormals underflow to 0: the std was 0 for a layer that is not constant."""
    import numpy as np
    ints = np.arange(1, 4097, dtype=np.uint32) * 997 % (1 << 23)
    x = torch.from_numpy(ints.view(np.float32).copy()).reshape(64, 64)
    st = stats.compute(x)
    assert st.std == pytest.approx(float(x.double().std(unbiased=False)), rel=1e-12) and st.std > 0
    assert st.zero_fraction == 0 and st.min == float(x.min())


def test_ordinary_weights_are_read_once_at_their_precision(monkeypatch):
    """The float64 re-read is for garbage only: ordinary fp32 weights take the one pass they always took."""
    reads = []
    original = stats._Scan.__init__
    monkeypatch.setattr(stats._Scan, "__init__", lambda self, *a, **k: (reads.append(a[1]), original(self, *a, **k))[1])
    torch.manual_seed(0)
    stats.compute(torch.randn(128, 128) * 0.02)
    assert reads == [torch.float32]
    stats.compute(_random_bits(128 * 128, torch.float32, seed=1).nan_to_num(0.0, 0.0, 0.0).reshape(128, 128))
    assert reads == [torch.float32, torch.float32, torch.float64]
