"""The activation after each layer, from torch.fx, module order and TorchScript graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initaudit
from initaudit.activations import canonical, parse


class Functional(nn.Module):
    """Activations called as functions, a residual add through BatchNorm, a softmax head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.conv, self.bn = nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8)
        self.e, self.f, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.2)
        x = torch.tanh(self.b(x))
        x = self.c(x).sigmoid()
        x = F.dropout(self.d(x), 0.1).flatten(1)  # passes through dropout/flatten to the SELU
        x = F.selu(x)
        y = self.bn(self.conv(x.unsqueeze(-1))).squeeze(-1)
        x = F.relu(x + y)  # residual: conv → bn → add → relu
        x = F.gelu(self.e(x)) * 1.0
        x = self.f(x)  # no activation before the next layer: linear
        return F.softmax(self.head(x), dim=-1)


EXPECTED = {"a": ("leaky_relu(0.2)", False), "b": ("tanh", False), "c": ("sigmoid", False), "d": ("selu", False),
            "conv": ("relu", True), "e": ("gelu", False), "f": ("identity", False), "head": ("identity", False)}


def rows(report):
    return {row.name: (row.activation, row.norm_after) for row in report.layers}


def test_fx_sees_functional_calls_norms_and_softmax():
    assert rows(initaudit.audit(Functional())) == EXPECTED


def test_torchscript_graph_gives_the_same(tmp_path):
    path = tmp_path / "f.pt"
    torch.jit.script(Functional()).save(str(path))
    assert rows(initaudit.audit(path)) == EXPECTED


class DataDependent(Functional):
    """Data-dependent control flow: fx cannot trace it; one forward pass on a tiny input can."""

    def forward(self, x):
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


def test_a_forward_pass_traces_what_fx_cannot():
    report = initaudit.audit(DataDependent())
    assert rows(report) == EXPECTED and not report.notes
    assert [f.name for f in initaudit.audit(DataDependent()).layers] == list(EXPECTED)


class Caching(Functional):
    """Caches a tensor per device in a dict and keeps the last input's shape, as timm's LeViT attention does."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.a.weight * 1.0
        self.last = x.shape
        return super().forward(x) + self.cache[key].sum()


@pytest.mark.parametrize("model", [Caching(), type("DataDependentCaching", (DataDependent, Caching), {})()],
                         ids=["fx", "forward-pass"])
def test_tracing_leaves_the_module_as_it_found_it(model):
    import copy

    model.train()
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    first = rows(initaudit.audit(model))
    assert model.cache == {} and not hasattr(model, "last") and model.training
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == before
    assert rows(initaudit.audit(copy.deepcopy(model))) == first  # no fx Proxy left behind to trip a second trace
    assert model(torch.randn(2, 8)).shape == (2, 4)


def test_residual_joins_end_a_run():
    from initaudit.audit import build_graph
    from initaudit.config import Options
    from initaudit.loaders import modules

    for module in (Functional(), DataDependent()):
        loaded = modules.from_module(module, None)
        layers = {layer.name: layer for layer in build_graph(loaded, Options())}
        assert layers["conv"].residual_after and not layers["d"].residual_after
        assert [layers[n].run_depth for n in ("a", "d", "conv", "e", "head")] == [5, 5, 5, 3, 3]


class Untraceable(nn.Module):
    """Two inputs and data-dependent control flow: neither fx nor a tiny single input runs it; module order is used."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Mish(), nn.Linear(8, 2))

    def forward(self, x, mask):
        if x.sum() > 0:
            return self.net(x * mask)
        return self.net(-x)


def test_module_order_fallback_and_note():
    report = initaudit.audit(Untraceable())
    assert rows(report) == {"net.0": ("silu", False), "net.2": ("mish", True), "net.5": ("identity", False)}
    assert any("module order" in note for note in report.notes)


def test_per_layer_overrides_win():
    report = initaudit.audit(Untraceable(), activations={"net.5": "sigmoid"})
    assert rows(report)["net.5"] == ("sigmoid", False)


@pytest.mark.parametrize("spelling,name", [("LeakyReLU", "leaky_relu"), ("aten::relu_", "relu"), ("gelu_new", "gelu"),
                                           ("Swish", "silu"), ("Tanh", "tanh"), ("hard_sigmoid", "hardsigmoid")])
def test_spellings(spelling, name):
    assert canonical(spelling) == name


def test_parse_and_gains_follow_calculate_gain():
    assert parse("leaky_relu:0.2").gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.2))
    assert parse("leaky_relu(0.3)").param == 0.3
    assert parse("tanh").gain == pytest.approx(5 / 3)
    assert parse("selu").gain == pytest.approx(nn.init.calculate_gain("selu"))
    assert parse("gelu").gain == pytest.approx(nn.init.calculate_gain("relu"))  # ReLU-like
    assert canonical("NewGELUActivation", loose=True) == "gelu"
    with pytest.raises(initaudit.errors.InputError):
        parse("banana")
