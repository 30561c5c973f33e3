"""ONNX exports keep every layer and its PyTorch name: initializers the exporter de-duplicated through `Identity`
nodes count for each layer that reads them, and layer names are the module paths `--model` and a `.pt` report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

import initaudit
from initaudit.config import Options
from helpers.formats import export_onnx

EXPORTS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


def mlp(fill) -> nn.Module:
    """A 7-layer ReLU MLP whose weights all get `fill` (so the exporter finds them identical), zero biases."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 32) for _ in range(7)]
    for layer in layers:
        fill(layer.weight)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])


class SmallResNet(nn.Module):
    """A stem, three torchvision BasicBlocks (conv/BN/ReLU, conv/BN, residual sum) and a classifier."""

    def __init__(self, zero_convs: bool = False, zero_init_residual: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(*[BasicBlock(8, 8) for _ in range(3)])
        self.fc = nn.Linear(8, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.layer1:
            if zero_convs:  # each block's first conv (its second, before the residual sum, may start at 0)
                nn.init.zeros_(block.conv1.weight)
            if zero_init_residual:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """GPT-2's layout: a `transformer` holding the token table `wte`, blocks `h.N` and `ln_f`, which the top
    module's forward reads (so no scope of the legacy exporter names `transformer`), and an `lm_head` tied to
    `wte`; every matrix drawn at normal(0.02), as nanoGPT does, the token table then at `embedding_std`."""

    VOCAB = 97

    def __init__(self, d: int = 64, n: int = 2, embedding_std: float = 0.02):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(self.VOCAB, d), h=nn.ModuleList(Block(d) for _ in range(n)),
                                              ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, self.VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.transformer.wte.weight, 0.0, embedding_std)

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def onnx_report(module: nn.Module, tmp_path, dynamo: bool = False):
    """The audit of the module's ONNX export (in eval mode: BatchNorm folded into the convs)."""
    if not isinstance(module, TinyGPT):
        shape = (1, 3, 8, 8) if isinstance(module, SmallResNet) else (2, 32)
        return initaudit.audit(export_onnx(module, tmp_path / "model.onnx", 18 if dynamo else 17, dynamo, shape))
    path = tmp_path / "gpt.onnx"
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.randint(0, TinyGPT.VOCAB, (2, 7)),), str(path), dynamo=dynamo,
                          opset_version=18 if dynamo else 17)
    return initaudit.audit(path)


def pt_report(module: nn.Module, tmp_path):
    torch.save(module.state_dict(), tmp_path / "model.pt")
    return initaudit.audit(tmp_path / "model.pt")


def names(report) -> set[str]:
    return {row.name for row in report.layers}


def errors(report) -> set[tuple[str, str]]:
    return {(f.rule, f.layer) for f in report.findings if f.severity == "error"}


@pytest.mark.parametrize("fill", [nn.init.zeros_, lambda w: nn.init.constant_(w, 0.5)], ids=["zeros", "constant"])
def test_every_layer_of_an_mlp_of_identical_layers_is_reported_in_onnx(fill, tmp_path):
    """The exporter keeps one initializer and reads it as `2.weight`, `4.weight`... through `Identity` nodes:
    each of the 7 layers is audited, as with the module, each with its own finding."""
    module = mlp(fill)
    expected = initaudit.audit(module)
    report = onnx_report(module, tmp_path)
    assert names(report) == names(expected) == {str(2 * i) for i in range(7)}
    assert errors(report) == errors(expected)
    assert len(errors(report)) >= 6


@pytest.mark.parametrize("dynamo", EXPORTS)
def test_every_zeroed_conv_of_a_resnet_is_reported_in_onnx(dynamo, tmp_path):
    module = SmallResNet(zero_convs=True)
    expected = initaudit.audit(module)
    report = onnx_report(module, tmp_path, dynamo)
    zeroed = {f"layer1.{i}.conv1" for i in range(3)}
    assert {layer for rule, layer in errors(expected) if rule == "zero-weights"} == zeroed
    assert {layer for rule, layer in errors(report) if rule == "zero-weights"} == zeroed
    assert names(report) == names(expected)


