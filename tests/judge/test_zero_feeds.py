"""A layer whose output only zero-initialized layers take in (DiT's timestep MLP at normal(0.02), feeding nothing
but the adaLN-zero modulations) reaches no signal at init: its std within the common schemes is the recipe's
choice; the same layer feeding live modulations, or drawn far off every scheme, is judged as any layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import initaudit
from helpers import recipes


def severity(model: nn.Module, fmt: str, folder) -> str | None:
    """The severity of t_embedder.2's variance-out-of-range finding, checked as a live module or as ONNX."""
    if fmt == "onnx":
        torch.onnx.export(model.eval(), (torch.randn(2, 4, 8, 8),), str(folder / "dit.onnx"), dynamo=False)
        report = initaudit.audit(folder / "dit.onnx")
    else:
        report = initaudit.audit(model)
    return next((f.severity for f in report.findings
                 if f.rule == "variance-out-of-range" and f.layer == "t_embedder.2"), None)


@pytest.mark.parametrize("fmt", ["module", "onnx"])
def test_dits_timestep_mlp_feeding_only_zero_modulations_is_a_recipe(fmt, tmp_path):
    assert severity(recipes.build_dit_adaln_zero(), fmt, tmp_path) == "info"


@pytest.mark.parametrize("fmt", ["module", "onnx"])
def test_the_same_layer_feeding_live_modulations_is_judged(fmt, tmp_path):
    model = recipes.build_dit_adaln_zero()
    for linear in [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1]]:
        nn.init.xavier_uniform_(linear.weight)
    assert severity(model, fmt, tmp_path) == "error"


def test_a_scale_off_every_scheme_is_not_excused_by_the_zeros_after_it(tmp_path):
    model = recipes.build_dit_adaln_zero()
    nn.init.normal_(model.t_embedder[2].weight, std=1.0)  # the std forgotten: 5.7x LeCun at width 32
    assert severity(model, "module", tmp_path) in ("warning", "error")
