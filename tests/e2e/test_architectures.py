"""Real architectures, built from code with their libraries' own init (no downloads): true verdicts.

Stock models get no error-level finding and the fingerprint names what each library used;
faults injected into them are found with the right rule on the right layer. Needs the `arch`
extra (torchvision, timm, transformers); each model is skipped, with the reason, without it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

import initaudit
from fixtures import models
from helpers.cli import one_error_line


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        tvm = pytest.importorskip("torchvision.models", reason="torchvision is in the `arch` extra")
        return getattr(tvm, name)(weights=None, **kwargs)
    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build():
        timm = pytest.importorskip("timm", reason="timm is in the `arch` extra")
        return timm.create_model(name, pretrained=False)
    return build


def _hf(config_cls: str, model_cls: str, **config) -> Callable[[], nn.Module]:
    def build():
        transformers = pytest.importorskip("transformers", reason="transformers is in the `arch` extra")
        transformers.logging.set_verbosity_error()
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    return build


class GRULM(nn.Module):
    """A GRU language model at PyTorch's defaults, with a ReLU projection before its head."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(200, 32), nn.GRU(32, 64, num_layers=2, batch_first=True)
        self.proj, self.head = nn.Linear(64, 64), nn.Linear(64, 200)

    def forward(self, tokens):
        return self.head(torch.relu(self.proj(self.rnn(self.embed(tokens))[0])))


SMALL_BERT = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=1000)
TRUNC_002 = {"normal-0.02", "trunc-normal-0.02"}  # timm's trunc_normal_(std=.02) cuts at ±2 absolute: ±100σ, a plain normal
KAIMING_OUT = {"kaiming-normal-fan-out", "kaiming-normal"}  # the two coincide where fan_in == fan_out


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    target: str                                   # a layer feeding a non-linearity, for the injected faults
    schemes: dict[str, set[str]] = field(default_factory=dict)  # layer-name regex -> schemes the library draws
    warnings: set[str] = field(default_factory=set)  # honest warnings the stock model earns


