"""Depth analysis in `check`: predicted gain and scale per layer, signal-vanishing / signal-exploding where the
predicted scale leaves the band — and silence on stable stacks and deep residual nets with norms."""

from __future__ import annotations

import json
import math

import pytest
import torch

import initaudit
from fixtures import depth_models
from initaudit.config import SIGNAL_BAND, from_table
from initaudit.measure import depth
from initaudit.flow.activations import Activation, parse
from initaudit.common.errors import InputError

SIGNAL = ("signal-vanishing", "signal-exploding")
BAND = SIGNAL_BAND


def signal(report) -> set[tuple[str, str, str]]:
    return {(f.rule, f.layer, f.severity) for f in report.findings if f.rule in SIGNAL}


def monte_carlo(activation: Activation, q: float, n: int = 2_000_000) -> tuple[float, float]:
    """E[φ(z)²] and E[φ'(z)²], z ~ N(0, q), by sampling (independent of depth.moments' grid)."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(n, generator=gen, dtype=torch.float64) * math.sqrt(q)).requires_grad_(True)
    y = depth.function(activation)(z)
    (slope,) = torch.autograd.grad(y.sum(), z)
    return float((y.detach() ** 2).mean()), float((slope ** 2).mean())


@pytest.mark.parametrize("q", [1e-3, 1.0, 50.0])
def test_relu_family_factors_are_exact_at_every_scale(q):
    assert depth.moments(parse("relu"), q) == pytest.approx((q / 2, 0.5), rel=1e-9)
    a = 0.2
    assert depth.moments(parse(f"leaky_relu:{a}"), q) == pytest.approx((q * (1 + a * a) / 2, (1 + a * a) / 2), rel=1e-9)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu", "silu", "selu", "elu", "mish", "hardswish", "softplus"])
@pytest.mark.parametrize("q", [0.01, 1.0, 25.0])
def test_smooth_activations_match_sampling_at_their_operating_point(name, q):
    forward, backward = depth.moments(parse(name), q)
    mc_forward, mc_backward = monte_carlo(parse(name), q)
    assert forward == pytest.approx(mc_forward, rel=0.01)
    assert backward == pytest.approx(mc_backward, rel=0.01)


def test_known_operating_points():
    # tanh is linear for small signals, loses ~61 % of the variance at q=1 (calculate_gain's 5/3 makes up for it:
    # (5/3)² · 0.394 ≈ 1.09), and passes 1/q when saturated; SELU keeps a unit signal at unit variance.
    tanh = parse("tanh")
    assert depth.factor(tanh, 1e-4) == pytest.approx(1.0, abs=1e-3)
    assert depth.factor(tanh, 1.0) == pytest.approx(0.3943, abs=1e-3)
    assert depth.factor(parse("selu"), 1.0) == pytest.approx(1.0, abs=2e-3)
    assert depth.factor(parse("gelu"), 1e-4) == pytest.approx(0.25, abs=1e-3)  # GELU(z) ≈ z/2 near 0


@pytest.mark.parametrize("factory, rule, first", [
    (depth_models.relu_small, "signal-vanishing", "2"),   # RMS 64·1e-4, then ×256·1e-4/2 per layer: 0.08, 0.009
    (depth_models.relu_unit, "signal-exploding", "4"),    # RMS 8, 90, then 1000
])
def test_plain_relu_stack_out_of_band_is_an_error_on_the_layer_where_it_leaves(factory, rule, first):
    report = initaudit.audit(factory())
    found = signal(report)
    assert (rule, first, "error") in found
    assert {r for r, _, _ in found} == {rule}
    assert report.exit_code() == 1
    by_name = {row.name: row for row in report.layers}
    assert by_name[first].predicted_scale < BAND[0] or by_name[first].predicted_scale > BAND[1]
    assert all(f.origin == "predicted" for f in report.findings if f.rule in SIGNAL)


def test_predicted_gain_is_fan_in_times_second_moment_times_relu_half():
    model = depth_models.relu_unit()
    report = initaudit.audit(model)
    row = next(row for row in report.layers if row.name == "2")
    w = model[2].weight.detach().double()
    assert row.predicted_gain == pytest.approx(256 * float((w ** 2).mean()) / 2, rel=1e-3)
    scales = [row.predicted_scale for row in report.layers]
    assert scales[5] / scales[4] == pytest.approx(math.sqrt(report.layers[5].predicted_gain), rel=1e-3)


@pytest.mark.parametrize("factory", [depth_models.relu_kaiming, depth_models.tanh_xavier, depth_models.residual_net])
def test_stable_stacks_stay_in_the_band_at_every_depth(factory):
    report = initaudit.audit(factory())
    assert not signal(report)
    for row in report.layers:
        assert BAND[0] <= row.predicted_scale <= BAND[1], row
        assert BAND[0] <= row.predicted_grad_scale <= BAND[1], row


def test_saturated_tanh_stack_explodes_going_back():
    report = initaudit.audit(depth_models.tanh_unit())
    assert {r for r, _, _ in signal(report)} == {"signal-exploding"}
    assert any("gradient" in f.message for f in report.findings if f.rule == "signal-exploding")
    assert max(row.predicted_scale for row in report.layers) < BAND[1]  # saturation bounds the forward signal


def test_short_runs_between_norms_and_residual_sums_are_not_judged():
    """A run of 3 plain layers (then a norm) is shallow: its scale does not compound through depth."""
    model = torch.nn.Sequential(*[torch.nn.Sequential(depth_models.stack(lambda w: torch.nn.init.normal_(w, std=1.0),
                                                                          depth=3, width=64), torch.nn.LayerNorm(10),
                                                      torch.nn.Linear(10, 64)) for _ in range(4)])
    report = initaudit.audit(model)
    assert not signal(report)
    assert max(row.predicted_scale for row in report.layers) > BAND[1]  # predicted, but not judged


def test_bare_state_dict_with_named_activation_gets_the_same_verdict(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(depth_models.relu_small().state_dict(), path)
    assert signal(initaudit.audit(path, activation="relu")) == signal(initaudit.audit(depth_models.relu_small()))
    unknown = initaudit.audit(path)  # no activation: no prediction, no claim
    assert not signal(unknown) and all(row.predicted_gain is None for row in unknown.layers[:-1])


def test_band_is_configurable_and_checked():
    xavier = depth_models.stack(torch.nn.init.xavier_normal_, depth=10)  # into ReLU: gain 1/2 per layer, RMS 0.04 at the end
    assert not signal(initaudit.audit(xavier))
    assert "signal-vanishing" in {r for r, _, _ in signal(initaudit.audit(xavier, options=from_table({"signal-band": [0.1, 10]})))}
    deeper = depth_models.stack(torch.nn.init.xavier_normal_)  # 20 layers: 2^-10
    assert "signal-vanishing" in {r for r, _, _ in signal(initaudit.audit(deeper))}
    for bad in ([1, 100], [0.01], ["a", 2], [0.1, float("inf")]):
        with pytest.raises(InputError, match="signal-band"):
            from_table({"signal-band": bad})


def test_cli_json_carries_prediction_and_origin(cli):
    result = cli("check", "--model", "fixtures.depth_models:relu_unit", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert all("predicted_gain" in row and "predicted_scale" in row for row in data["layers"])
    found = [f for f in data["findings"] if f["rule"] == "signal-exploding"]
    assert found and all(f["origin"] == "predicted" and f["code"] == "IA302" for f in found)
    assert all("origin" not in f for f in data["findings"] if f["rule"] not in SIGNAL)
    assert cli("check", "--model", "fixtures.depth_models:relu_kaiming").exit_code == 0


def test_prediction_on_trained_weights_is_info():
    """The prediction assumes iid draws; on weights shaped by training it is information (probe measures them)."""
    found = {(f.rule, f.severity) for f in initaudit.audit(depth_models.relu_small(), state="trained").findings
             if f.rule in SIGNAL}
    assert found == {("signal-vanishing", "info")}


def test_stock_alexnet_at_torch_defaults_is_warned_not_an_error():
    """torchvision's AlexNet (no norm, no residual) at PyTorch's defaults: 8 layers of gain 1/6 reach 1 % of the
    input's RMS at its end: warned (a stack shorter than the guide's deep 10 layers), never an error."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    alexnet = initaudit.audit(torchvision.models.alexnet(weights=None))
    assert alexnet.count("error") == 0
    assert {f.rule for f in alexnet.findings if f.severity == "warning"} == {"signal-vanishing"}


