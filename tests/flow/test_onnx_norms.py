"""Norms written by hand (LLaMA's and T5's RMSNorm, Gemma's x·(1 + w)) are norms in every format: the ONNX exporter
spells them out in Pow/ReduceMean/Add/Sqrt/Div/Mul, torch.fx would trace through them; both read them back as the
normalization they are, with the product by the gain as the norm's weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

import initaudit
from helpers.formats import export_onnx
from test_onnx import init, kaiming, save

EXPORTS = [pytest.param(17, False, id="legacy"), pytest.param(18, True, id="dynamo")]


class RMSNorm(nn.Module):
    """x/rms(x)·w (LLaMA, T5) or x/rms(x)·(1 + w) (Gemma), as their repositories write it."""

    def __init__(self, d: int, init: float = 1.0, one_plus: bool = False):
        super().__init__()
        self.weight, self.one_plus = nn.Parameter(torch.full((d,), init)), one_plus

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1 + self.weight) if self.one_plus else x * self.weight


class PreNormMLP(nn.Module):
    """Pre-norm residual blocks x + fc2(relu(fc1(norm(x)))), a final norm and a head; every gain at `gain`."""

    def __init__(self, gain: float, one_plus: bool = False, d: int = 32, blocks: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.norms = nn.ModuleList(RMSNorm(d, gain, one_plus) for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.norm, self.head = RMSNorm(d, gain, one_plus), nn.Linear(d, 10)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(torch.relu(fc1(norm(x))))
        return self.head(self.norm(x))


class NormedStack(nn.Module):
    """Linear → RMSNorm → ReLU, `depth` times: each layer's std 1 (32x Kaiming's variance) is undone by its norm."""

    def __init__(self, depth: int = 8, d: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(d) for _ in range(depth))
        for layer in self.layers:
            nn.init.normal_(layer.weight, 0.0, 1.0)

    def forward(self, x):
        for layer, norm in zip(self.layers, self.norms):
            x = torch.relu(norm(layer(x)))
        return x


def serious(report) -> set[tuple[str, str, str]]:
    return {(f.rule, f.layer, f.severity) for f in report.findings if f.severity != "info"}


def zero_gains(report) -> dict[str, str]:
    return {f.layer: f.severity for f in report.findings if f.rule == "zero-weights"}


@pytest.mark.parametrize("opset, dynamo", EXPORTS)
def test_a_zeroed_gain_of_a_spelled_out_rmsnorm_is_read_as_the_norms(opset, dynamo, tmp_path):
    """Gemma's zeros in a LLaMA x·w RMSNorm: the final norm, on the only path to the head, outputs zero (an error);
    the blocks' norms start residual branches (info); named as the module paths, as with the module. The same zeros
    in Gemma's own x·(1 + w) are its identity: nothing above info."""
    bug, recipe = PreNormMLP(gain=0.0), PreNormMLP(gain=0.0, one_plus=True)
    expected = initaudit.audit(bug)
    report = initaudit.audit(export_onnx(bug, tmp_path / "bug.onnx", opset, dynamo, (2, 32)))
    assert zero_gains(expected) == {"norm": "error", "norms.0": "info", "norms.1": "info"}
    assert zero_gains(report) == zero_gains(expected)
    assert serious(report) == serious(expected)
    exported = initaudit.audit(export_onnx(recipe, tmp_path / "recipe.onnx", opset, dynamo, (2, 32)))
    assert serious(initaudit.audit(recipe)) == serious(exported) == set()


@pytest.mark.parametrize("opset, dynamo", EXPORTS)
def test_a_spelled_out_norm_resets_the_predicted_scale(opset, dynamo, tmp_path):
    """Each N(0, 1) layer's 32x variance is undone by the RMSNorm after it: no signal-exploding across the 8 layers,
    with the module (its norms kept whole by fx) as in ONNX."""
    module = NormedStack()
    expected = initaudit.audit(module)
    report = initaudit.audit(export_onnx(module, tmp_path / "m.onnx", opset, dynamo, (2, 32)))
    assert not any(rule.startswith("signal-") for rule, _, _ in serious(expected))
    assert serious(report) == serious(expected)


def spelled_layer_norm(tmp_path, gain: np.ndarray, one_plus: bool = False):
    """fc → (h − mean(h)) / √(mean((h − mean)²) + ε) · g (+ 1 first, when `one_plus`) + b → head, op by op."""
    n = helper.make_node
    nodes = [n("Gemm", ["x", "fc.weight"], ["h"], transB=1, name="/fc/Gemm"),
             n("ReduceMean", ["h"], ["mu"], axes=[-1]), n("Sub", ["h", "mu"], ["c"]),
             n("Pow", ["c", "two"], ["sq"]), n("ReduceMean", ["sq"], ["var"], axes=[-1]),
             n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]), n("Div", ["c", "sd"], ["xhat"]),
             *([n("Add", ["ln.weight", "one"], ["g"])] if one_plus else []),
             n("Mul", ["xhat", "g" if one_plus else "ln.weight"], ["scaled"]), n("Add", ["scaled", "ln.bias"], ["a"]),
             n("Gemm", ["a", "head.weight"], ["y"], transB=1, name="/head/Gemm")]
    inits = [init("fc.weight", kaiming(16, 8)), init("head.weight", kaiming(4, 16)), init("two", 2.0),
             init("eps", 1e-5), init("one", 1.0), init("ln.weight", gain), init("ln.bias", np.zeros(16))]
    return initaudit.audit(save(tmp_path, nodes, inits))


def test_a_spelled_out_layer_norm_holds_its_gain_and_shift(tmp_path):
    report = spelled_layer_norm(tmp_path, np.zeros(16))
    assert zero_gains(report) == {"ln": "error"}
    skipped = {key for item in report.coverage.not_audited for key in item.tensors}
    assert skipped == {"two", "eps", "one"}  # the gain and the shift are the norm's, audited


def test_a_gain_the_graph_adds_to_one_is_read_as_one_plus_w(tmp_path):
    assert zero_gains(spelled_layer_norm(tmp_path, np.zeros(16), one_plus=True)) == {}