ARCHS = {
    "torchvision-resnet18": Arch(_tv("resnet18"), "layer1.0.conv1", {r"conv|downsample\.0": KAIMING_OUT, r"^fc$": {"torch-default"}}),
    "torchvision-resnet50-zero-init-residual": Arch(_tv("resnet50", zero_init_residual=True), "layer2.0.conv2",
                                                    {r"conv|downsample\.0": KAIMING_OUT}),
    # VGG without BatchNorm: normal(0, 0.01) in the 4096x4096 classifier loses 5x variance on that layer (info);
    # the stack as a whole stays within the depth analysis' band, so no warning.
    "torchvision-vgg11": Arch(_tv("vgg11"), "features.3", {r"features": KAIMING_OUT, r"classifier": {"normal-0.01"}}),
    "torchvision-mobilenet_v2": Arch(_tv("mobilenet_v2"), "features.2.conv.0.0",
                                     {r"features\.\d+\.conv\.0\.0": KAIMING_OUT, r"classifier": {"normal-0.01"}}),
    "torchvision-densenet121": Arch(_tv("densenet121"), "features.denseblock1.denselayer1.conv1",
                                    {r"conv": {"kaiming-normal"}, r"classifier": {"torch-default"}}),
    "timm-vit_tiny": Arch(_timm("vit_tiny_patch16_224"), "blocks.1.mlp.fc1", {r"blocks": TRUNC_002}),
    "timm-convnext_atto": Arch(_timm("convnext_atto"), "stages.1.blocks.0.mlp.fc1", {r"blocks": TRUNC_002}),
    "hf-bert": Arch(_hf("BertConfig", "BertModel", **SMALL_BERT), "encoder.layer.1.intermediate.dense",
                    {r"encoder|pooler": {"normal-0.02"}}),
    "hf-gpt2": Arch(_hf("GPT2Config", "GPT2LMHeadModel", n_embd=128, n_layer=4, n_head=4, vocab_size=1000, n_positions=64,
                        bos_token_id=0, eos_token_id=0), "transformer.h.1.mlp.c_fc",
                    {r"c_attn|c_fc": {"normal-0.02"}, r"c_proj": {"normal-0.02-scaled"}}),
    "hf-vit": Arch(_hf("ViTConfig", "ViTModel", image_size=32, patch_size=8, **{k: v for k, v in SMALL_BERT.items()
                                                                                 if k != "vocab_size"}),
                   "layers.1.mlp.fc1", {r"layers": {"normal-0.02"}}),
    "hf-llama": Arch(_hf("LlamaConfig", "LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000), "model.layers.1.mlp.gate_proj",
                     {r"proj|lm_head": {"normal-0.02"}}),
    "hf-t5": Arch(_hf("T5Config", "T5ForConditionalGeneration", d_model=128, d_ff=256, num_layers=2, num_heads=4,
                      d_kv=32, vocab_size=1000), "encoder.block.1.layer.1.DenseReluDense.wi"),
    "lstm-lm": Arch(models.tiny_lm, "projs.0", {r"^lstm$": {"torch-default"}}),
    "gru-lm": Arch(GRULM, "proj", {r"^rnn$": {"torch-default"}}),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[name].build()


def by_severity(report, severity: str) -> set[str]:
    return {f.layer for f in report.findings if f.severity == severity}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_stock_model_is_clean_and_fingerprinted(name):
    arch = ARCHS[name]
    report = initaudit.audit(build(name))
    assert by_severity(report, "error") == set(), [f.message for f in report.findings if f.severity == "error"]
    assert by_severity(report, "warning") == arch.warnings
    assert not [f for f in report.findings if f.rule == "constant-weights" and f.severity != "info"]  # norms at 1/0
    for pattern, schemes in arch.schemes.items():
        rows = [r for r in report.layers if re.search(pattern, r.name)]
        assert rows, pattern
        # a near-tie the numbers cannot resolve ("a|b") is right when it names the library's scheme
        wrong = {(r.name, r.scheme) for r in rows if not set(r.scheme.split("|")) & schemes}
        assert not wrong, wrong


def test_fan_out_where_fans_differ():
    report = initaudit.audit(build("torchvision-resnet18"))
    differ = [r for r in report.layers if r.kind == "conv2d" and r.fan_in != r.fan_out]
    assert differ and all("kaiming-normal-fan-out" in r.scheme.split("|") for r in differ)
    # only the stem (3→64, 7×7: fan_out Kaiming's std is 2.3 % from Xavier's, 3 standard errors at 9,408
    # values) may be a near-tie the numbers cannot resolve
    assert {r.scheme for r in differ if r.name != "conv1"} == {"kaiming-normal-fan-out"}


def test_context_that_makes_a_scale_legitimate():
    rows = {r.name: r for r in initaudit.audit(build("hf-llama")).layers}
    assert rows["model.layers.0.mlp.gate_proj"].activation == "silu"
    assert rows["model.layers.0.mlp.up_proj"].activation == rows["model.layers.0.self_attn.q_proj"].activation == "identity"
    assert rows["model.layers.0.self_attn.o_proj"].norm_after  # the next block's RMSNorm
    resnet = initaudit.audit(build("torchvision-resnet50-zero-init-residual"))
    zero_init = {(f.rule, f.severity) for f in resnet.findings if f.layer.endswith("bn3")}
    assert zero_init == {("zero-weights", "info")}  # zero-init residual BatchNorm: by design
    convnext = initaudit.audit(build("timm-convnext_atto"))
    layer_scale = [f for f in convnext.findings if f.tensor.endswith(".gamma")]
    assert layer_scale and {(f.rule, f.severity) for f in layer_scale} == {("constant-weights", "info")}
    bert = {r.name: r for r in initaudit.audit(build("hf-bert")).layers}
    assert bert["pooler.dense"].activation == "tanh" and bert["encoder.layer.0.output.dense"].norm_after


# ---------------------------------------------------------------- injected faults

def _weight(model: nn.Module, layer: str) -> torch.Tensor:
    module = model.get_submodule(layer)
    return module.weight if hasattr(module, "weight") else module.weight_ih_l0


def _scale(factor: float):
    def inject(w: torch.Tensor, act: str, transposed: bool) -> None:
        w.mul_(factor)
    return inject


def _copy_unit(w: torch.Tensor, act: str, transposed: bool) -> None:
    axis = 1 if transposed else 0  # HF Conv1D stores [in, out]: units are columns
    w.select(axis, 1).copy_(w.select(axis, 0))


def _mismatch(w: torch.Tensor, act: str, transposed: bool) -> None:
    """Xavier into a ReLU-family layer, Kaiming into a tanh/sigmoid one."""
    if act in ("tanh", "sigmoid"):
        fan_in = w.shape[0] if transposed else w.shape[1] * math.prod(w.shape[2:])
        w.normal_(0, math.sqrt(2 / fan_in))
    else:
        nn.init.xavier_normal_(w)


def _nan(w: torch.Tensor, act: str, transposed: bool) -> None:
    w.view(-1)[w.numel() // 3] = float("nan")


FAULTS = {
    "zero": (lambda w, act, transposed: w.zero_(), "zero-weights", "error"),
    "copy-filter": (_copy_unit, "duplicate-units", None),
    "scheme-mismatch": (_mismatch, "init-activation-mismatch", None),
    "scale-x100": (_scale(100.0), "variance-out-of-range", None),
    "scale-÷100": (_scale(0.01), "variance-out-of-range", None),
    "nan": (_nan, "non-finite", "error"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_injected_fault_is_found_on_its_layer(name, fault):
    arch = ARCHS[name]
    model = build(name)
    target = arch.target
    before = {r.name: r for r in initaudit.audit(model).layers}
    inject, rule, severity = FAULTS[fault]
    with torch.no_grad():
        inject(_weight(model, target), before[target].activation, type(model.get_submodule(target)).__name__ == "Conv1D")
    report = initaudit.audit(model)
    found = {(f.rule, f.layer): f.severity for f in report.findings}
    assert (rule, target) in found, sorted(found)
    if severity:
        assert found[(rule, target)] == severity
    assert by_severity(report, "error") <= {target}  # nothing else is blamed


def test_tanh_layer_with_kaiming_is_named():
    model = build("hf-bert")
    with torch.no_grad():
        nn.init.kaiming_normal_(model.pooler.dense.weight, nonlinearity="relu")
    found = {(f.rule, f.layer) for f in initaudit.audit(model).findings}
    assert ("init-activation-mismatch", "pooler.dense") in found


# ---------------------------------------------------------------- Hugging Face folders (no model code)

@pytest.mark.parametrize("name, shard", [("hf-bert", "5GB"), ("hf-gpt2", "5GB"), ("hf-llama", "200KB")])
def test_hugging_face_folder_reads_activations_from_config(name, shard, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard != "5GB")
    from_code, from_folder = initaudit.audit(model), initaudit.audit(tmp_path)
    assert from_folder.format == "hf-folder"
    assert by_severity(from_folder, "error") == by_severity(from_folder, "warning") == set()
    # by layer: a head tied to the token table is a layer of its own in both, reading the one tensor the folder keeps
    code_rows = {r.name: (r.activation, r.scheme, r.fan_in, r.fan_out) for r in from_code.layers}
    folder_rows = {r.name: (r.activation, r.scheme, r.fan_in, r.fan_out) for r in from_folder.layers}
    shared = code_rows.keys() & folder_rows.keys()
    assert len(shared) >= len(folder_rows) - 1
    assert {k: code_rows[k] for k in shared} == {k: folder_rows[k] for k in shared}


def test_hugging_face_folder_fault_is_found_and_fixed(tmp_path, cli):
    model = build("hf-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.zero_()
    model.save_pretrained(tmp_path / "in", max_shard_size="200KB")
    result = cli("check", tmp_path / "in")
    assert result.exit_code == 1 and "model.layers.1.mlp.gate_proj" in result.output
    assert cli("fix", tmp_path / "in", "-o", tmp_path / "out").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(p.name for p in (tmp_path / "out").iterdir())
    report = initaudit.audit(tmp_path / "out")
    assert by_severity(report, "error") == set()
    changed = [p.name for p in (tmp_path / "in").iterdir()
               if p.read_bytes() != (tmp_path / "out" / p.name).read_bytes()]
    assert len(changed) == 1 and changed[0].endswith(".safetensors")  # only the shard that held the layer


def test_broken_hugging_face_folders_are_clear_errors(tmp_path, cli):

    model = build("hf-llama")
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    shards[3].unlink()
    assert shards[3].name in one_error_line(cli("check", tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in one_error_line(cli("check", tmp_path))
    (tmp_path / "config.json").unlink()  # shards and their index alone: one model still (load/paths.folder_kind)
    assert shards[3].name in one_error_line(cli("check", tmp_path))
