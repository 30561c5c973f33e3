"""ONNX: the same verdicts as the PyTorch model it was exported from; activations, fans and names from the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import initaudit
from fixtures import models
from helpers.cli import one_error_line
from helpers.formats import export_onnx
from helpers.verdicts import EXPECTED

EXPORTS = [pytest.param(13, False, id="legacy-opset13"), pytest.param(17, False, id="legacy-opset17"),
           pytest.param(18, True, id="dynamo-opset18")]


def findings(report) -> set[tuple[str, str]]:
    return {(f.rule, f.layer) for f in report.findings}


@pytest.mark.parametrize("opset, dynamo", EXPORTS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_onnx_export_gives_the_pytorch_verdict(name, opset, dynamo, tmp_path):
    module = getattr(models, name)()
    expected = initaudit.audit(module)
    report = initaudit.audit(export_onnx(module, tmp_path / "model.onnx", opset, dynamo))
    assert report.format == "onnx"
    assert findings(report) == findings(expected)
    assert [(r.name, r.fan_in, r.fan_out, r.activation) for r in report.layers] == \
           [(r.name, r.fan_in, r.fan_out, r.activation) for r in expected.layers]


@pytest.mark.parametrize("opset, dynamo", EXPORTS)
def test_lstm_language_model_and_decomposed_activations_survive_export(opset, dynamo, tmp_path):
    module = models.tiny_lm()
    expected = initaudit.audit(module)
    report = initaudit.audit(export_onnx(module, tmp_path / "lm.onnx", opset, dynamo))
    rows = {(r.tensor, r.fan_in, r.fan_out, r.activation) for r in report.layers}
    assert rows == {(r.tensor, r.fan_in, r.fan_out, r.activation) for r in expected.layers}
    assert [r.activation for r in report.layers if r.name.startswith("projs.")] == ["gelu", "silu", "gelu", "mish", "hardswish"]
    assert findings(report) == findings(expected)


# ---------------------------------------------------------------- graphs built by hand

RNG = np.random.default_rng(0)


def init(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def kaiming(out: int, fan_in: int, *kernel: int) -> np.ndarray:
    return RNG.normal(0, np.sqrt(2 / (fan_in * int(np.prod(kernel or (1,))))), (out, fan_in, *kernel))


def save(tmp_path, nodes, inits, x_shape=(2, 8), opset=17, name="model.onnx"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def two_layers(tmp_path, act_nodes, extra_inits=(), opset=17):
    """x → Gemm fc1 → [act_nodes: h → a] → Gemm fc2 → y."""
    inits = [init("fc1.weight", kaiming(16, 8)), init("fc1.bias", np.zeros(16)),
             init("fc2.weight", kaiming(4, 16)), *extra_inits]
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1, name="/fc1/Gemm"),
             *act_nodes, helper.make_node("Gemm", ["a", "fc2.weight"], ["y"], transB=1, name="/fc2/Gemm")]
    return save(tmp_path, nodes, inits, opset=opset)


def activation_of(path, layer="fc1") -> str:
    return next(r.activation for r in initaudit.audit(path).layers if r.name == layer)


C = {"half": 0.5, "one": 1.0, "sqrt2": np.sqrt(2.0), "three": 3.0, "k1": 0.044715, "k2": np.sqrt(2 / np.pi)}
CONSTS = [init(k, v) for k, v in C.items()]
N = helper.make_node

PATTERNS = {
    "silu": [N("Sigmoid", ["h"], ["s"]), N("Mul", ["h", "s"], ["a"])],
    "hardswish": [N("HardSigmoid", ["h"], ["s"], alpha=1 / 6), N("Mul", ["h", "s"], ["a"])],
    "gelu (erf, x·(1+erf)·½)": [N("Div", ["h", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
                                N("Mul", ["h", "p"], ["m"]), N("Mul", ["m", "half"], ["a"])],
    "gelu (erf, ½x·(1+erf))": [N("Mul", ["h", "half"], ["hx"]), N("Div", ["h", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]),
                               N("Add", ["e", "one"], ["p"]), N("Mul", ["hx", "p"], ["a"])],
    "gelu (tanh, Pow)": [N("Pow", ["h", "three"], ["c"]), N("Mul", ["c", "k1"], ["c1"]), N("Add", ["h", "c1"], ["i"]),
                         N("Mul", ["i", "k2"], ["i2"]), N("Tanh", ["i2"], ["t"]), N("Add", ["t", "one"], ["p"]),
                         N("Mul", ["h", "p"], ["m"]), N("Mul", ["m", "half"], ["a"])],
    "gelu (tanh, x·x·x)": [N("Mul", ["h", "h"], ["sq"]), N("Mul", ["h", "sq"], ["c"]), N("Mul", ["k1", "c"], ["c1"]),
                           N("Add", ["h", "c1"], ["i"]), N("Mul", ["k2", "i"], ["i2"]), N("Tanh", ["i2"], ["t"]),
                           N("Add", ["one", "t"], ["p"]), N("Mul", ["h", "p"], ["m"]), N("Mul", ["half", "m"], ["a"])],
    "mish": [N("Softplus", ["h"], ["sp"]), N("Tanh", ["sp"], ["t"]), N("Mul", ["h", "t"], ["a"])],
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_decomposed_activations(pattern, tmp_path):
    expected = pattern.split(" ")[0]
    assert activation_of(two_layers(tmp_path, PATTERNS[pattern], CONSTS)) == expected
    # the same core ops without the closing Mul by x are the plain activation
    core = {"silu": "sigmoid", "hardswish": "hardsigmoid", "mish": "softplus"}.get(expected)
    if core is not None:
        plain = [n for n in PATTERNS[pattern] if n.op_type != "Mul"]
        plain[-1].output[0] = "a"
        assert activation_of(two_layers(tmp_path, plain, CONSTS)) == core


def test_sigmoid_gate_of_another_tensor_is_not_silu(tmp_path):
    gate = [N("Sigmoid", ["h"], ["s"]), N("Gemm", ["x", "g.weight"], ["o"], transB=1, name="/g/Gemm"),
            N("Mul", ["o", "s"], ["a"])]
    assert activation_of(two_layers(tmp_path, gate, [init("g.weight", kaiming(16, 8))])) == "sigmoid"


NATIVE = {
    "relu": [N("Relu", ["h"], ["a"])],
    "leaky_relu(0.2)": [N("LeakyRelu", ["h"], ["a"], alpha=0.2)],
    "prelu(0.25)": [N("PRelu", ["h", "slope"], ["a"])],
    "elu": [N("Elu", ["h"], ["a"])],
    "selu": [N("Selu", ["h"], ["a"])],
    "sigmoid": [N("Sigmoid", ["h"], ["a"])],
    "hardsigmoid": [N("HardSigmoid", ["h"], ["a"])],
    "tanh": [N("Tanh", ["h"], ["a"])],
    "softplus": [N("Softplus", ["h"], ["a"])],
    "relu6": [N("Clip", ["h", "zero", "six"], ["a"])],
    "identity": [N("Softmax", ["h"], ["a"])],
    "relu (through reshape, transpose, flatten)": [
        N("Reshape", ["h", "shape"], ["r"]), N("Transpose", ["r"], ["t"], perm=[0, 2, 1]), N("Flatten", ["t"], ["f"]),
        N("Relu", ["f"], ["a"])],
}
NATIVE_INITS = [init("slope", np.full(16, 0.25)), init("zero", 0.0), init("six", 6.0),
                numpy_helper.from_array(np.array([2, 4, 4], dtype=np.int64), "shape")]


@pytest.mark.parametrize("act", sorted(NATIVE))
def test_native_activation_ops(act, tmp_path):
    assert activation_of(two_layers(tmp_path, NATIVE[act], NATIVE_INITS)) == act.split(" ")[0]


def test_gelu_op_of_opset_20(tmp_path):
    path = two_layers(tmp_path, [N("Gelu", ["h"], ["a"], approximate="tanh")], opset=20)
    assert activation_of(path) == "gelu"


def test_batchnorm_after_a_layer_sets_norm_after_and_output_is_identity(tmp_path):
    bn = [init(f"bn.{k}", v) for k, v in (("weight", np.ones(16)), ("bias", np.zeros(16)),
                                          ("running_mean", np.zeros(16)), ("running_var", np.ones(16)))]
    nodes = [N("BatchNormalization", ["h", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"], ["b"]),
             N("Relu", ["b"], ["a"])]
    report = initaudit.audit(two_layers(tmp_path, nodes, bn))
    rows = {r.name: r for r in report.layers}
    assert rows["fc1"].activation == "relu" and rows["fc1"].norm_after
    assert rows["fc2"].activation == "identity"
    assert not any(f.layer == "bn" for f in report.findings)  # a norm's ones and zeros are by design


# ---------------------------------------------------------------- fan conventions

def torch_fans(shape) -> tuple[int, int]:
    return torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


def only_layer(path):
    report = initaudit.audit(path)
    return report.layers[0]


@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_fans_follow_trans_b(trans_b, tmp_path):
    w = kaiming(32, 64)  # [out, in]
    stored = w if trans_b else w.T
    path = save(tmp_path, [N("Gemm", ["x", "fc.weight"], ["y"], transB=trans_b)], [init("fc.weight", stored)], (2, 64))
    row = only_layer(path)
    assert (row.kind, row.fan_in, row.fan_out) == ("linear", 64, 32)
    assert row.scheme == "kaiming-normal"


def test_matmul_weights_are_in_by_out_and_pick_up_their_add_bias(tmp_path):
    nodes = [N("MatMul", ["x", "onnx::MatMul_7"], ["m"], name="/encoder/encoder.proj/MatMul"),
             N("Add", ["encoder.proj.bias", "m"], ["y"], name="/encoder/encoder.proj/Add")]
    inits = [init("onnx::MatMul_7", kaiming(32, 64).T), init("encoder.proj.bias", RNG.normal(0, 1, 32))]
    report = initaudit.audit(save(tmp_path, nodes, inits, (2, 64)))
    row = report.layers[0]
    assert (row.name, row.fan_in, row.fan_out, row.scheme) == ("encoder.proj", 64, 32, "kaiming-normal")
    assert {(f.rule, f.tensor) for f in report.findings} == {("nonzero-bias", "encoder.proj.bias")}


@pytest.mark.parametrize("op, shape, group", [("Conv", (32, 4, 3, 3), 4), ("Conv", (16, 1, 3, 3), 16),
                                              ("ConvTranspose", (16, 8, 3, 3), 1), ("Conv", (8, 16, 5), 1)])
def test_conv_fans_match_torch(op, shape, group, tmp_path):
    channels = shape[1] * group if op == "Conv" else shape[0]
    x_shape = (1, channels) + (8,) * (len(shape) - 2)
    node = N(op, ["x", "conv.weight"], ["y"], group=group)
    row = only_layer(save(tmp_path, [node], [init("conv.weight", RNG.normal(0, 0.1, shape))], x_shape))
    assert (row.fan_in, row.fan_out) == torch_fans(shape)
    assert row.kind == ("conv_transpose" if op == "ConvTranspose" else "conv") + f"{len(shape) - 2}d"


def test_bidirectional_lstm_weights_per_direction(tmp_path):
    hidden, inputs = 12, 8
    bound = 1 / np.sqrt(hidden)
    w, r, b = (RNG.uniform(-bound, bound, s) for s in ((2, 4 * hidden, inputs), (2, 4 * hidden, hidden), (2, 8 * hidden)))
    node = N("LSTM", ["x", "onnx::LSTM_1", "onnx::LSTM_2", "onnx::LSTM_3"], ["y"], name="/rnn/LSTM",
             hidden_size=hidden, direction="bidirectional")
    report = initaudit.audit(save(tmp_path, [node], [init("onnx::LSTM_1", w), init("onnx::LSTM_2", r), init("onnx::LSTM_3", b)],
                                  (5, 2, inputs)))
    rows = {r.tensor: r for r in report.layers}
    assert set(rows) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0_reverse", "rnn.weight_hh_l0_reverse"}
    assert (rows["rnn.weight_ih_l0"].fan_in, rows["rnn.weight_ih_l0"].fan_out) == (inputs, 4 * hidden)
    assert (rows["rnn.weight_hh_l0_reverse"].fan_in, rows["rnn.weight_hh_l0_reverse"].kind) == (hidden, "recurrent")
    assert not [f for f in report.findings if f.severity != "info"]


# ---------------------------------------------------------------- names and shared initializers

def test_scope_names_folded_weights_and_shared_initializers(tmp_path):
    nodes = [N("Conv", ["x", "onnx::Conv_193", "onnx::Conv_194"], ["c"], name="/layer3/layer3.0/conv1/Conv", pads=[1, 1, 1, 1]),
             N("Relu", ["c"], ["r"]), N("Flatten", ["r"], ["f"]),
             N("Identity", ["head.bias"], ["other.bias"]),  # the legacy exporter's de-duplicated zero biases
             N("Gemm", ["f", "onnx::Gemm_5", "head.bias"], ["g"], transB=1, name="/head/Gemm"), N("Relu", ["g"], ["gr"]),
             N("Gemm", ["gr", "onnx::Gemm_6", "other.bias"], ["y"], transB=1, name="/other/Gemm")]
    inits = [init("onnx::Conv_193", kaiming(8, 2, 3, 3)), init("onnx::Conv_194", np.zeros(8)),
             init("onnx::Gemm_5", np.zeros((16, 8 * 16))), init("onnx::Gemm_6", kaiming(16, 16)),
             init("head.bias", np.zeros(16))]
    report = initaudit.audit(save(tmp_path, nodes, inits, (1, 2, 4, 4)))
    assert [r.name for r in report.layers] == ["layer3.0.conv1", "head", "other"]
    assert [r.norm_after for r in report.layers] == [True, False, False]  # the renamed conv weight had a BatchNorm folded in
    assert any("folded BatchNorm" in n for n in report.notes)
    assert {(f.rule, f.layer) for f in report.findings if f.severity == "error"} == {("zero-weights", "head")}


def test_one_initializer_shared_by_two_layers_is_audited_for_each(tmp_path):
    nodes = [N("Gemm", ["x", "tied"], ["h"], transB=1, name="/enc/Gemm"), N("Relu", ["h"], ["r"]),
             N("Gemm", ["r", "tied"], ["y"], transB=1, name="/dec/Gemm")]
    report = initaudit.audit(save(tmp_path, nodes, [init("tied", np.ones((8, 8)))]))
    assert {(f.rule, f.layer) for f in report.findings} == {("constant-weights", "enc"), ("constant-weights", "dec")}


def test_constant_node_weights(tmp_path):
    w = numpy_helper.from_array(np.zeros((4, 8), dtype=np.float32), "w")
    nodes = [N("Constant", [], ["fc.weight"], value=w), N("Gemm", ["x", "fc.weight"], ["y"], transB=1)]
    report = initaudit.audit(save(tmp_path, nodes, []))
    assert [(f.rule, f.layer) for f in report.findings] == [("zero-weights", "fc")]


# ---------------------------------------------------------------- files

def test_external_data_is_read_and_its_absence_is_a_clear_error(cli, tmp_path):
    path = export_onnx(models.zero_layer(), tmp_path / "exported.onnx")
    model = onnx.load(str(path))
    folder = tmp_path / "ext"
    folder.mkdir()
    external = folder / "model.onnx"
    onnx.save(model, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 100_000 and external.stat().st_size < 20_000
    assert findings(initaudit.audit(external)) == findings(initaudit.audit(models.zero_layer()))
    result = cli("check", external, "--format", "json")
    assert result.exit_code == 1 and '"format": "onnx"' in result.output
    data = (folder / "weights.bin").read_bytes()
    (folder / "weights.bin").write_bytes(data[: len(data) // 2])
    assert "shorter than" in one_error_line(cli("check", external))
    (folder / "weights.bin").unlink()
    assert "weights.bin" in one_error_line(cli("check", external))


def test_broken_graph_is_a_clear_error(cli, tmp_path):
    nodes = [N("Gemm", ["x", "fc.weight"], ["h"], transB=1), N("Relu", ["nowhere"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              [init("fc.weight", kaiming(4, 8))])
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert "ONNX checker" in one_error_line(cli("check", path))
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07not protobuf at all" * 50)
    assert "garbage.onnx" in one_error_line(cli("check", tmp_path / "garbage.onnx"))


@pytest.mark.parametrize("opset, dynamo", EXPORTS[1:])
def test_folded_zero_init_residual_is_a_recipe_a_zeroed_conv_is_not(opset, dynamo, tmp_path):
    """torchvision's zero_init_residual sets each block's last BatchNorm weight to 0; an exporter folds that
    BatchNorm into the conv before it, whose weights then are all 0. That conv ends a residual branch: info,
    as the zero norm weight is in PyTorch. A zeroed conv inside a block (no residual sum after it) is an error."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).eval()
    with torch.no_grad():
        model.layer2[0].conv1.weight.zero_()
    report = initaudit.audit(export_onnx(model, tmp_path / "resnet18.onnx", opset, dynamo, shape=(1, 3, 32, 32)))
    zero = {f.layer: f.severity for f in report.findings if f.rule == "zero-weights"}
    block_ends = {f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2)}
    assert {layer for layer, sev in zero.items() if sev == "info"} == block_ends
    assert {layer for layer, sev in zero.items() if sev == "error"} == {"layer2.0.conv1"}
    assert report.summary["errors"] == 1 and report.summary["warnings"] == 0


