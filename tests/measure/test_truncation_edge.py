"""Values exactly on a truncation bound: counted in the one streaming pass (mergeable like every other sum),
judged against what a correct draw and its rounding leave there. A fresh timm ViT whose trunc_normal_(std=.02,
a=-2, b=2) left a lone -2.0 (100σ) is fresh, with a truncation-edge info; a pile on ±2σ is an error."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import initaudit
from helpers.verdicts import serious
from initaudit.measure import schemes, stats, weight_state

EDGE = "truncation-edge"


def test_extremes_are_counted_and_merged_across_chunks_and_cores(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(4000, 300) * 0.02
    w[[3, 1500, 3999], [0, 7, 299]] = -2.0  # in different chunks and row ranges
    w[2000, 5] = 0.5
    monkeypatch.setattr(stats, "SPLIT_ELEMENTS", 1 << 12)  # shared out over the cores
    monkeypatch.setattr(stats, "workers", lambda: 2)
    for units in (True, False):
        st = stats.compute(w, units=units)
        assert (st.min, st.min_count, st.max, st.max_count) == (-2.0, 3, 0.5, 1)


def fresh_vit_with_a_bound_value() -> nn.Module:
    """A fresh tiny timm ViT (no download) in which trunc_normal_ left a value exactly on its ±2 bounds."""
    for seed in range(40):
        torch.manual_seed(seed)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        if any(bool((p.abs() == 2).any()) for p in model.parameters()):
            return model
    pytest.fail("no seed of 40 left a value on trunc_normal_'s bound")


def test_a_fresh_timm_vit_is_fresh_and_its_bound_values_are_named():
    model = fresh_vit_with_a_bound_value()
    on_bound = {n for n, p in model.named_parameters() if bool((p.abs() == 2).any())}
    report = initaudit.audit(model)
    assert report.weights_state == "fresh", report.state_evidence["tensors"]
    assert "trained" not in {row.state for row in report.layers}
    edges = [f for f in report.findings if f.rule == EDGE]
    assert {f.tensor for f in edges} == on_bound and {f.severity for f in edges} == {"info"}
    assert not serious(report)


def test_a_lone_bound_value_is_no_sign_of_training():
    torch.manual_seed(0)
    w = nn.init.trunc_normal_(torch.empty(768, 192), std=0.02)  # bounds ±2: 100σ
    w[10, 10] = -2.0
    st = stats.compute(w)
    assert weight_state.classify_any(st, w, 0).state == "fresh"
    assert schemes.fingerprint(st, 192, 768, "linear", weight=w).scheme == "normal-0.02"
    edges = schemes.truncation_edges(st)
    assert edges.count == 1 and not edges.pile


def mlp(init) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(),
                          nn.LayerNorm(256), nn.Linear(256, 10))
    with torch.no_grad():
        for layer in model[::3]:
            init(layer.weight)
            nn.init.zeros_(layer.bias)
    return model


def test_a_pile_on_the_bounds_is_an_error_and_a_true_truncation_is_clean():
    """normal_(std=.02).clamp_(±2σ) piles 4.6 % of each weight on its bounds; trunc_normal_ draws none there."""
    piled = initaudit.audit(mlp(lambda w: nn.init.normal_(w, std=0.02).clamp_(-0.04, 0.04)))
    errors = {f.layer for f in piled.findings if f.rule == EDGE and f.severity == "error"}
    assert errors == {"0", "3", "6"}, piled.findings
    clean = initaudit.audit(mlp(lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)))
    assert not [f for f in clean.findings if f.rule == EDGE]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_what_half_precision_rounds_onto_the_bound_is_no_edge(dtype):
    """bf16 rounds hundreds of a large trunc-normal's values onto the one value nearest its bound: that is the
    draw's own density at the dtype's resolution, not a pile."""
    torch.manual_seed(0)
    w = nn.init.trunc_normal_(torch.empty(2048, 1024), std=0.02, a=-0.04, b=0.04).to(dtype)
    st = stats.compute(w)
    assert st.max_count > 1 or dtype == torch.float16
    assert schemes.truncation_edges(st) is None


def head_with(value: float) -> nn.Sequential:
    """A small ViT-style head (192→10, trunc_normal_(std=.02)) with one entry set to `value`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(192), nn.Linear(192, 10))
    with torch.no_grad():
        nn.init.trunc_normal_(model[1].weight, std=0.02)
        nn.init.zeros_(model[1].bias)
        model[1].weight[3, 7] = value
    return model


def test_a_lone_bound_value_in_a_small_layer_is_no_spike_but_a_real_spike_is():
    """One -2.0 holds most of a 1920-entry head's variance: trunc_normal_'s rounding, named truncation-edge (info),
    not weight-spike; a 1e4 entry is still a spike."""
    bound = {(f.rule, f.severity) for f in initaudit.audit(head_with(-2.0)).findings}
    assert (EDGE, "info") in bound and not {r for r, _ in bound} & {"weight-spike"}
    spike = {(f.rule, f.severity) for f in initaudit.audit(head_with(1e4)).findings}
    assert ("weight-spike", "error") in spike and EDGE not in {r for r, _ in spike}
