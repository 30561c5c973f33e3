"""Fingerprints: each torch.nn.init scheme is named, on layers where the schemes differ."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from initaudit import schemes, stats
from initaudit.activations import Activation

OUT, IN = 256, 512  # a non-square layer: Xavier, LeCun, Kaiming fan_in and fan_out all differ


def draw(init) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.empty(OUT, IN)
    init(w)
    return w


CASES = {
    "torch-default": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "kaiming-normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "kaiming-uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming-normal-fan-out": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming-uniform-fan-out": lambda w: nn.init.kaiming_uniform_(w, mode="fan_out", nonlinearity="relu"),
    "xavier-normal": nn.init.xavier_normal_,
    "xavier-uniform": nn.init.xavier_uniform_,
    "lecun-normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
    "normal-0.02": lambda w: nn.init.normal_(w, std=0.02),
    "normal-0.01": lambda w: nn.init.normal_(w, std=0.01),
    "trunc-normal-0.02": lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04),
    "orthogonal": nn.init.orthogonal_,
    "constant": lambda w: nn.init.constant_(w, 0.5),
    "zeros": nn.init.zeros_,
}


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_each_scheme_is_named(scheme):
    w = draw(CASES[scheme])
    fp = schemes.fingerprint(stats.compute(w), IN, OUT, weight=w)
    assert fp.scheme == scheme
    if scheme not in ("constant", "zeros"):
        assert fp.fit == pytest.approx(1.0, abs=0.05)


def test_xavier_with_tanh_gain_is_xavier():
    w = draw(lambda t: nn.init.xavier_uniform_(t, gain=nn.init.calculate_gain("tanh")))
    assert schemes.fingerprint(stats.compute(w), IN, OUT).family == "xavier"


def test_square_tie_is_named_after_the_activation():
    """On a square layer Xavier and LeCun draw the same std; the activation decides the name."""
    torch.manual_seed(0)
    w = nn.init.xavier_normal_(torch.empty(256, 256))
    st = stats.compute(w)
    assert schemes.fingerprint(st, 256, 256, activation=Activation("selu")).family == "lecun"
    assert schemes.fingerprint(st, 256, 256, activation=Activation("tanh")).family == "xavier"


def test_lstm_default_is_torch_default():
    lstm = nn.LSTM(32, 64)
    w = lstm.weight_ih_l0.detach()
    fp = schemes.fingerprint(stats.compute(w), 32, 256, kind="recurrent", hidden=64)
    assert fp.scheme == "torch-default"


def test_unnamed_scale_is_unknown_with_nearest():
    w = draw(lambda t: nn.init.normal_(t, std=0.3))
    fp = schemes.fingerprint(stats.compute(w), IN, OUT)
    assert fp.scheme == "unknown" and fp.nearest


@pytest.mark.parametrize("act,scheme,std", [
    ("relu", "kaiming-normal", math.sqrt(2 / IN)),
    ("leaky_relu:0.2", "kaiming-normal", nn.init.calculate_gain("leaky_relu", 0.2) / math.sqrt(IN)),
    ("tanh", "xavier-uniform", 5 / 3 * math.sqrt(2 / (IN + OUT))),
    ("sigmoid", "xavier-uniform", math.sqrt(2 / (IN + OUT))),
    ("selu", "lecun-normal", math.sqrt(1 / IN)),
    ("identity", "lecun-normal", math.sqrt(1 / IN)),
])
def test_recommendation_follows_the_selection_guide(act, scheme, std):
    from initaudit.activations import parse

    rec = schemes.recommend(parse(act), IN, OUT)
    assert rec.scheme == scheme and rec.std == pytest.approx(std)
    assert schemes.recommend(parse("unknown"), IN, OUT) is None
