"""A transformer's projections drawn at std 1 (`normal_(w)`, the std forgotten): short runs between norms excuse a
scale error, but not one 2.5x beyond the largest std any common scheme gives the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import initaudit
from test_unknown_activation import serious, transformer_state


class PreLNBlock(nn.Module):
    """A pre-LN transformer block: LN, q/k/v/o projections (single head), LN, GELU MLP."""

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        att = (self.q(h) @ self.k(h).transpose(-2, -1) / h.shape[-1] ** 0.5).softmax(-1)
        x = x + self.o(att @ self.v(h))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def pre_ln_transformer(std: float, width: int = 32, blocks: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(PreLNBlock(width) for _ in range(blocks)), nn.LayerNorm(width))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
    return model


def scale_findings(report) -> set[str]:
    return {layer for rule, layer in serious(report) if rule == "variance-out-of-range"}


def test_projections_at_std_1_are_flagged_and_at_002_are_clean():
    assert scale_findings(initaudit.audit(pre_ln_transformer(0.02))) == set()
    flagged = scale_findings(initaudit.audit(pre_ln_transformer(1.0)))
    assert {"0.q", "0.k", "0.v", "0.o", "3.fc2"} <= flagged


@pytest.mark.parametrize("std, flagged", [(0.02, False), (1.0, True)])
def test_bare_transformer_file_at_std_1_is_flagged(tmp_path, std, flagged):
    path = tmp_path / "model.pt"
    torch.save(transformer_state(width=32, std=std), path)
    found = scale_findings(initaudit.audit(path))
    assert ("encoder.layer.1.attention.query" in found) == flagged
