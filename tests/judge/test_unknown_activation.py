"""Verdicts that do not hinge on a guessed activation: the scheme envelope and model-wide recipes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import initaudit
from initaudit.measure import schemes


def serious(report) -> set[tuple[str, str]]:
    return {(f.rule, f.layer) for f in report.findings if f.severity in ("warning", "error")}


def transformer_state(blocks: int = 4, width: int = 64, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A pre-LN transformer's weights drawn the transformers way: every Linear normal(0, 0.02), norms 1/0."""
    torch.manual_seed(0)
    state = {}
    for b in range(blocks):
        p = f"encoder.layer.{b}."
        for name, (out, inp) in {"attention.query": (width, width), "attention.key": (width, width),
                                 "attention.value": (width, width), "attention.output.dense": (width, width),
                                 "intermediate.dense": (4 * width, width), "output.dense": (width, 4 * width)}.items():
            state[p + name + ".weight"] = torch.randn(out, inp) * std
            state[p + name + ".bias"] = torch.zeros(out)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + norm + ".weight"] = torch.ones(width)
            state[p + norm + ".bias"] = torch.zeros(width)
    return state


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bare_transformer_at_normal_002_is_clean_and_x100_is_found(tmp_path, suffix):
    def write(state, name):
        path = tmp_path / (name + suffix)
        torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
        return path

    state = transformer_state()
    assert serious(initaudit.audit(write(state, "stock"))) == set()
    state["encoder.layer.2.intermediate.dense.weight"] *= 100
    state["encoder.layer.1.attention.value.weight"] /= 100
    found = serious(initaudit.audit(write(state, "faulty")))
    assert ("variance-out-of-range", "encoder.layer.2.intermediate.dense") in found
    assert ("variance-out-of-range", "encoder.layer.1.attention.value") in found


@pytest.mark.parametrize("fan_in, fan_out", [(9, 1152), (768, 3072), (4096, 4096), (16, 10)])
def test_envelope_holds_every_common_scheme(fan_in, fan_out):
    bounds = schemes.envelope(fan_in, fan_out, repeats=12)
    for std in (1 / math.sqrt(3 * fan_in), math.sqrt(2 / fan_in), math.sqrt(2 / fan_out), math.sqrt(1 / fan_in),
                math.sqrt(2 / (fan_in + fan_out)), 5 / 3 * math.sqrt(2 / (fan_in + fan_out)), 0.02, 0.02 / math.sqrt(24)):
        assert bounds.low <= std * 1.0001 and std <= bounds.high * 1.0001
    assert bounds.nearest(bounds.high * 100) == (bounds.high, bounds.high_scheme)


def recipe_stack(width: int) -> nn.Sequential:
    """Six (depthwise 3x3 conv, ReLU, 1x1 conv, ReLU) blocks, every conv drawn at normal(0.02), biases 0."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Conv2d(width, width, 3, padding=1, groups=width),
                                                          nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU())])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model


def test_recipe_drawn_on_every_layer_is_info_on_tiny_fan_in():
    """timm/transformers draw 0.02 on every layer, squeeze-excite and depthwise convs (fan_in 9) included."""
    report = initaudit.audit(recipe_stack(32))
    # Per layer the recipe is fine; this toy stack has no norm between its 12 layers, though, and the whole
    # stack loses its signal (gain 0.0018 and 0.0064 per layer): that is the depth analysis' finding.
    assert {f.rule for f in report.findings if f.severity == "error"} == {"signal-vanishing"}
    assert not [f for f in report.findings if f.rule == "variance-out-of-range" and f.severity != "info"]
    assert any(f.rule == "variance-out-of-range" for f in report.findings)  # still reported, as info


def test_recipe_holds_where_its_std_ties_with_a_formula():
    """At 1024 channels a depthwise conv's Xavier std at ReLU's gain is 0.0208: a 0.02 draw on the high side
    fingerprints as the near-tie `normal-0.02|xavier-normal-relu-gain`, still the recipe (HF Segformer's MixFFN)."""
    model = recipe_stack(1024)
    with torch.no_grad():
        model[4].weight.mul_(0.0204 / model[4].weight.std())  # within 3 standard errors of 0.02 (9,216 values)
    report = initaudit.audit(model)
    assert {row.name: row.scheme for row in report.layers}["4"] == "normal-0.02|xavier-normal-relu-gain"
    assert [(f.rule, f.severity) for f in report.findings if f.layer == "4" and f.rule == "variance-out-of-range"] == [
        ("variance-out-of-range", "info")]


@pytest.mark.parametrize("bias, excused", [(1.0, True), (0.0, False)])
def test_near_zero_weights_that_start_a_layer_at_its_bias_are_a_recipe(tmp_path, bias, excused):
    """gMLP's spatial gate, normal(1e-6) with bias 1, in a bare file: the layer starts at its bias (a gate at 1),
    as the live module's linear flow shows; without that bias, weights 1e-4x any scheme are a finding."""
    state = transformer_state()
    gate = "encoder.layer.1.gate.proj"
    state[gate + ".weight"] = torch.randn(196, 196) * 1e-6
    state[gate + ".bias"] = torch.full((196,), bias)
    path = tmp_path / "gated.safetensors"
    save_file(state, str(path))
    found = {(f.rule, f.layer): f.severity for f in initaudit.audit(path).findings}
    assert found[("variance-out-of-range", gate)] == ("info" if excused else "warning")
    assert [key for key, severity in found.items() if severity != "info" and key[1] != gate] == []


@pytest.mark.parametrize("scale, severity", [(1e-3, "info"), (1e-1, "warning")])
def test_a_head_scaled_toward_zero_starts_at_its_bias(scale, severity):
    """timm's head_init_scale (EVA, BEiT, RoPE ViTs): the head drawn at 0.02 then scaled by 0.001 puts out under
    0.1 % of its input's scale, a zero-init head in all but name; scaled by 0.1 it is merely mis-scaled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 384), nn.GELU(), nn.LayerNorm(384), nn.Linear(384, 100))
    with torch.no_grad():
        model[3].weight.normal_(std=0.02 * scale)
    found = {(f.rule, f.layer): f.severity for f in initaudit.audit(model).findings}
    assert found[("variance-out-of-range", "3")] == severity
