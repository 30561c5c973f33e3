"""A residual branch multiplied by a learnable parameter (ReZero's and SkipInit's α, LayerScale's γ) carries the
parameter's second moment into the depth model: α = 0 or a small γ keeps the stream flat, α = 1 on branches
that double the stream compounds — live (torch.fx) and in ONNX, where the parameter is an initializer."""

from __future__ import annotations

import pytest
import torch

import initaudit
from helpers.formats import export_onnx


class ScaledBlocks(torch.nn.Module):
    """16 norm-free blocks x + s·fc2(relu(fc1 x)), Kaiming-initialised (each branch's variance equals the
    stream's), `s` a learnable parameter of `shape` filled with `value`."""

    def __init__(self, value: float, shape: tuple[int, ...] = (), width: int = 32):
        super().__init__()
        self.fc1 = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(16))
        self.fc2 = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(16))
        self.scales = torch.nn.ParameterList(torch.nn.Parameter(torch.full(shape, value)) for _ in range(16))
        for fc in [*self.fc1, *self.fc2]:
            torch.nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            torch.nn.init.zeros_(fc.bias)

    def forward(self, x):
        for fc1, fc2, s in zip(self.fc1, self.fc2, self.scales):
            x = x + s * fc2(torch.relu(fc1(x)))
        return x


def exploding(report) -> set[str]:
    return {f.layer for f in report.findings if f.rule == "signal-exploding" and f.severity == "error"}


@pytest.mark.parametrize("fmt", ["live", "onnx"])
@pytest.mark.parametrize("value, shape, explodes", [
    (0.0, (), False),      # ReZero, SkipInit: the branch starts switched off
    (1e-5, (32,), False),  # LayerScale (CaiT): a small γ per channel
    (1.0, (), True),       # α = 1: every block doubles the stream
    (1.0, (32,), True),    # γ = 1 per channel: the same
])
def test_a_branch_scaled_by_a_parameter_carries_its_second_moment(tmp_path, fmt, value, shape, explodes):
    model = ScaledBlocks(value, shape).eval()
    if fmt == "live":
        report = initaudit.audit(model)
    else:
        report = initaudit.audit(export_onnx(model, tmp_path / "model.onnx", shape=(2, 32)))
    assert bool(exploding(report)) == explodes, [f.message for f in report.findings]
