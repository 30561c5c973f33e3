"""Tiny models and data for the train-start callbacks' tests: a 3-layer ReLU MLP, clean or with its middle layer
planted at zero (IA101 zero-weights), and a regression batch source."""

from __future__ import annotations

import torch

IN, HIDDEN, OUT = 8, 32, 1


def mlp(zero_layer: bool = False, seed: int = 0) -> torch.nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear at PyTorch's default init; `zero_layer`: the middle weight all zeros."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                              torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT))
    if zero_layer:
        torch.nn.init.zeros_(net[2].weight)
    return net


def regression_data(n: int = 16) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, IN, generator=g), torch.randn(n, OUT, generator=g))
