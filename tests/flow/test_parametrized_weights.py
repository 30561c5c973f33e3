"""Parametrized weights audited as the weight their module computes (weight norm's g·v/‖v‖, spectral norm's
W/σ) in every format, never their stored parts as layers of their own; norms over several dims read as norms."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from helpers.cli import run
from helpers.formats import export_onnx
from initaudit.flow.layers import group_layers
from initaudit.measure.tensors import effective_weight

FACTORY = "flow.test_parametrized_weights"


def old_weight_norm(module: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, and still in use
        return torch.nn.utils.weight_norm(module, **kwargs)


WRAPS = {"weight_norm": parametrizations.weight_norm, "old_weight_norm": old_weight_norm,
         "spectral_norm": parametrizations.spectral_norm, "old_spectral_norm": torch.nn.utils.spectral_norm}


def wrapped_mlp(wrap: str, zero_gain: bool = False) -> nn.Module:
    """An MLP (64-64-64-10, ReLU) whose three Linears are weight- or spectral-normed; `zero_gain`: the middle
    one's g zeroed (its effective weight is all zeros)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    for i in (0, 2, 4):
        model[i] = WRAPS[wrap](model[i])
    if zero_gain:
        with torch.no_grad():
            middle = model[2]
            (middle.weight_g if hasattr(middle, "weight_g") else middle.parametrizations.weight.original0).zero_()
    return model


def weight_norm_mlp():
    return wrapped_mlp("weight_norm")


def weight_norm_mlp_zero_gain():
    return wrapped_mlp("weight_norm", True)


def old_weight_norm_mlp():
    return wrapped_mlp("old_weight_norm")


def old_weight_norm_mlp_zero_gain():
    return wrapped_mlp("old_weight_norm", True)


def audited(model_name: str, fmt: str, folder) -> dict:
    """The JSON report of one of the factories above, checked as a state_dict, an ONNX export or --model."""
    if fmt == "factory":
        args = ["--model", f"{FACTORY}:{model_name}"]
    elif fmt == "state_dict":
        torch.save(globals()[model_name]().state_dict(), folder / "model.pt")
        args = [folder / "model.pt", "--activation", "relu"]
    else:
        args = [export_onnx(globals()[model_name](), folder / "model.onnx", shape=(2, 64))]
    result = run("check", *args, "--format", "json")
    return json.loads(result.stdout) | {"exit_code": result.exit_code}


def serious(report: dict) -> set[tuple[str, str]]:
    return {(f["rule"], f["layer"]) for f in report["findings"] if f["severity"] in ("error", "warning")}


