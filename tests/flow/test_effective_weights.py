"""Effective weights and honest activations (issue 22): a constant multiplying a weight, a pre-activation or an
activation's output is read from fx (`--model`), TorchScript and ONNX alike and judged as part of the weight the
forward pass uses; sin/cos are SIREN's activations; an elementwise function initaudit does not model is unknown.
Each recipe (tests/helpers/effective_models.py) is clean in every format that holds its code, its bug twin is
flagged in each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import effective_models as em
from helpers.formats import export_onnx, save_as
from helpers.verdicts import serious
from initaudit.flow.trace import fx_flow, module_infos
from initaudit.pipeline import audit

FORMATS = ("factory", "torchscript", "onnx")  # the formats that hold the forward pass (and so its constants)

# recipe -> (its bug twin, the rule the twin must get at warning or above in every format)
TWINS = {
    "siren": ("siren_bug", "variance-out-of-range"),            # hidden layers at torch's default: ω0 × too large
    "mapping": ("mapping_bug", "variance-out-of-range"),        # equalized LR's runtime scale dropped
    "leaky_gain": ("leaky_gain_bug", "init-activation-mismatch"),  # leaky_relu(0.2) without its ·√2
    "buffer_scaled": ("buffer_scaled_bug", "variance-out-of-range"),  # N(0, 1) weights, the buffer's scale 1
}


def audited(name: str, fmt: str, folder):
    """The report of the factory `name` of tests/helpers/effective_models.py, saved in `fmt`."""
    module = getattr(em, name)()
    if fmt == "onnx":
        width = next(p for p in module.parameters() if p.dim() == 2).shape[1]
        return audit(export_onnx(module, folder / "model.onnx", shape=(2, width)))
    path, kwargs = save_as(module, fmt, folder, factory=f"helpers.effective_models:{name}")
    return audit(path, **kwargs)


def rows(report) -> dict:
    return {row.name: row for row in report.layers}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("recipe", list(TWINS))
def test_recipe_is_clean_and_its_bug_twin_flagged(recipe, fmt, tmp_path):
    """(In ONNX the exporter folds a buffer's w·c into the initializer: buffer_scaled read right there before.)"""
    twin, rule = TWINS[recipe]
    (tmp_path / "recipe").mkdir()
    (tmp_path / "twin").mkdir()
    assert serious(audited(recipe, fmt, tmp_path / "recipe")) == set()
    assert rule in {found[0] for found in serious(audited(twin, fmt, tmp_path / "twin"))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_siren_reads_sin_and_omega(fmt, tmp_path):
    """sin is SIREN's activation, ω0 = 30 multiplies every sine layer's pre-activation, the readout is linear."""
    found = rows(audited("siren", fmt, tmp_path))
    for i in range(7):
        assert found[f"{i}.linear"].activation == "sin"
        assert found[f"{i}.linear"].effective_scale == pytest.approx(em.OMEGA)
    assert found["7"].activation == "identity" and found["7"].effective_scale == 1.0


def test_siren_bug_message_speaks_of_the_effective_weight(tmp_path):
    report = audited("siren_bug", "factory", tmp_path)
    message = next(f.message for f in report.findings if f.layer == "1.linear" and f.rule == "variance-out-of-range")
    assert "effective std (stored std 0.036 × 30 at run time) 1.08" in message, message


@pytest.mark.parametrize("fmt", ("factory", "torchscript"))
def test_equalized_lr_scale_is_read_and_the_stored_std_kept(fmt, tmp_path):
    """The JSON row keeps the stored std (N(0, 1/lr_mul²): 100) and says the runtime scale lr_mul/√fan_in."""
    for name, row in rows(audited("mapping", fmt, tmp_path)).items():
        assert row.std == pytest.approx(100, rel=0.02), name
        assert row.effective_scale == pytest.approx(0.01 / math.sqrt(512)), name
        assert row.activation == "leaky_relu(0.2)·1.414", name


def test_onnx_reads_the_gain_after_an_activation(tmp_path):
    """The exporter folds w·c into the initializer (the effective weight itself); the ·√2 after leaky_relu
    stays a Mul by a constant, read as the activation's output gain."""
    for name, row in rows(audited("mapping", "onnx", tmp_path)).items():
        assert row.std == pytest.approx(1 / math.sqrt(512), rel=0.02), name
        assert row.activation == "leaky_relu(0.2)·1.414", name


@pytest.mark.parametrize("fmt", FORMATS)
def test_learnable_scalars_are_not_folded(fmt, tmp_path):
    """ReZero's α (0) and LayerScale's γ (1e-5) are parameters: recipes of their own, not the layer's scale;
    both models are clean."""
    for name in ("rezero", "layerscale"):
        (tmp_path / name).mkdir()
        report = audited(name, fmt, tmp_path / name)
        assert all(row.effective_scale == 1.0 for row in report.layers), name
        assert serious(report) == set(), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmodelled_elementwise_function_is_unknown(fmt, tmp_path):
    """torch.erf after a layer is an activation initaudit does not model: unknown, never identity (nor, in
    ONNX, GELU: an Erf outside GELU's pattern)."""
    found = rows(audited("erf_net", fmt, tmp_path))
    assert [found[f"{i}.linear"].activation for i in range(3)] == ["unknown"] * 3
    assert found["3"].activation == "identity"


def test_bare_state_dict_holds_no_runtime_scale(tmp_path):
    """A state_dict holds the stored weights only: the equalized-LR mapping net's N(0, 100²) weights are judged
    as stored (the runtime scale lives in the code; `--model` reads it)."""
    report = audited("mapping", "state_dict", tmp_path)
    assert all(row.effective_scale == 1.0 for row in report.layers)
    stored = [f.message for f in report.findings if f.rule == "variance-out-of-range" and f.severity == "error"]
    assert len(stored) == 8 and all(": std 100 is" in m or ": std 99.8 is" in m for m in stored), stored


# ---------------------------------------------------------------- where a constant is not the layer's scale

class Attention(nn.Module):
    """q·scale, then q·kᵀ and a softmax: the scale is the softmax's temperature, not q's init."""

    def __init__(self, n: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(n, n) for _ in range(4))
        self.scale = n ** -0.5

    def forward(self, x):
        q = self.q(x) * self.scale
        attn = torch.softmax(q @ self.k(x).transpose(-1, -2), dim=-1)
        return self.out(attn @ self.v(x))


class NormThenScale(nn.Module):
    """A layer, a LayerNorm, then ·30 and sin: the norm sets the scale the constant multiplies."""

    def __init__(self, n: int = 16):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(n, n), nn.LayerNorm(n), nn.Linear(n, 2)

    def forward(self, x):
        return self.head(torch.sin(30 * self.norm(self.fc(x))))


def downstream(module: nn.Module) -> dict:
    return fx_flow(module, module_infos(module)).downstream()


def test_temperature_before_softmax_is_not_the_layers_scale():
    found = downstream(Attention())
    assert {name: d.weight_scale for name, d in found.items()} == {"q": 1.0, "k": 1.0, "v": 1.0, "out": 1.0}


def test_constant_after_a_norm_is_not_the_layers_scale():
    found = downstream(NormThenScale())
    assert found["fc"].weight_scale == 1.0 and str(found["fc"].activation) == "sin"


def test_weight_times_constant_folds_through_fx():
    """F.linear(x, w·c / d): every constant on the way from the parameter to the layer function multiplies."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.tanh(F.linear(x, self.weight * 0.5 / 4))

    found = downstream(nn.Sequential(Scaled()))
    assert found["0"].weight_scale == pytest.approx(0.125) and str(found["0"].activation) == "tanh"


def test_dynamic_trace_reads_the_same_constants():
    """Models fx cannot trace (Hugging Face...) are run once: the weight's scale and the gain after the
    activation are read from that forward pass as from fx."""
    from initaudit.flow.dynamic_trace import dynamic_flow

    module = em.mapping(depth=2, width=64)
    found = dynamic_flow(module, module_infos(module), ((torch.randn(2, 64),), {})).downstream()
    assert {name: round(d.weight_scale, 6) for name, d in found.items()} == {"0": 0.00125, "1": 0.00125}
    assert {str(d.activation) for d in found.values()} == {"leaky_relu(0.2)·1.414"}
