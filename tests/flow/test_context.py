"""Context that does not depend on key order: HF and timm folders built from config.json on the meta
device, bare safetensors ordered by names and shapes, and `--model` with a weights file."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import initaudit
from initaudit.pipeline import analyse
from initaudit.config import Options
from initaudit.load.dispatch import load


def verdicts(report) -> Counter:
    """(rule, severity) of every warning and error: names may differ (transformers renames legacy keys)."""
    return Counter((f.rule, f.severity) for f in report.findings if f.severity != "info")


def rows(report) -> Counter:
    return Counter((r.activation, r.norm_after, r.run_depth, r.kind, r.fan_in, r.fan_out, r.scheme) for r in report.layers)


def errors(report) -> list[str]:
    return [f.message for f in report.findings if f.severity == "error"]


def save_both(model: nn.Module, folder, name: str):
    state = model.state_dict()
    torch.save(state, folder / f"{name}.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / f"{name}.safetensors")
    return folder / f"{name}.pt", folder / f"{name}.safetensors"


# ---------------------------------------------------------------- Hugging Face folders

SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
TOKENS = dict(vocab_size=1000, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HF = {  # family: (config class, model class, settings); a mix of families whose module names are in no list
    "bert": ("BertConfig", "BertModel", {**SMALL, **TOKENS}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=128, n_layer=2, n_head=4, n_positions=64, **TOKENS)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, **TOKENS)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=128, d_ff=256, num_layers=2, num_heads=4, d_kv=32,
                                                          decoder_start_token_id=0, **TOKENS)),
    "vit": ("ViTConfig", "ViTModel", dict(SMALL, image_size=32, patch_size=8)),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", dict(hidden_sizes=[32, 64, 128, 256],
                                                                          depths=[1, 1, 2, 1], image_size=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                         **TOKENS)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, **TOKENS)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=80, max_source_positions=32,
                     max_target_positions=32, decoder_start_token_id=1, **TOKENS)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=128, num_hidden_layers=2, state_size=8, **TOKENS)),
    "swin": ("SwinConfig", "SwinForImageClassification", dict(embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                                               image_size=32, patch_size=4, window_size=4)),
}


def hf_model(family: str) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers is in the `arch` extra")
    transformers.logging.set_verbosity_error()
    config_cls, model_cls, settings = HF[family]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))


HEAVY = {"t5", "whisper", "swin"}  # encoder-decoders and windowed attention: the slow suite


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in HEAVY else f for f in sorted(HF)])
def test_hf_folder_is_built_from_its_config_and_judged_like_the_live_module(family, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    folder, live = initaudit.audit(tmp_path), initaudit.audit(model)
    assert folder.notes[0].startswith(f"activations traced from {type(model).__name__}"), folder.notes
    assert errors(folder) == errors(live) == []
    assert verdicts(folder) == verdicts(live)
    # Every weight the file holds sits in the same context as in the live module, which also holds the
    # tied copies that save_pretrained leaves out.
    assert not rows(folder) - rows(live), rows(folder) - rows(live)
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert len(folder.layers) >= len(live.layers) - (len(names) - len(dict(model.named_parameters())))


def test_without_a_buildable_architecture_the_name_lists_take_over(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "no-such-family"}))
    report = initaudit.audit(tmp_path)
    assert "not built" in report.notes[0] and "no-such-family" in report.notes[0]
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.mlp.gate_proj"].activation == "silu"  # from the name lists


def test_a_folder_whose_forward_fails_is_read_like_its_bare_file(tmp_path):
    """HF EfficientNet at width 0.5 cannot run (its top BatchNorm keeps config.hidden_dim=2560): without a flow the
    folder is ordered by names and shapes as its bare file is; a chain of name-list guesses made every conv
    'linear' and reported 7 signal-vanishing errors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.EfficientNetForImageClassification(
        transformers.EfficientNetConfig(image_size=64, width_coefficient=0.5, depth_coefficient=0.5))
    model.save_pretrained(tmp_path / "hf")
    folder = initaudit.audit(tmp_path / "hf")
    assert "not built" in folder.notes[0]
    assert verdicts(folder) == verdicts(initaudit.audit(tmp_path / "hf" / "model.safetensors")) == Counter()