@pytest.mark.parametrize("fmt", ["factory", "state_dict", "onnx"])
@pytest.mark.parametrize("name", ["weight_norm_mlp", "old_weight_norm_mlp"])
def test_a_zeroed_gain_is_caught_on_the_effective_weight_and_the_clean_twin_is_clean(tmp_path, name, fmt):
    clean, zeroed = audited(name, fmt, tmp_path), audited(f"{name}_zero_gain", fmt, tmp_path)
    assert serious(clean) == set() and clean["exit_code"] == 0
    assert serious(zeroed) == {("zero-weights", "2")} and zeroed["exit_code"] == 1
    for report in (clean, zeroed):
        assert [(row["name"], row["tensor"], row["fan_in"], row["fan_out"]) for row in report["layers"]] == [
            ("0", "0.weight", 64, 64), ("2", "2.weight", 64, 64), ("4", "4.weight", 64, 10)]
        if fmt != "onnx":  # the exporter's graph computes the weight; the file still names the parametrization
            assert {row["parametrization"] for row in report["layers"]} == {"weight_norm"}
        assert report["coverage"]["audited"] == report["coverage"]["tensors"] - sum(
            e["count"] for e in report["coverage"]["not_audited"])
        assert not any(".weight_v" in f["layer"] or "parametrizations" in f["layer"] for f in report["findings"])


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_the_effective_weight_is_the_one_the_module_computes(wrap):
    model = wrapped_mlp(wrap)
    if "spectral" in wrap:  # the power iteration converges on σ as training runs
        model.train()
        for _ in range(50):
            model(torch.randn(4, 64))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    layers = {layer.name: layer for layer in group_layers({k: tuple(v.shape) for k, v in state.items()})}
    assert sorted(layers) == ["0", "2", "4"]
    for name, layer in layers.items():
        param = layer.param("weight")
        assert param.key == f"{name}.weight" and param.parametrization == wrap.removeprefix("old_")
        computed = effective_weight(param, [state[k] for k in param.parts])
        with torch.no_grad():
            assert torch.allclose(computed, model[int(name)].weight, rtol=1e-3, atol=1e-5)
        state_of_method = [p for p in layer.params if p.role == "buffer"]
        assert len(state_of_method) == (2 if "spectral" in wrap else 0)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_over_any_dim_of_a_conv(dim):
    torch.manual_seed(0)
    conv = parametrizations.weight_norm(nn.Conv2d(3, 8, 3), dim=dim)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(torch.rand_like(conv.parametrizations.weight.original0) + 0.5)
    state = {k: v.detach() for k, v in nn.Sequential(conv).state_dict().items()}
    (layer,) = group_layers({k: tuple(v.shape) for k, v in state.items()})
    param = layer.param("weight")
    assert layer.kind == "conv2d" and (param.fan_in, param.fan_out) == (27, 72)
    with torch.no_grad():
        assert torch.allclose(effective_weight(param, [state[k] for k in param.parts]), conv.weight, atol=1e-6)


def test_spectral_norm_state_is_named_as_not_audited(tmp_path):
    torch.save(wrapped_mlp("spectral_norm").state_dict(), tmp_path / "sn.pt")
    result = run("check", tmp_path / "sn.pt", "--activation", "relu", "--format", "json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and serious(report) == set()
    assert [row["tensor"] for row in report["layers"]] == ["0.weight", "2.weight", "4.weight"]
    assert report["coverage"]["audited"] == 6 and report["coverage"]["not_audited"] == [{
        "kind": "buffer", "count": 6, "reason": "spectral norm's power-iteration state, not weights",
        "examples": ["0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v",
                     "2.parametrizations.weight.0._u", "2.parametrizations.weight.0._v",
                     "4.parametrizations.weight.0._u"]}]


class MultiDimNorms(nn.Module):
    """Linears followed by LayerNorms over two dims: with a bias of the weight's shape, and (named) without one."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(264, 264)
        self.norm = nn.LayerNorm([1, 264])
        self.mix = nn.Linear(32, 32)
        self.ln_f = nn.LayerNorm([4, 8])
        self.final_norm = nn.LayerNorm([4, 8], bias=False)


def test_norms_over_several_dims_are_norms_and_fix_leaves_them_alone(tmp_path):
    torch.manual_seed(0)
    state = MultiDimNorms().state_dict()
    layers = {layer.name: layer.kind for layer in group_layers({k: tuple(v.shape) for k, v in state.items()})}
    assert layers == {"proj": "linear", "norm": "norm", "mix": "linear", "ln_f": "norm", "final_norm": "norm"}
    torch.save(state, tmp_path / "model.pt")
    report = json.loads(run("check", tmp_path / "model.pt", "--format", "json").stdout)
    assert [row["name"] for row in report["layers"]] == ["proj", "mix"] and serious(report) == set()
    result = run("fix", tmp_path / "model.pt", "--all", "--force", "-o", tmp_path / "fixed.pt")
    assert result.exit_code == 0, result.output
    fixed = torch.load(tmp_path / "fixed.pt")
    assert not torch.equal(fixed["proj.weight"], state["proj.weight"])  # the linears re-drawn, the norms kept
    for key in ("norm.weight", "norm.bias", "ln_f.weight", "ln_f.bias", "final_norm.weight"):
        assert torch.equal(fixed[key], state[key]), key