def test_a_table_read_at_indices_fixed_in_the_file_is_a_parameter_not_an_embedding(tmp_path):
    """LeViT's attention biases (and relative-position bias tables) are gathered at indices the file holds:
    a free parameter, zero-initialized by timm, as PyTorch sees it. A table gathered at the model's input
    ids is an embedding, whose all-zero weights stay a warning."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    levit = timm.create_model("levit_128s", num_classes=10)
    report = initaudit.audit(export_onnx(levit, tmp_path / "levit.onnx", shape=(1, 3, 224, 224)))
    biases = [f for f in report.findings if f.tensor.endswith("attention_biases")]
    assert biases and {(f.rule, f.severity) for f in biases} == {("zero-weights", "info")}
    assert report.summary["errors"] == report.summary["warnings"] == 0
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    graph = helper.make_graph([N("Gather", ["tok.weight", "ids"], ["e"], name="/tok/Gather"),
                               N("Gather", ["rel.table", "rel.index"], ["b"], name="/rel/Gather"),
                               N("MatMul", ["e", "b"], ["y"])], "g", [ids], [out],
                              [init("tok.weight", np.zeros((50, 4))), init("rel.table", np.zeros((7, 3))),
                               numpy_helper.from_array(np.array([0, 3, 6, 2], dtype=np.int64), "rel.index")])
    path = tmp_path / "tables.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    found = {(f.tensor, f.rule, f.severity) for f in initaudit.audit(path).findings}
    assert ("tok.weight", "zero-weights", "warning") in found
    assert ("rel.table", "zero-weights", "info") in found


@pytest.mark.parametrize("opset, dynamo", EXPORTS[1:])
def test_a_zeroed_shortcut_conv_with_a_folded_norm_stays_an_error(opset, dynamo, tmp_path):
    """A downsample conv also feeds the block's residual sum, but as its shortcut (the summand with fewer
    layers since the block's input), not as the branch a zero-init residual closes: all zeros there is a
    broken shortcut, an error as in PyTorch, while the zero-init block ends stay info."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).eval()
    with torch.no_grad():
        model.layer3[0].downsample[0].weight.zero_()
    assert {(f.layer, f.severity) for f in initaudit.audit(model).findings
            if f.rule == "zero-weights" and f.severity == "error"} == {("layer3.0.downsample.0", "error")}
    report = initaudit.audit(export_onnx(model, tmp_path / "resnet18.onnx", opset, dynamo, shape=(1, 3, 32, 32)))
    zero = {f.layer: f.severity for f in report.findings if f.rule == "zero-weights"}
    assert {layer for layer, sev in zero.items() if sev == "error"} == {"layer3.0.downsample.0"}
    assert {layer for layer, sev in zero.items() if sev == "info"} == \
        {f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2)}