def test_no_code_from_the_folder_runs(tmp_path):
    """A config that asks for remote code is built from transformers' own classes, never from the folder."""
    model = hf_model("bert")
    model.save_pretrained(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(auto_map={"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"},
                  architectures=["EvilModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = initaudit.audit(tmp_path)
    assert not marker.exists()
    assert report.notes[0].startswith("activations traced from BertModel")


def test_a_large_config_costs_no_weight_memory():
    """A 7B-parameter LLaMA is built and traced on the meta device: no weights in memory, in seconds."""
    import resource
    import time

    transformers = pytest.importorskip("transformers")
    from initaudit.flow import meta_model

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    built = meta_model.from_config(config.to_dict(), shapes)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert built.unmatched == 0 and built.modules["model.layers.31.mlp.down_proj"].kind == "linear"
    assert grown_mb < 500 and time.monotonic() - start < 60  # the weights alone would be 27 GB


def timm_model(name: str, **args) -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm is in the `arch` extra")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **args)


@pytest.mark.parametrize("name, args", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    ("convnext_atto", dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))),
])
def test_timm_folder_is_built_with_timm(name, args, tmp_path):
    pytest.importorskip("huggingface_hub", reason="timm's save_for_hf needs huggingface_hub")
    from timm.models import save_for_hf

    model = timm_model(name, **args)
    save_for_hf(model, tmp_path, safe_serialization=True)
    folder, live = initaudit.audit(tmp_path), initaudit.audit(model)
    assert folder.notes[0].startswith(f"activations traced from {type(model).__name__}")
    assert errors(folder) == errors(live) == []
    assert verdicts(folder) == verdicts(live) and rows(folder) == rows(live)


# ---------------------------------------------------------------- bare safetensors

class MixerLike(nn.Module):
    """Names sort against the flow: `blocks.10` < `blocks.2`, `head` < `norm` < `stem`, a block's norms
    after its MLP; the head starts at zero, as timm's mixer and resmlp heads do."""

    def __init__(self, depth: int = 12, width: int = 64):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm1": nn.LayerNorm(width), "mlp": nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))}) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)
        nn.init.zeros_(self.head.weight)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block["mlp"](block["norm1"](x))
        return self.head(self.norm(x).mean(1))


def graph_of(path):
    return {layer.name: layer for layer in analyse(load(path), Options()).graph if layer.weighted}


def test_bare_safetensors_orders_layers_by_names_and_shapes(tmp_path):
    pt, st = save_both(MixerLike(), tmp_path, "mixer")
    layers = graph_of(st)
    assert layers["head"].is_output and not layers["stem"].is_output  # nothing consumes the head's 10 outputs
    order = sorted(layers, key=lambda name: layers[name].position)
    assert order[0] == "stem" and order[-1] == "head"
    assert order.index("blocks.2.mlp.0") < order.index("blocks.10.mlp.0")
    as_pt, as_st = initaudit.audit(pt), initaudit.audit(st)
    assert errors(as_st) == errors(as_pt) == []  # the zero head is by design
    assert verdicts(as_st) == verdicts(as_pt)


def test_a_unique_shape_chain_fixes_the_order(tmp_path):
    """Named (not numbered) layers whose widths chain one way only: the order is known."""
    net = nn.Module()
    for name, (fan_in, fan_out) in {"c_first": (3, 16), "a_second": (16, 32), "b_third": (32, 64), "z_out": (64, 5)}.items():
        net.add_module(name, nn.Linear(fan_in, fan_out))
    _, st = save_both(net, tmp_path, "chain")
    layers = graph_of(st)
    assert sorted(layers, key=lambda name: layers[name].position) == ["c_first", "a_second", "b_third", "z_out"]
    assert all(layer.order_known for layer in layers.values())
    assert [name for name, layer in layers.items() if layer.is_output] == ["z_out"]


