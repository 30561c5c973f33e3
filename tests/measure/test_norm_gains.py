"""A norm's affine gain in the depth model: the signal after it is its gain's RMS, not 1 (DCGAN's BatchNorm gains
copied from the conv line, N(0, 0.02): every norm puts out 2 % of the scale), in every format; torch's default
ones, DCGAN's N(1, 0.02), Gemma's x·(1+w) at zero and a zero gain closing a residual branch are no such fault."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import initaudit
from initaudit.flow.dataflow import LAYER, NORM, OUTPUT, Flow
from initaudit.measure import depth

SIGNAL = ("signal-vanishing", "signal-exploding")


class NormedStack(nn.Module):
    """DCGAN's recipe on Linear layers: three Linear-LayerNorm-ReLU blocks and a head, width 32, weights N(0, 0.02)
    (the head puts out 8 % of the input's scale), the norms' gains drawn N(mean, std)."""

    def __init__(self, mean: float, std: float, width: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())
                                      for _ in range(3)])
        self.head = nn.Linear(width, 10)
        torch.manual_seed(0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, mean, std)

    def forward(self, x):
        return self.head(self.blocks(x))


def checked(model: nn.Module, fmt: str, folder) -> set[tuple[str, str, str]]:
    """(rule, layer, severity) of the signal findings on `model` checked as a live module, a state_dict or ONNX."""
    if fmt == "module":
        report = initaudit.audit(model)
    elif fmt == "state_dict":
        torch.save(model.state_dict(), folder / "m.pt")
        report = initaudit.audit(folder / "m.pt", activation="relu")
    else:
        torch.onnx.export(model.eval(), (torch.randn(2, 32),), str(folder / "m.onnx"), dynamo=False)
        report = initaudit.audit(folder / "m.onnx")
    return {(f.rule, f.layer, f.severity) for f in report.findings if f.rule in SIGNAL and f.severity != "info"}


@pytest.mark.parametrize("fmt", ["module", "state_dict", "onnx"])
@pytest.mark.parametrize("mean, std, vanishes", [
    (0.0, 0.02, True),    # the conv line copied for the norm: the head sees 2 % of the scale and puts out 0.16 %
    (1.0, 0.02, False),   # DCGAN's own N(1, 0.02)
    (1.0, 0.0, False),    # torch's default ones
    (0.0, 0.2, False),    # 0.2 of the scale: within NORM_OFF of 1, and the head's 1.6 % is inside the band
])
def test_a_tiny_norm_gain_sets_the_signal_off_and_vanishes_in_every_format(fmt, mean, std, vanishes, tmp_path):
    found = checked(NormedStack(mean, std), fmt, tmp_path)
    assert found == ({("signal-vanishing", "head", "error")} if vanishes else set()), fmt


def test_the_norm_is_named_as_the_cause():
    report = initaudit.audit(NormedStack(0.0, 0.02))
    (finding,) = [f for f in report.findings if f.rule == "signal-vanishing"]
    assert "blocks.2.1" in finding.message and "gain's RMS 0.02" in finding.message


def test_the_signal_after_a_norm_is_its_gain_rms_and_the_gradient_through_it_scales_alike():
    """a → norm (E[γ²] = g) → b: b's input has second moment g, so b's output fan·E[w²]·g; the gradient going
    back through the norm is multiplied by g over the signal it normalized."""
    flow = Flow.chain([(LAYER, "a", None), (NORM, "n", None), (LAYER, "b", None)])
    weights = {"a": depth.Weights(16, 16, 4 / 16), "b": depth.Weights(16, 16, 1 / 16)}
    kinds = {"a": "linear", "b": "linear"}
    plain = depth.propagate(flow, weights, kinds)
    scaled = depth.propagate(flow, weights, kinds, {"n": 1e-4})
    assert plain["b"].scale == pytest.approx(1.0) and scaled["b"].scale == pytest.approx(0.01)
    assert scaled["a"].grad_scale == pytest.approx(plain["a"].grad_scale * 0.01)
    assert (plain["b"].after_norm, scaled["b"].after_norm) == (None, ("n", pytest.approx(0.01)))


class ZeroInitResidual(nn.Module):
    """Pre-norm residual blocks whose branch ends in a norm with a zero gain (zero-init residual): the stream
    carries the signal on."""

    def __init__(self, width: int = 32, blocks: int = 6):
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                                                    nn.LayerNorm(width)) for _ in range(blocks))
        self.head = nn.Linear(width, 10)
        for branch in self.branches:
            nn.init.zeros_(branch[3].weight)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x = x + branch(x)
        return self.head(x)


def test_a_zero_gain_closing_a_residual_branch_sets_nothing_off():
    report = initaudit.audit(ZeroInitResidual())
    assert not [f for f in report.findings if f.rule in SIGNAL and f.severity != "info"]
    assert all(row.predicted_scale and math.isfinite(row.predicted_scale) for row in report.layers
               if row.name in ("stem", "head"))


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x·(1 + w), w initialized to zero (its identity)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_an_offset_norm_at_zero_is_a_unit_gain():
    model = nn.Sequential(nn.Linear(32, 32), OffsetRMSNorm(32), nn.ReLU(), nn.Linear(32, 10))
    report = initaudit.audit(model)
    assert not [f for f in report.findings if f.rule in SIGNAL]
    assert {row.name: row.predicted_scale for row in report.layers}["3"] > 0.1
