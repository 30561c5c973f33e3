"""Fans that match the data flow: a transposed conv's signal sees in·k/stride² inputs (torch.nn.init counts
out·k, from weight dim 1), and a SELU stack is held to the SNN paper's band for fan_in·Var(w)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import initaudit
from helpers.cli import run
from helpers.formats import export_onnx
from initaudit.flow.layers import transposed_flow_fans

CHANNELS, KERNEL, STRIDE, DEPTH = 16, 4, 2, 16


def decoder(init: str, depth: int = DEPTH) -> nn.Sequential:
    """`depth` stride-2 ConvTranspose1d + ReLU layers, no normalization (a decoder or generator without BN)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        conv = nn.ConvTranspose1d(CHANNELS, CHANNELS, KERNEL, stride=STRIDE, padding=1)
        if init == "torch-kaiming":  # kaiming_normal_ by the book: torch counts dim 1, out·k
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        else:  # Kaiming at the fan the signal sees: in·k/stride
            nn.init.normal_(conv.weight, std=math.sqrt(2 / (CHANNELS * KERNEL / STRIDE)))
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def by_rule(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        if f.severity in ("warning", "error"):
            out.setdefault(f.rule, set()).add(f.layer)
    return out


def test_transposed_fans_count_the_inputs_each_output_sums():
    assert transposed_flow_fans((64, 32, 4, 4), (2, 2)) == (64 * 16 // 4, 32 * 16 // 4)
    assert transposed_flow_fans((64, 8, 3, 3), (1, 1), groups=4) == (16 * 9, 8 * 9)
    assert transposed_flow_fans((64, 32, 4, 4)) == (64 * 16, 32 * 16)  # stride unknown: 1


def test_predicted_scale_follows_the_real_forward_pass():
    """The depth model's RMS at the last layer matches a real forward pass, for both draws (it used torch's fan:
    the by-the-book draw was predicted to hold and the right one to explode)."""
    depth = 6  # on a long input, where the edges' missing taps do not count
    for init in ("torch-kaiming", "signal-fan"):
        model = decoder(init, depth)
        report = initaudit.audit(model)
        predicted = next(r.predicted_scale for r in report.layers if r.name == f"{2 * depth - 2}")
        x = torch.randn(8, CHANNELS, 256)
        with torch.no_grad():
            out = model[:-1](x)
        measured = float(out.pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
        assert predicted == pytest.approx(measured, rel=0.2), init


def test_kaiming_at_torchs_fan_on_a_transposed_conv_is_named():
    found = by_rule(initaudit.audit(decoder("torch-kaiming")))
    assert "signal-vanishing" in found
    assert len(found.get("variance-out-of-range", ())) >= DEPTH - 1
    message = next(f.message for f in initaudit.audit(decoder("torch-kaiming")).findings
                   if f.rule == "variance-out-of-range")
    assert "transposed conv's fan from weight dim 1 (64)" in message and "sees in·k/stride² = 32" in message


def test_kaiming_at_the_signals_fan_is_clean():
    report = initaudit.audit(decoder("signal-fan"))
    assert by_rule(report) == {}
    fix = next(f for f in report.layers if f.name == "0")
    assert fix.expected_std == pytest.approx(math.sqrt(2 / 32), rel=1e-3)


def test_onnx_reads_the_stride_too(tmp_path):
    """ONNX ConvTranspose keeps its strides: the same verdicts as the live model."""
    for init, flagged in (("torch-kaiming", True), ("signal-fan", False)):
        path = export_onnx(decoder(init), tmp_path / f"{init}.onnx", shape=(1, CHANNELS, 1))
        result = run("check", path, "--format", "json")
        assert (result.exit_code == 1) == flagged, (init, result.output[-2000:])


def selu_mlp(scale: float, depth: int = 12, width: int = 64) -> nn.Sequential:
    """A self-normalizing MLP (LeCun normal, SELU), its weights at `scale` times LeCun's std."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=scale / math.sqrt(width))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.SELU()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("scale", [0.58, 0.88, 1.15])
def test_selu_stack_outside_the_snn_band_is_an_error(scale):
    report = initaudit.audit(selu_mlp(scale))
    errors = {f.layer for f in report.findings if f.rule == "variance-out-of-range" and f.severity == "error"}
    assert len(errors) >= 10, [f.message for f in report.findings]


def test_selu_stack_at_lecun_is_clean():
    assert by_rule(initaudit.audit(selu_mlp(1.0))) == {}


def test_shallow_selu_stack_keeps_the_generic_band():
    """The guide: shallow nets are fine with plain random init; the SNN band holds for deep stacks."""
    assert by_rule(initaudit.audit(selu_mlp(0.88, depth=4))) == {}