class FinalWithNestedModulation(nn.Module):
    """DiT's FinalLayer: a linear head registered before the zero modulation nested beside it (Sequential index 1)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.final = nn.Module()
        self.final.linear = nn.Linear(width, 4)
        self.final.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.modulation[1].weight)


@pytest.mark.parametrize("zero_head", [True, False])
def test_an_insertion_order_file_ends_at_its_top_most_free_layer_not_a_nested_one(zero_head, tmp_path):
    """The file's last tensor is the nested modulation, whose output nothing in the file takes in; the head is the
    free layer nearest the top. A zero head is a recipe; with a drawn head, the zero modulation is no head."""
    net = FinalWithNestedModulation()
    if not zero_head:
        nn.init.normal_(net.final.linear.weight, std=0.1)
    pt, _ = save_both(net, tmp_path, "final")
    layers = graph_of(pt)
    assert [name for name, layer in layers.items() if layer.is_output] == ["final.linear"]
    zeros = {f.layer: f.severity for f in initaudit.audit(pt).findings if f.rule == "zero-weights"}
    assert zeros.get("final.linear") == ("info" if zero_head else None)
    assert "final.modulation.1" in zeros  # named, whatever its severity: a lone zero modulation is no head


def test_a_projection_every_block_repeats_is_no_output(tmp_path):
    """A Llama with grouped-query attention and tied embeddings, as save_pretrained writes it (no lm_head): the
    k/v projections' width (kv heads x head_dim) feeds no weight, yet they feed attention, not the model's output.
    Taken for outputs, they made a stock model's bare file warn signal-vanishing."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    path = tmp_path / "llama" / "model.safetensors"
    layers = graph_of(path)
    assert "lm_head" not in layers
    assert not [name for name, layer in layers.items() if layer.is_output and name.startswith("model.layers.0.")]
    assert verdicts(initaudit.audit(path)) == Counter()


def test_the_bias_tells_a_bare_files_weight_layout(tmp_path):
    """GPT-2's Conv1D stores [in, out], a transposed conv [in, out, *k]: the bias, as long as the output, tells
    them from [out, in] in a bare file, so fans and units are right and a copied unit (a column) is found. The
    square c_proj follows its sibling c_attn; the bias-less lm_head stays [out, in]."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, **TOKENS)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        c_proj = model.transformer.h[1].mlp.c_proj.weight  # [256, 64]: [in, out]
        c_proj[:, 5] = c_proj[:, 2]
    pt, st = tmp_path / "gpt2.pt", tmp_path / "gpt2.safetensors"
    torch.save(model.state_dict(), pt)
    save_model(model, str(st))  # the tied lm_head is written once, as transformer.wte
    for path in (pt, st):
        layers = graph_of(path)
        for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"):
            weight = layers[name].param("weight")
            assert (weight.unit_axis, weight.fan_in) == (1, weight.shape[0]), name
        if "lm_head" in layers:
            assert layers["lm_head"].param("weight").unit_axis == 0
        found = {(f.layer, f.rule) for f in initaudit.audit(path).findings if f.severity != "info"}
        assert found == {("transformer.h.1.mlp.c_proj", "duplicate-units")}, path.suffix

    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.ConvTranspose2d(16, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    _, st = save_both(net, tmp_path, "deconv")
    layers = graph_of(st)
    assert [layers[name].kind for name in ("0", "2", "4")] == ["conv2d", "conv_transpose2d", "conv2d"]
    assert layers["2"].param("weight").unit_axis == 1


def test_a_head_tied_to_the_embedding_is_the_output_of_a_bare_file(tmp_path):
    """save_pretrained/save_model write a tied LM head once, as the token embedding: ALBERT's last layer in the
    file, predictions.dense, then feeds that head. Taken for the output, its zeroing was only info."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=1000, embedding_size=64, hidden_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=256)
    model = transformers.AlbertForMaskedLM(config)
    path = tmp_path / "albert.safetensors"
    save_model(model, str(path))
    layers = graph_of(path)
    assert "predictions.decoder" not in layers and not [name for name, l in layers.items() if l.is_output]
    assert verdicts(initaudit.audit(path)) == Counter()
    with torch.no_grad():
        model.predictions.dense.weight.zero_()
    save_model(model, str(path))
    found = {(f.layer, f.rule): f.severity for f in initaudit.audit(path).findings}
    assert found[("predictions.dense", "zero-weights")] in ("warning", "error")