class Branch(torch.nn.Module):
    """Two norm-free residual blocks whose branches are five 1x1 convs drawn at normal(std) with GELU between."""

    def __init__(self, std: float, residual: bool = True, width: int = 32):
        super().__init__()
        self.residual = residual
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Conv2d(width, width, 1) for _ in range(5))
                                          for _ in range(2))
        for conv in self.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.normal_(conv.weight, std=std)
                torch.nn.init.zeros_(conv.bias)

    def forward(self, x):
        for block in self.blocks:
            y = x
            for i, conv in enumerate(block):
                y = conv(y) if i == len(block) - 1 else torch.nn.functional.gelu(conv(y))
            x = x + y if self.residual else y
        return x


@pytest.mark.parametrize("std, residual, expected", [
    (0.02, True, set()),  # a branch that starts near zero: the stream carries on (FocalNet's modulation)
    (0.02, False, {"signal-vanishing"}),  # the same layers as a plain stack: the signal is gone
    (2.0, True, {"signal-exploding"}),  # a branch that swamps the stream is still trouble
])
def test_a_residual_branch_may_start_near_zero_but_not_explode(std, residual, expected):
    report = initaudit.audit(Branch(std, residual))
    assert {rule for rule, _, severity in signal(report) if severity == "error"} == expected
    assert {layer.name: layer.residual_branch for layer in _graph(Branch(std, residual))}["blocks.0.0"] == residual


def _graph(module):
    from initaudit.pipeline import analyse
    from initaudit.config import Options
    from initaudit.load import modules

    return [layer for layer in analyse(modules.from_module(module, None), Options()).graph if layer.weighted]
