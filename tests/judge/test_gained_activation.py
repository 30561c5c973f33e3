"""A post-activation gain that restores the variance (StyleGAN's leaky_relu(0.2)·√2) makes LeCun's std the right
one: its sampling noise is no init-activation mismatch, while Xavier into plain ReLU still is."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import initaudit


class GainedLeakyLinear(nn.Module):
    """A Linear followed by leaky_relu(0.2)·√2, as StyleGAN's fused activation computes it."""

    def __init__(self, width: int, gained: bool):
        super().__init__()
        self.linear, self.gain = nn.Linear(width, width), math.sqrt(2) if gained else 1.0
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(width))
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return F.leaky_relu(self.linear(x), 0.2) * self.gain


def mismatched(model: nn.Module) -> set[str]:
    return {f.layer for f in initaudit.audit(model).findings
            if f.rule == "init-activation-mismatch" and f.severity in ("warning", "error")}


def test_lecun_before_leaky_relu_times_sqrt2_is_no_mismatch():
    torch.manual_seed(0)
    assert mismatched(nn.Sequential(*(GainedLeakyLinear(32, gained=True) for _ in range(8)))) == set()


def test_xavier_into_plain_relu_is_still_a_mismatch():
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(8) for m in (nn.Linear(32, 32), nn.ReLU())))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    assert len(mismatched(model)) == 8
