"""A weight tied across layers is judged as every layer that uses it: a head tied to a token table is a head, at
the head's fan, in every format (the live module, its state_dict, safetensors, ONNX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_model

import initaudit
from flow.test_onnx_parity import TinyGPT, onnx_report

FORMATS = ["module", "state_dict", "safetensors", "onnx-legacy", "onnx-dynamo"]


def report_in(fmt: str, module: torch.nn.Module, tmp_path):
    if fmt == "module":
        return initaudit.audit(module)
    if fmt == "state_dict":
        torch.save(module.state_dict(), tmp_path / "model.pt")
        return initaudit.audit(tmp_path / "model.pt")
    if fmt == "safetensors":  # keeps one name of the tied pair
        save_model(module, str(tmp_path / "model.safetensors"))
        return initaudit.audit(tmp_path / "model.safetensors")
    return onnx_report(module, tmp_path, dynamo=fmt == "onnx-dynamo")


def serious(report) -> set[tuple[str, str, str]]:
    return {(f.rule, f.layer, f.severity) for f in report.findings if f.severity != "info"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [64, 256])
def test_a_head_tied_to_a_token_table_left_at_n01_is_flagged_as_the_head(fmt, d, tmp_path):
    """The table at torch's Embedding default N(0, 1) is fine as a lookup, but as the head (fan_in d) it puts out
    logits √d times the input's scale: variance-out-of-range on `lm_head`, a warning in every format."""
    report = report_in(fmt, TinyGPT(d=d, embedding_std=1.0), tmp_path)
    assert serious(report) == {("variance-out-of-range", "lm_head", "warning")}
    finding = next(f for f in report.findings if f.layer == "lm_head")
    assert finding.expected == pytest.approx(d ** -0.5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nanogpts_tied_table_at_normal_002_is_clean_as_a_head(fmt, tmp_path):
    report = report_in(fmt, TinyGPT(d=256, embedding_std=0.02), tmp_path)
    assert serious(report) == set()


# ---------------------------------------------------------------- one ONNX initializer read by a Gather and a head

def tied_graph(tmp_path, head: str, std: float):
    """ids → Gather(wte) → LayerNorm → head reading the same table → logits; `head` is Gemm (transB) or
    MatMul by its Transpose, as exporters write a tied head when they do not fold it into a copy."""
    rng = np.random.default_rng(0)
    vocab, d = 50, 64
    inits = [numpy_helper.from_array(rng.normal(0, std, (vocab, d)).astype(np.float32), "transformer.wte.weight"),
             numpy_helper.from_array(np.ones(d, np.float32), "transformer.ln_f.weight")]
    N = helper.make_node
    nodes = [N("Gather", ["transformer.wte.weight", "ids"], ["e"], name="/transformer/wte/Gather"),
             N("LayerNormalization", ["e", "transformer.ln_f.weight"], ["h"], axis=-1, name="/transformer/ln_f/LN")]
    if head == "Gemm":
        nodes.append(N("Gemm", ["h", "transformer.wte.weight"], ["y"], transB=1, name="/lm_head/Gemm"))
    else:
        nodes += [N("Transpose", ["transformer.wte.weight"], ["wt"], perm=[1, 0], name="/lm_head/Transpose"),
                  N("MatMul", ["h", "wt"], ["y"], name="/lm_head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, vocab])], inits)
    path = tmp_path / "tied.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return initaudit.audit(path)


@pytest.mark.parametrize("head", ["Gemm", "MatMul"])
def test_one_onnx_initializer_read_by_a_gather_and_a_head_is_both_layers(head, tmp_path):
    report = tied_graph(tmp_path, head, std=1.0)
    rows = {row.name: (row.kind, row.fan_in, row.fan_out) for row in report.layers}
    assert rows == {"transformer.wte": ("embedding", 64, 50), "lm_head": ("linear", 64, 50)}
    assert serious(report) == {("variance-out-of-range", "lm_head", "warning")}
    assert serious(tied_graph(tmp_path, head, std=0.02)) == set()


# ---------------------------------------------------------------- a Hugging Face folder saves the tied head once

# The N(0, 1) table also contradicts what GPT-2's own init declares for it: normal(0.02).
@pytest.mark.parametrize("std, expected", [(1.0, {("variance-out-of-range", "lm_head", "warning"),
                                                  ("recipe-mismatch", "transformer.wte", "error")}), (0.02, set())],
                         ids=["n01-table", "gpt2-recipe"])
def test_a_hugging_face_folder_judges_the_head_its_config_ties_to_the_token_table(std, expected, tmp_path):
    """save_pretrained keeps `transformer.wte.weight` only; the architecture built from config.json ties `lm_head`
    to it, and the folder is judged as the model is."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000,
                                                                 n_positions=128))
    torch.nn.init.normal_(model.transformer.wte.weight, 0.0, std)
    model.save_pretrained(tmp_path / "gpt2")
    assert serious(initaudit.audit(model)) == expected
    report = initaudit.audit(tmp_path / "gpt2")
    assert serious(report) == expected
    assert {row.name for row in report.layers} >= {"transformer.wte", "lm_head"}