def test_a_position_embedding_read_at_constant_position_ids_stays_an_embedding(tmp_path):
    """BERT's exports gather `position_embeddings` (an nn.Embedding) at the position_ids buffer, a constant
    of the file: it is still an embedding, its all-zero table a warning as in PyTorch."""
    rng = np.random.default_rng(0)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    graph = helper.make_graph([N("Gather", ["embeddings.word_embeddings.weight", "ids"], ["w"]),
                               N("Gather", ["embeddings.position_embeddings.weight", "position_ids"], ["p"]),
                               N("Add", ["w", "p"], ["y"])], "g", [ids], [out],
                              [init("embeddings.word_embeddings.weight", rng.normal(0, .02, (50, 4))),
                               init("embeddings.position_embeddings.weight", np.zeros((16, 4))),
                               numpy_helper.from_array(np.arange(4, dtype=np.int64)[None], "position_ids")])
    path = tmp_path / "bert_embeddings.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    found = {(f.tensor, f.rule, f.severity) for f in initaudit.audit(path).findings}
    assert ("embeddings.position_embeddings.weight", "zero-weights", "warning") in found


def test_legacy_scopes_of_nested_containers_give_the_module_names(tmp_path):
    """The legacy exporter names a folded conv by its scopes, a container's child as `<container>.<index>`
    (/features/features.1/conv/conv.0/conv.0.0/Conv): the layer is the module PyTorch names, not a path
    with the container's name repeated (features.1.conv.conv.0.conv.0.0)."""
    def unit(c):
        return nn.Sequential(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()),
                             nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = unit(4)

        def forward(self, x):
            return x + self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block())

        def forward(self, x):
            return self.features(x).mean((2, 3))

    torch.manual_seed(0)
    model = Net()
    report = initaudit.audit(export_onnx(model, tmp_path / "nested.onnx", shape=(1, 3, 8, 8)))
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {layer["name"] for layer in report.to_dict()["layers"]} == convs


def test_a_zero_init_residual_closed_through_squeeze_excite_is_a_recipe(tmp_path):
    """timm's SE-ResNet zero-inits each block's last BatchNorm (zero_init_last), and the block's squeeze-excite
    gate, computed from that conv's output, scales it before the residual sum: the exported conv, its norm
    folded in, still closes the block (info, as live), the gate's own convs do not make it a linear layer."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("seresnet18", num_classes=10, zero_init_last=True).eval()
    assert initaudit.audit(model).summary["errors"] == 0
    report = initaudit.audit(export_onnx(model, tmp_path / "seresnet18.onnx", shape=(1, 3, 32, 32)))
    zero = {f.layer: f.severity for f in report.findings if f.rule == "zero-weights"}
    assert zero == {f"layer{s}.{b}.conv2": "info" for s in range(1, 5) for b in range(2)}
    assert report.summary["errors"] == report.summary["warnings"] == 0