def test_mobilebert_as_bare_files(tmp_path):
    """MobileBERT: a Linear named embedding_transformation (its bias says it is no embedding), and save_model keeps
    the tied head's name, cls.predictions.decoder, whose padding row is zero: info with the activation unknown,
    an error behind a ReLU."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MobileBertForMaskedLM(transformers.MobileBertConfig(vocab_size=1000, num_hidden_layers=2))
    pt, st = tmp_path / "mobilebert.pt", tmp_path / "mobilebert.safetensors"
    torch.save(model.state_dict(), pt)
    save_model(model, str(st))
    for path in (pt, st):
        assert graph_of(path)["mobilebert.embeddings.embedding_transformation"].kind == "linear"
        assert verdicts(initaudit.audit(path)) == Counter()
    dead = [(f.severity, f.message) for f in initaudit.audit(st).findings if f.rule == "dead-units"]
    assert dead == [("info", "cls.predictions.decoder: 1 of 1000 units have all-zero weights and bias <= 0 (units 0)")]
    relu = {(f.rule, f.layer): f.severity for f in initaudit.audit(st, activation="relu").findings}
    assert relu[("dead-units", "cls.predictions.decoder")] == "error"


def test_an_embedding_is_named_so_anywhere_in_its_name(tmp_path):
    """Canine's hash embeddings, char_embeddings.HashBucketCodepointEmbedder_0..7: tables, not linear layers
    feeding each other (taken for a chain of 8 linears, they warned signal-exploding)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.CanineModel(transformers.CanineConfig(hidden_size=128, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=256))
    path = tmp_path / "canine.safetensors"
    save_model(model, str(path))
    assert graph_of(path).get("char_embeddings.HashBucketCodepointEmbedder_3") is None  # not a weighted layer
    assert verdicts(initaudit.audit(path)) == Counter()


def test_an_ambiguous_order_drops_depth_rules_to_info_but_not_extreme_scales(tmp_path):
    """In a block of equal widths the norms' places cannot be told from a sorted file: no guessing (and
    normal(0.01), a common scheme, is no finding with the activation unknown), yet a weight 1000x too
    large is still a warning."""
    model = MixerLike(depth=6)
    for block in model.blocks:
        nn.init.normal_(block["mlp"][0].weight, std=0.01)  # 0.08x LeCun: a depth-dependent verdict
    with torch.no_grad():
        model.blocks[3]["mlp"][2].weight.mul_(1000)
    _, st = save_both(model, tmp_path, "ambiguous")
    layers = graph_of(st)
    assert not layers["blocks.0.mlp.0"].order_known
    found = {(f.layer, f.rule): f.severity for f in initaudit.audit(st).findings}
    assert found[("blocks.3.mlp.2", "variance-out-of-range")] == "warning"
    assert found.get(("blocks.0.mlp.0", "variance-out-of-range"), "info") == "info"


def _tv(name: str, **kwargs):
    def build():
        tvm = pytest.importorskip("torchvision.models", reason="torchvision is in the `arch` extra")
        return getattr(tvm, name)(weights=None, **kwargs)
    return build


STOCK = {
    "googlenet": _tv("googlenet", init_weights=True, aux_logits=False),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "swin_t": _tv("swin_t"),
    "mixer_b16_224": lambda: timm_model("mixer_b16_224"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("swin_t", "mixer_b16_224") else n
                                  for n in STOCK])
def test_stock_models_as_safetensors_get_the_verdicts_of_the_pt(name, tmp_path):
    torch.manual_seed(0)
    pt, st = save_both(STOCK[name](), tmp_path, name)
    as_pt, as_st = initaudit.audit(pt), initaudit.audit(st)
    assert errors(as_pt) == errors(as_st) == []
    assert {(f.rule, f.layer, f.severity) for f in as_st.findings if f.severity != "info"} == \
        {(f.rule, f.layer, f.severity) for f in as_pt.findings if f.severity != "info"}


# ---------------------------------------------------------------- --model with a weights file

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_mnasnet_weights_load_into_the_factory(fmt, tmp_path, cli):
    """MNASNet's load hook reads each submodule's version from the state_dict's metadata."""
    model = _tv("mnasnet0_5")()
    path = save_both(model, tmp_path, "mnasnet")[fmt == "safetensors"]
    result = cli("check", path, "--model", "torchvision.models:mnasnet0_5", "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)["summary"]
    assert summary["layers"] == 53 and summary["errors"] == 0