@pytest.mark.parametrize("dynamo", EXPORTS)
@pytest.mark.parametrize("build", [lambda: mlp(nn.init.zeros_), SmallResNet, TinyGPT], ids=["mlp", "resnet", "gpt"])
def test_onnx_layer_names_are_the_pytorch_module_paths(build, dynamo, tmp_path):
    """`transformer.h.0.attn`, not the legacy exporter's `h.0.attn`; a table the dynamo exporter names after its
    tied head (`lm_head.weight`) is still `transformer.wte`: ignores by layer carry across formats."""
    module = build()
    assert names(onnx_report(module, tmp_path, dynamo)) == names(initaudit.audit(module)) == names(pt_report(module, tmp_path))


@pytest.mark.parametrize("dynamo", EXPORTS)
def test_a_per_layer_ignore_written_for_the_module_holds_for_its_onnx_export(dynamo, tmp_path):
    module = TinyGPT()
    options = Options(per_layer_ignores={"transformer.h.*": ["variance-out-of-range"]})
    path = onnx_report(module, tmp_path, dynamo).model
    assert {f.layer for f in initaudit.audit(path).findings} >= {"transformer.h.0.fc", "transformer.h.1.fc"}
    kept = {(f.rule, f.layer) for f in initaudit.audit(path, options=options).findings}
    assert kept == {(f.rule, f.layer) for f in initaudit.audit(module, options=options).findings}
    assert not any(layer.startswith("transformer.h.") for _, layer in kept)


@pytest.mark.parametrize("dynamo, norm", [(False, "the weight of the BatchNorm after it"), (True, "`layer1.0.bn1` weight")],
                         ids=["legacy", "dynamo"])
def test_a_zero_conv_from_a_folded_zeroed_batchnorm_gain_names_the_batchnorm(dynamo, norm, tmp_path):
    """Exported in eval mode, a BatchNorm is folded into the conv before it: a zeroed gain zeroes the conv, and
    the finding says so (the dynamo exporter records which BatchNorm; the legacy one does not)."""
    module = SmallResNet()
    nn.init.zeros_(module.layer1[0].bn1.weight)
    found = [f for f in onnx_report(module, tmp_path, dynamo).findings if f.severity == "error"]
    assert [(f.rule, f.layer) for f in found] == [("zero-weights", "layer1.0.conv1")]
    assert f"(BatchNorm gain folded in: {norm} is zero, or the conv's own)" in found[0].message


@pytest.mark.parametrize("dynamo", EXPORTS)
def test_a_zero_init_residual_resnet_stays_clean_once_its_gains_are_folded(dynamo, tmp_path):
    report = onnx_report(SmallResNet(zero_init_residual=True), tmp_path, dynamo)
    assert [f for f in report.findings if f.severity != "info"] == []
    assert {f.layer for f in report.findings if f.rule == "zero-weights"} == {f"layer1.{i}.conv2" for i in range(3)}


class DownsampleResNet(nn.Module):
    """A stem (conv1, bn1), a BasicBlock and a strided one with a downsample (1x1 conv, BN) on its shortcut."""

    def __init__(self, zeroed: str):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.fc = nn.Linear(16, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.get_submodule(zeroed).weight)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# Each BatchNorm, the conv the exporter folds it into, and the severity of its zeroed gain.
ZEROED = {"bn1": ("conv1", "error"), "layer1.0.bn1": ("layer1.0.conv1", "error"),
          "layer1.0.bn2": ("layer1.0.conv2", "info"), "layer1.1.downsample.1": ("layer1.1.downsample.0", "error")}


@pytest.mark.parametrize("dynamo", EXPORTS)
def test_a_zeroed_batchnorm_gain_has_one_severity_with_the_module_and_folded_in_onnx(dynamo, tmp_path):
    """A zero gain kills the signal on the stem and on a downsample shortcut (the stream, not a branch the sum
    closes) and in a branch's first norm; a branch's last norm is zero-init residual. The module names the
    BatchNorm; ONNX, which folds it, the conv before it, at the same severity."""
    for norm, (conv, severity) in ZEROED.items():
        module = DownsampleResNet(norm)
        found = {(f.layer, f.severity) for f in initaudit.audit(module).findings if f.rule == "zero-weights"}
        assert found == {(norm, severity)}
        path = export_onnx(module, tmp_path / "model.onnx", 18 if dynamo else 17, dynamo, (1, 3, 8, 8))
        report = initaudit.audit(path)
        assert {(f.layer, f.severity) for f in report.findings if f.rule == "zero-weights"} == {(conv, severity)}, norm
