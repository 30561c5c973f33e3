"""describe(): l1, RMS, channel mean and mean cosine of a layer's output, on tensors whose answers are known."""

import math

import pytest
import torch

from initaudit.probe.representation import describe


def test_independent_gaussian_samples_are_near_orthogonal_and_centred():
    rep = describe(torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)))
    assert rep.rms == pytest.approx(1.0, rel=0.02)
    assert rep.l1 == pytest.approx(math.sqrt(2 / math.pi), rel=0.02)
    assert abs(rep.cosine) < 0.01
    assert rep.mean == pytest.approx(1 / 8, rel=0.05)  # each channel's mean over 64 samples: noise of 1/√64


def test_one_direction_for_every_sample_is_cosine_one():
    direction = torch.randn(256, generator=torch.Generator().manual_seed(1))
    scales = torch.rand(16, 1, generator=torch.Generator().manual_seed(2)) + 0.5
    assert describe(scales * direction).cosine == pytest.approx(1.0, abs=1e-9)


def test_a_shift_shows_in_the_channel_mean_of_conv_outputs():
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    x[:, 1] += 4.0  # one of three channels shifted by 4: √(16/3)
    assert describe(x, conv=True).mean == pytest.approx(math.sqrt(16 / 3), rel=0.05)


def test_an_all_zero_sample_has_no_cosine():
    x = torch.randn(4, 10)
    x[2] = 0
    assert math.isnan(describe(x).cosine)


def test_a_single_sample_is_refused():
    with pytest.raises(ValueError):
        describe(torch.randn(1, 10))


def test_a_conv1d_output_has_its_channels_on_axis_1():
    x = torch.randn(8, 3, 50, generator=torch.Generator().manual_seed(4))
    x[:, 1] += 4.0  # one of three channels shifted by 4: √(16/3); read as 50 "channels" it would be √(16/50)·...
    assert describe(x, conv=True).mean == pytest.approx(math.sqrt(16 / 3), rel=0.05)
    assert describe(x).mean < 1.5  # a feature/sequence output: the last axis is the channels
