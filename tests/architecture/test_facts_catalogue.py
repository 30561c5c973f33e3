"""The facts the rules read are made in one module (judge/facts.py) beside their catalogue (judge/catalogue.py):
what the pipeline produces for a weight is exactly what the catalogue names, no more, no less."""

from __future__ import annotations

import torch

from initaudit.judge.catalogue import ALTERNATIVES, FACTS
from initaudit.load.modules import from_module
from initaudit.pipeline import analyse, make_options


def test_every_weight_carries_exactly_the_catalogued_facts():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    measured = analyse(from_module(model, None), make_options()).measured
    weights = [m for m in measured if m.param.is_weight and m.layer.weighted]
    assert len(weights) == 3
    for m in weights:
        assert set(m.facts) == set(FACTS) | {ALTERNATIVES}, m.layer.name
    for m in measured:  # biases and norm parameters: a subset, never a fact the catalogue lacks
        assert set(m.facts) - {ALTERNATIVES} <= set(FACTS), m.param.key
