"""Quantized models audited on their dequantized weights: onnxruntime's dynamic (MatMulInteger) and QDQ
(DequantizeLinear) models, Einsum projections as linear layers, torch's dynamically quantized Linears; packed
GPTQ/bitsandbytes/FP8 layouts named in coverage."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

from helpers.cli import run
from helpers.formats import export_onnx


def mlp(zero: bool) -> nn.Module:
    """Linear-ReLU-Linear-ReLU-Linear; `zero`: the middle layer's weight zeroed (the bug)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if zero:
        with torch.no_grad():
            model[2].weight.zero_()
    return model


class Reader:
    """A tiny calibration reader for quantize_static."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.batches = iter([{"input": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def dynamic(plain, out):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(plain), str(out), weight_type=QuantType.QInt8)


def qdq(plain, out):
    from onnxruntime.quantization import QuantFormat, quantize_static
    quantize_static(str(plain), str(out), Reader(), quant_format=QuantFormat.QDQ)


def check_json(path) -> tuple[dict, int]:
    result = run("check", path, "--format", "json")
    return json.loads(result.stdout), result.exit_code


def export(model: nn.Module, path):
    torch.onnx.export(model.eval(), (torch.randn(2, 64),), str(path), dynamo=False, input_names=["input"])
    return path


@pytest.mark.parametrize("quantize", [dynamic, qdq])
def test_a_quantized_onnx_model_is_audited_on_its_dequantized_weights(tmp_path, quantize):
    reports = {}
    for zero in (False, True):
        plain = export(mlp(zero), tmp_path / f"mlp{zero}.onnx")
        quantize(plain, tmp_path / f"q{zero}.onnx")
        reports[zero] = check_json(tmp_path / f"q{zero}.onnx")
    (clean, code), (buggy, _) = reports[False], reports[True]
    float_layers = {layer["name"]: layer for layer in check_json(tmp_path / "mlpFalse.onnx")[0]["layers"]}
    layers = {layer["name"]: layer for layer in clean["layers"]}
    assert code == 0 and not [f for f in clean["findings"] if f["severity"] in ("error", "warning")]
    assert set(layers) == set(float_layers) == {"0", "2", "4"}
    for name, layer in layers.items():  # named, fanned and activated like the float model; std within int8 error
        want = float_layers[name]
        assert (layer["fan_in"], layer["fan_out"], layer["activation"]) == (want["fan_in"], want["fan_out"],
                                                                            want["activation"])
        assert layer["std"] == pytest.approx(want["std"], rel=0.02)
    coverage = clean["coverage"]
    assert coverage["audited"] == 6  # three weights and three biases
    assert not any("not audited yet" in e["reason"] for e in coverage["not_audited"])
    assert coverage["audited"] + sum(e["count"] for e in coverage["not_audited"]) == coverage["tensors"]
    zeroed = {(f["rule"], f["layer"]) for f in buggy["findings"] if f["severity"] == "error"}
    assert ("zero-weights", "2") in zeroed and all(layer == "2" for _, layer in zeroed)


class EinsumAttention(nn.Module):
    """Projections by torch.einsum with bare parameters (`q` [out, in], `kv` [in, heads, head_dim])."""

    def __init__(self, zero: bool, d: int = 32, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Parameter(torch.empty(d, d).uniform_(-d ** -0.5, d ** -0.5))
        self.kv = nn.Parameter(torch.empty(d, heads, d // heads).uniform_(-d ** -0.5, d ** -0.5))
        self.out = nn.Linear(d, d)
        if zero:
            with torch.no_grad():
                self.kv.zero_()

    def forward(self, x):
        q = torch.einsum("bsd,hd->bsh", x, self.q)
        k = torch.einsum("bsd,dhk->bshk", x, self.kv).flatten(2)
        attention = torch.einsum("bqd,bkd->bqk", q, k).softmax(-1)
        return self.out(torch.einsum("bqk,bkd->bqd", attention, k))


def test_einsum_projections_are_linear_layers(tmp_path):
    clean, code = check_json(export_onnx(EinsumAttention(False), tmp_path / "clean.onnx", shape=(2, 5, 32)))
    buggy, _ = check_json(export_onnx(EinsumAttention(True), tmp_path / "zero.onnx", shape=(2, 5, 32)))
    layers = {layer["name"]: layer for layer in clean["layers"]}
    assert {name: (layer["kind"], layer["fan_in"], layer["fan_out"]) for name, layer in layers.items()} == {
        "q": ("linear", 32, 32), "kv": ("linear", 32, 32), "out": ("linear", 32, 32)}
    assert code == 0 and not [f for f in clean["findings"] if f["severity"] in ("error", "warning")]
    assert {(f["rule"], f["layer"]) for f in buggy["findings"] if f["severity"] == "error"} == {("zero-weights", "kv")}


def test_a_hand_built_einsum_projection_has_the_fans_of_its_equation(tmp_path):
    """'bsi,io->bso': the weight is [in, out] = [16, 8]; its Add'ed [8] bias is the layer's, and the layer is in
    the flow (no activation after it on the way to the output)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.uniform(-0.25, 0.25, (16, 8)).astype(np.float32), "proj.weight")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "proj.bias")
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "proj.weight"], ["h"], equation="bsi,io->bso"),
         helper.make_node("Add", ["h", "proj.bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])], [weight, bias])
    path = tmp_path / "einsum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report, code = check_json(path)
    (layer,) = report["layers"]
    assert (layer["name"], layer["kind"], layer["fan_in"], layer["fan_out"], layer["activation"]) == (
        "proj", "linear", 16, 8, "identity")
    assert report["coverage"]["audited"] == 2 and code == 0


def test_torch_dynamically_quantized_linears_are_audited_dequantized(tmp_path):
    paths = {}
    for zero in (False, True):
        model = torch.ao.quantization.quantize_dynamic(mlp(zero), {nn.Linear}, dtype=torch.qint8)
        paths[zero] = tmp_path / f"q{zero}.pt"
        torch.save(model.state_dict(), paths[zero])
    (clean, code), (buggy, _) = check_json(paths[False]), check_json(paths[True])
    assert {layer["name"] for layer in clean["layers"]} == {"0", "2", "4"}
    assert code == 0 and not [f for f in clean["findings"] if f["severity"] in ("error", "warning")]
    assert not any("packed" in e["reason"] for e in clean["coverage"]["not_audited"])
    assert {(f["rule"], f["layer"]) for f in buggy["findings"] if f["severity"] == "error"} == {("zero-weights", "2")}


def packed_layouts() -> dict[str, dict[str, torch.Tensor]]:
    """The key layouts of GPTQ, bitsandbytes (int8 and 4-bit) and FP8 checkpoints' packed layers."""
    torch.manual_seed(0)
    return {
        "gptq": {"l.qweight": torch.randint(0, 2 ** 30, (8, 64), dtype=torch.int32),
                 "l.qzeros": torch.randint(0, 2 ** 30, (1, 8), dtype=torch.int32),
                 "l.scales": torch.rand(1, 64).half(), "l.g_idx": torch.zeros(64, dtype=torch.int32)},
        "bnb-int8": {"l.weight": torch.randint(-127, 127, (64, 64), dtype=torch.int8), "l.SCB": torch.rand(64)},
        "bnb-4bit": {"l.weight": torch.randint(0, 255, (2048, 1), dtype=torch.uint8), "l.weight.absmax": torch.rand(64),
                     "l.weight.quant_map": torch.rand(16),
                     "l.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)},
        "fp8": {"l.weight": (torch.randn(64, 64) * 0.05).to(torch.float8_e4m3fn), "l.weight_scale_inv": torch.rand(1)},
    }


@pytest.mark.parametrize("layout", list(packed_layouts()))
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_packed_quantized_layouts_are_named_in_coverage(tmp_path, layout, fmt):
    """Every tensor of the packed layer is named as a packed quantized weight; the float head beside it is audited."""
    torch.manual_seed(0)
    packed = packed_layouts()[layout]
    state = {**packed, "head.weight": torch.empty(10, 64).uniform_(-0.125, 0.125), "head.bias": torch.zeros(10)}
    path = tmp_path / f"model.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    report, _ = check_json(path)
    coverage = report["coverage"]
    named = {e["reason"]: e for e in coverage["not_audited"]}
    entry = named["packed quantized weight (GPTQ/AWQ/bitsandbytes/FP8): not audited"]
    assert entry["count"] == len(packed) and set(entry.get("examples", [entry.get("tensor")])) <= set(packed)
    assert coverage["audited"] == 2 and [layer["name"] for layer in report["layers"]] == ["head"]
    assert coverage["audited"] + sum(e["count"] for e in coverage["not_audited"]) == coverage["tensors"]
