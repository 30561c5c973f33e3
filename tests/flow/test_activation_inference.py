"""The activation after each layer, from torch.fx, module order and TorchScript graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initaudit
from initaudit.flow.activations import canonical, parse


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
    from initaudit.pipeline import build_graph
    from initaudit.config import Options
    from initaudit.load import modules

    for module in (Functional(), DataDependent()):
        loaded = modules.from_module(module, None)
        layers = {layer.name: layer for layer in build_graph(loaded, Options())}
        assert layers["conv"].residual_after and not layers["d"].residual_after
        assert [layers[n].run_depth for n in ("a", "d", "conv", "e", "head")] == [5, 5, 5, 3, 3]


class Gated(nn.Module):
    """A norm-free stack with a squeeze-excite gate, a self-gated (x·sigmoid(x)) layer and a GLU."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.a, self.b = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 1)
        self.fc1, self.fc2 = nn.Conv2d(width, width // 4, 1), nn.Conv2d(width // 4, width, 1)
        self.c, self.glu, self.d = nn.Conv2d(width, width, 1), nn.Conv2d(width, 2 * width, 1), nn.Conv2d(width, width, 1)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x))))
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))  # squeeze-excite
        x = self.c(x)
        x = x * torch.sigmoid(x)  # SiLU written out
        value, gate = self.glu(x).chunk(2, dim=1)
        return self.d(value * torch.sigmoid(gate))


@pytest.mark.parametrize("trace", ["fx", "torchscript", "onnx"])
def test_a_gate_ends_a_run_and_self_gating_does_not(trace, tmp_path):
    """The squeeze-excite branch's output only scales the signal: its run ends there (a mis-scaled SE layer is
    not compounded through depth); x·sigmoid(x) and GLU multiply what the layer itself computed."""
    from initaudit.pipeline import analyse
    from initaudit.config import Options
    from initaudit.load.dispatch import load
    from initaudit.load import modules

    model = Gated().eval()
    path = tmp_path / ("gated.onnx" if trace == "onnx" else "gated.pt")
    if trace == "torchscript":
        torch.jit.script(model).save(str(path))
    elif trace == "onnx":
        torch.onnx.export(model, (torch.randn(1, 16, 8, 8),), str(path), dynamo=False)
    loaded = modules.from_module(model, None) if trace == "fx" else load(path)
    layers = {layer.name: layer for layer in analyse(loaded, Options()).graph if layer.weighted}
    assert {name for name, layer in layers.items() if layer.gate_after} == {"fc2"}
    # the main path runs on through the gated product (a, b, c, glu, d); the squeeze-excite branch ends at its gate
    assert [layers[n].run_depth for n in ("a", "b", "fc1", "fc2", "c", "glu", "d")] == [5, 5, 4, 4, 5, 5, 5]


class ShapeReader(nn.Module):
    """`b`'s input is reshaped by the size of `a`'s output (torchvision MViT's pooling does so): a shape, no signal."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x.reshape(y.size(0), -1)) + 1.0
        return torch.relu(self.norm(y)) + z


@pytest.mark.parametrize("trace", ["fx", "torchscript", "onnx"])
def test_reading_a_shape_carries_no_signal(trace, tmp_path):
    from initaudit.pipeline import analyse
    from initaudit.config import Options
    from initaudit.load.dispatch import load
    from initaudit.load import modules

    model = ShapeReader().eval()
    path = tmp_path / ("shape.onnx" if trace == "onnx" else "shape.pt")
    if trace == "torchscript":
        torch.jit.script(model).save(str(path))
    elif trace == "onnx":
        torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=False)
    loaded = modules.from_module(model, None) if trace == "fx" else load(path)
    layers = {layer.name: layer for layer in analyse(loaded, Options()).graph if layer.weighted}
    assert layers["a"].norm_after and str(layers["a"].activation) == "relu"
    assert (layers["a"].run_depth, layers["b"].run_depth) == (1, 1)


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


class UntraceableDeep(nn.Module):
    """16 Linear layers with F.relu between them (unseen in module order), drawn Kaiming for ReLU, untraceable."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(16))
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def forward(self, x, mask):
        if x.sum() > 0:
            x = x * mask
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


def test_module_order_says_nothing_of_what_lies_between_two_layers():
    """Module order does not see F.relu: two layers in a row are 'unknown' between them, not 'linear', so neither
    the scheme rules (Kaiming feeding 'identity') nor the depth analysis (2x variance per 'linear' layer: 256x
    through 16) judge a guess."""
    report = initaudit.audit(UntraceableDeep())
    assert any("module order" in note for note in report.notes)
    assert {row.activation for row in report.layers if row.name != "layers.15"} == {"unknown"}
    assert [f for f in report.findings if f.severity != "info"] == []


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
    with pytest.raises(initaudit.common.errors.InputError):
        parse("banana")
