"""ONNX control flow: layers inside If branches and Loop/Scan bodies are audited, named and fixed like any other."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import initaudit
from helpers.formats import save_as
from helpers.verdicts import serious

N = helper.make_node
RNG = np.random.default_rng(7)
ort = pytest.importorskip("onnxruntime")


def tensor(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def kaiming(out: int, fan_in: int) -> np.ndarray:
    return RNG.normal(0, np.sqrt(2 / fan_in), (out, fan_in))


def xavier(out: int, fan_in: int) -> np.ndarray:
    return RNG.normal(0, np.sqrt(2 / (fan_in + out)) * 5 / 3, (out, fan_in))


def value(name: str, shape=("batch", "features")) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def save(path, nodes, inits=(), inputs=(("x", [2, 8]),), opset=17):
    graph = helper.make_graph(nodes, "main", [value(n, s) for n, s in inputs], [value("y")], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run(path, **feeds) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()})[0]


# ---------------------------------------------------------------- If

def if_model(tmp_path, weights=None, name="if.onnx"):
    """x → If(sum(x) > 0) → Relu → head (Gemm) → y.

    then: Gemm then.fc1 (transB) → Relu → MatMul then.fc2 ([in, out]) → branch output (the Relu after the If follows)
    else: Gemm else.fc1 (transB) → Tanh → MatMul else.fc2 ([in, out]) → Tanh → branch output
    The branch weights are the branches' own initializers; head.weight lives in the main graph.
    """
    w = {"then.fc1.weight": kaiming(16, 8), "then.fc2.weight": kaiming(12, 16).T,
         "else.fc1.weight": xavier(16, 8), "else.fc2.weight": xavier(12, 16).T, "head.weight": xavier(4, 12)}
    w.update(weights or {})
    then = helper.make_graph(
        [N("Gemm", ["x", "then.fc1.weight"], ["t1"], transB=1), N("Relu", ["t1"], ["t2"]),
         N("MatMul", ["t2", "then.fc2.weight"], ["t_out"])],
        "then", [], [value("t_out")], [tensor(k, w[k]) for k in ("then.fc1.weight", "then.fc2.weight")])
    other = helper.make_graph(
        [N("Gemm", ["x", "else.fc1.weight"], ["e1"], transB=1), N("Tanh", ["e1"], ["e2"]),
         N("MatMul", ["e2", "else.fc2.weight"], ["e3"]), N("Tanh", ["e3"], ["e_out"])],
        "else", [], [value("e_out")], [tensor(k, w[k]) for k in ("else.fc1.weight", "else.fc2.weight")])
    nodes = [N("ReduceSum", ["x"], ["s"], keepdims=0), N("Greater", ["s", "zero"], ["c"]),
             N("If", ["c"], ["b"], then_branch=then, else_branch=other), N("Relu", ["b"], ["r"]),
             N("Gemm", ["r", "head.weight"], ["y"], transB=1)]
    return save(tmp_path / name, nodes, [tensor("zero", 0.0), tensor("head.weight", w["head.weight"])])


def rows(report) -> dict[str, tuple]:
    return {r.name: (r.kind, r.fan_in, r.fan_out, r.activation) for r in report.layers}


def test_if_branches_are_audited_with_their_activations(tmp_path):
    path = if_model(tmp_path)
    report = initaudit.audit(path)
    assert rows(report) == {
        "then.fc1": ("linear", 8, 16, "relu"),
        "then.fc2": ("linear", 16, 12, "relu"),   # [in, out] MatMul; its Relu comes after the If, in the main graph
        "else.fc1": ("linear", 8, 16, "tanh"),
        "else.fc2": ("linear", 16, 12, "tanh"),   # its Tanh is inside the branch
        "head": ("linear", 12, 4, "identity"),
    }
    assert [r.name for r in report.layers] == ["then.fc1", "then.fc2", "else.fc1", "else.fc2", "head"]
    # 128 and 192 normal values know the std to ±6 %: a near-tie that names Kaiming is all they can tell
    assert all("kaiming-normal" in r.scheme.split("|") for r in report.layers if r.name.startswith("then."))
    assert serious(report) == set()


def test_nan_in_a_branch_weight_is_found(tmp_path, cli):
    w = xavier(16, 8)
    w[3, 5] = np.nan
    path = if_model(tmp_path, {"else.fc1.weight": w})
    result = cli("check", path, "--format", "json")
    assert result.exit_code == 1, result.output
    report = initaudit.audit(path)
    assert ("else.fc1", "else.fc1.weight") in {(f.layer, f.tensor) for f in report.findings if f.severity == "error"}
    assert all(f.layer == "else.fc1" for f in report.findings if f.severity == "error")


def test_outer_names_resolve_and_shadowing_names_do_not(tmp_path):
    """A branch uses the main graph's weight by name; a sibling branch's own initializer of the same name is its own."""
    shared = kaiming(16, 8)

    def branch(name: str, inits):
        return helper.make_graph([N("Gemm", ["x", "fc.weight"], [f"{name}_h"], transB=1), N("Relu", [f"{name}_h"], [f"{name}_o"])],
                                 name, [], [value(f"{name}_o")], inits)

    then = branch("then", [])                                    # the main graph's fc.weight
    other = branch("else", [tensor("fc.weight", np.zeros((16, 8)))])  # its own, all zero, shadowing it
    nodes = [N("ReduceSum", ["x"], ["s"], keepdims=0), N("Greater", ["s", "zero"], ["c"]),
             N("If", ["c"], ["b"], then_branch=then, else_branch=other), N("Gemm", ["b", "head.weight"], ["y"], transB=1)]
    path = save(tmp_path / "shadow.onnx", nodes, [tensor("zero", 0.0), tensor("fc.weight", shared),
                                                   tensor("head.weight", xavier(4, 16))])
    report = initaudit.audit(path)
    assert rows(report) == {"fc": ("linear", 8, 16, "relu"), "fc#2": ("linear", 8, 16, "relu"),
                            "head": ("linear", 16, 4, "identity")}
    assert {(f.rule, f.layer) for f in report.findings if f.severity == "error"} == {("zero-weights", "fc#2")}


def test_fix_redraws_a_zeroed_branch_weight_in_place_and_the_model_runs(tmp_path, cli):
    path = if_model(tmp_path, {"then.fc2.weight": np.zeros((16, 12))})
    x = RNG.normal(size=(2, 8)).astype(np.float32)
    x = np.abs(x)  # sum > 0: the then branch runs
    assert np.ptp(run(path, x=x), axis=0).max() < 1e-6  # the zero layer makes the output constant
    out = tmp_path / "fixed.onnx"
    result = cli("fix", path, "-o", out, "--seed", 2)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))
    before, after = (_branch_tensors(onnx.load(str(p))) for p in (path, out))
    assert [k for k in before if not np.array_equal(before[k], after[k])] == ["then.fc2.weight"]
    fixed = after["then.fc2.weight"]
    assert fixed.shape == (16, 12) and fixed.std() == pytest.approx(np.sqrt(2 / 16), rel=0.25)  # Kaiming, fan_in 16
    assert serious(initaudit.audit(out)) == set()
    y = run(out, x=x)
    assert np.isfinite(y).all() and np.ptp(y, axis=0).max() > 1e-3


def test_branch_weights_in_external_data_are_checked_read_and_rewritten(tmp_path, cli):
    model = onnx.load(str(if_model(tmp_path, {"then.fc2.weight": np.zeros((16, 12))})))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    assert ("zero-weights", "then.fc2", "error") in serious(initaudit.audit(folder / "m.onnx"))
    result = cli("fix", folder / "m.onnx", "-o", tmp_path / "fixed.onnx", "--seed", 1)
    assert result.exit_code == 0, result.output
    fixed = onnx.load(str(tmp_path / "fixed.onnx"))  # loads every tensor, the branches' included, from the new data file
    assert _branch_tensors(fixed)["then.fc2.weight"].std() > 0.1
    assert serious(initaudit.audit(tmp_path / "fixed.onnx")) == set()
    assert np.isfinite(run(tmp_path / "fixed.onnx", x=np.abs(RNG.normal(size=(2, 8))))).all()
    # cut the data file right after the last main-graph tensor: only branch weights lose their bytes
    saved = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    end = max(int(e["offset"]) + int(e["length"]) for e in
              ({x.key: x.value for x in t.external_data} for t in saved.graph.initializer))
    assert end < (folder / "m.data").stat().st_size
    (folder / "m.data").write_bytes((folder / "m.data").read_bytes()[:end])
    result = cli("check", folder / "m.onnx")
    assert result.exit_code == 2 and "shorter than" in result.output and "then." in result.output


def _branch_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer of the main graph and of the If's branches, by name."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found.update((t.name, numpy_helper.to_array(t)) for t in a.g.initializer)
    return found


# ---------------------------------------------------------------- Loop and Scan

def test_loop_body_weight_is_audited_and_its_zero_found(tmp_path):
    """h ← tanh(W·h) three times; W is the body's initializer, h carried from iteration to iteration."""
    def model(w, name):
        body = helper.make_graph(
            [N("Identity", ["cond_in"], ["cond_out"]), N("Gemm", ["h_in", "cell.weight"], ["g"], transB=1),
             N("Tanh", ["g"], ["h_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), value("h_in")],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), value("h_out")], [tensor("cell.weight", w)])
        nodes = [N("Gemm", ["x", "proj.weight"], ["p"], transB=1),
                 N("Loop", ["trips", "", "p"], ["h"], body=body), N("Gemm", ["h", "head.weight"], ["y"], transB=1)]
        inits = [tensor("proj.weight", xavier(16, 8)), tensor("head.weight", xavier(4, 16)),
                 numpy_helper.from_array(np.array(3, dtype=np.int64), "trips")]
        return save(tmp_path / name, nodes, inits)

    good = model(xavier(16, 16), "loop.onnx")
    report = initaudit.audit(good)
    assert rows(report) == {"proj": ("linear", 8, 16, "identity"),  # it feeds the cell directly
                            "cell": ("linear", 16, 16, "tanh"), "head": ("linear", 16, 4, "identity")}
    assert serious(report) == set()
    assert np.isfinite(run(good, x=RNG.normal(size=(2, 8)))).all()
    bad = initaudit.audit(model(np.zeros((16, 16)), "zero.onnx"))
    assert {(f.rule, f.layer) for f in bad.findings if f.severity == "error"} == {("zero-weights", "cell")}


def test_scan_body_weights_are_audited(tmp_path):
    """An Elman RNN as a Scan: h_t = tanh(x_t·U + h·W); U and W are [in, out] MatMul weights of the body."""
    body = helper.make_graph(
        [N("MatMul", ["x_t", "rnn.U.weight"], ["a"]), N("MatMul", ["h", "rnn.W.weight"], ["b"]), N("Add", ["a", "b"], ["s"]),
         N("Tanh", ["s"], ["h_next"]), N("Identity", ["h_next"], ["y_t"])],
        "body", [value("h", [2, 16]), value("x_t", [2, 8])], [value("h_next", [2, 16]), value("y_t", [2, 16])],
        [tensor("rnn.U.weight", xavier(16, 8).T), tensor("rnn.W.weight", xavier(16, 16).T)])
    nodes = [N("Scan", ["h0", "x"], ["h_last", "ys"], body=body, num_scan_inputs=1, scan_input_axes=[0]),
             N("Gemm", ["h_last", "head.weight"], ["y"], transB=1)]
    path = save(tmp_path / "scan.onnx", nodes, [tensor("h0", np.zeros((2, 16))), tensor("head.weight", xavier(4, 16))],
                inputs=(("x", [5, 2, 8]),))
    report = initaudit.audit(path)
    assert {k: v for k, v in rows(report).items() if k.startswith("rnn")} == {
        "rnn.U": ("linear", 8, 16, "tanh"), "rnn.W": ("linear", 16, 16, "tanh")}
    assert serious(report) == set()
    assert run(path, x=RNG.normal(size=(5, 2, 8))).shape == (2, 4)


def test_a_graph_attribute_of_an_unknown_op_is_audited_and_where_its_outputs_go_is_unknown(tmp_path):
    body = helper.make_graph([N("Gemm", ["row", "inner.weight"], ["g"], transB=1), N("Gemm", ["g", "gate.weight"], ["q"], transB=1),
                              N("Tanh", ["q"], ["row_out"]), N("Gemm", ["row", "side.weight"], ["side_out"], transB=1)],
                             "body", [value("row")], [value("row_out"), value("side_out")],
                             [tensor("inner.weight", xavier(8, 8)), tensor("gate.weight", xavier(8, 8)),
                              tensor("side.weight", xavier(8, 8))])
    nodes = [N("MapRows", ["x"], ["m", "side"], domain="com.example", body=body), N("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "main", [value("x")], [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "custom.onnx"))
    assert rows(initaudit.audit(tmp_path / "custom.onnx")) == {
        "inner": ("linear", 8, 8, "identity"),  # another layer follows it inside the body
        "gate": ("linear", 8, 8, "tanh"),       # its activation is inside the body
        "side": ("linear", 8, 8, "unknown"),    # what the op does with its outputs cannot be told
    }


# ---------------------------------------------------------------- Constant-node weights

def constant_model(path, const: onnx.NodeProto, else_weight: str = "w2"):
    """x → If(sum(x) > 0) → head → y; the then branch's layer takes its weight from a Constant node."""
    then = helper.make_graph([const, N("Gemm", ["x", const.output[0]], ["t"], transB=1), N("Relu", ["t"], ["t_out"])],
                             "then", [], [value("t_out")])
    other = helper.make_graph([N("Neg", ["x"], ["n"]), N("Gemm", ["n", else_weight], ["e"], transB=1),
                               N("Relu", ["e"], ["e_out"])], "else", [], [value("e_out")],
                              [tensor(else_weight, kaiming(16, 8))])
    nodes = [N("ReduceSum", ["x"], ["s"], keepdims=0), N("Greater", ["s", "zero"], ["c"]),
             N("If", ["c"], ["b"], then_branch=then, else_branch=other), N("Gemm", ["b", "head.weight"], ["y"], transB=1)]
    return save(path, nodes, [tensor("zero", 0.0), tensor("head.weight", xavier(4, 16))])


@pytest.mark.parametrize("node_name, output, layer", [
    ("", "encoder.proj.weight", "encoder.proj"),              # named by its output
    ("classifier.weight", "onnx::Constant_7", "classifier"),  # the output name is the exporter's: named by its node
])
def test_constant_node_weights_are_named_as_netron_shows_them(node_name, output, layer, tmp_path):
    const = N("Constant", [], [output], name=node_name, value=tensor("c", np.zeros((16, 8))))
    report = initaudit.audit(constant_model(tmp_path / "const.onnx", const))
    assert rows(report)[layer] == ("linear", 8, 16, "relu")
    assert {(f.rule, f.layer, f.tensor) for f in report.findings if f.severity == "error"} == \
           {("zero-weights", layer, f"{layer}.weight")}


def test_a_constant_free_parameter_in_a_branch_keeps_its_name(tmp_path):
    table = RNG.normal(0, 0.02, (2, 8))
    table[1, 3] = np.nan
    then = helper.make_graph([N("Constant", [], ["pos_table"], value=tensor("c", table)), N("Add", ["x", "pos_table"], ["t"])],
                             "then", [], [value("t")])
    other = helper.make_graph([N("Neg", ["x"], ["e"])], "else", [], [value("e")])
    nodes = [N("ReduceSum", ["x"], ["s"], keepdims=0), N("Greater", ["s", "zero"], ["c"]),
             N("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    report = initaudit.audit(save(tmp_path / "table.onnx", nodes, [tensor("zero", 0.0)]))
    assert {(f.rule, f.tensor) for f in report.findings if f.severity == "error"} == {("non-finite", "pos_table")}


def test_fix_writes_a_constant_node_weight_back_into_its_node(tmp_path, cli):
    """The then branch's Constant and the else branch's initializer share a name: each keeps its own tensor."""
    const = N("Constant", [], ["fc.weight"], value=tensor("c", np.zeros((16, 8))))
    path = constant_model(tmp_path / "const.onnx", const, else_weight="fc.weight")
    assert {(f.rule, f.layer) for f in initaudit.audit(path).findings if f.severity == "error"} == {("zero-weights", "fc")}
    out = tmp_path / "fixed.onnx"
    result = cli("fix", path, "-o", out, "--seed", 0)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out))
    (before, after) = ({a.name: a.g for a in onnx.load(str(p)).graph.node[2].attribute} for p in (path, out))
    written = numpy_helper.to_array(after["then_branch"].node[0].attribute[0].t)
    assert written.shape == (16, 8) and written.std() == pytest.approx(np.sqrt(2 / 8), rel=0.3)
    assert np.array_equal(numpy_helper.to_array(after["else_branch"].initializer[0]),
                          numpy_helper.to_array(before["else_branch"].initializer[0]))
    assert serious(initaudit.audit(out)) == set()
    assert np.ptp(run(out, x=np.abs(RNG.normal(size=(2, 8)))), axis=0).max() > 1e-3


# ---------------------------------------------------------------- parity with PyTorch's own control flow

def _zero_biases(*layers: torch.nn.Linear) -> None:
    for layer in layers:
        torch.nn.init.zeros_(layer.bias)


class Branchy(torch.nn.Module):
    """Data-dependent control flow (an If in ONNX): only one branch runs, both hold weights."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        _zero_biases(self.a, self.b, self.head)
        torch.nn.init.kaiming_normal_(self.a.weight, nonlinearity="relu")
        torch.nn.init.xavier_normal_(self.b.weight, gain=torch.nn.init.calculate_gain("tanh"))
        torch.nn.init.xavier_normal_(self.head.weight)

    def forward(self, x):
        if bool(x.sum() > 0):
            h = torch.relu(self.a(x))
        else:
            h = torch.tanh(self.b(x))
        return self.head(h)


class Cond(Branchy):
    """The same as torch.cond, which the dynamo exporter turns into an If."""

    def forward(self, x):
        return self.head(torch.cond(x.sum() > 0, lambda x: torch.relu(self.a(x)), lambda x: torch.tanh(self.b(x)), (x,)))


class Looped(torch.nn.Module):
    """A loop of data-dependent length over one shared cell (a Loop in ONNX)."""

    def __init__(self):
        super().__init__()
        self.inp, self.cell, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        _zero_biases(self.inp, self.cell, self.head)
        torch.nn.init.xavier_normal_(self.inp.weight)
        torch.nn.init.xavier_normal_(self.cell.weight, gain=torch.nn.init.calculate_gain("tanh"))
        torch.nn.init.xavier_normal_(self.head.weight)

    def forward(self, x, n: int = 3):
        h = self.inp(x)
        for _ in range(n):
            h = torch.tanh(self.cell(h))
        return self.head(h)


def exports(module: torch.nn.Module, folder) -> list:
    """The module as ONNX: the legacy exporter on the scripted module, and (for an If) the dynamo one via torch.cond."""
    x = torch.randn(2, 8)
    jobs = [(torch.jit.script(module), (x, 3) if isinstance(module, Looped) else (x,), 17, False)]
    if isinstance(module, Branchy):
        cond = Cond()
        cond.load_state_dict(module.state_dict())
        jobs.append((cond, (x,), 18, True))
    paths = []
    for k, (exported, args, opset, dynamo) in enumerate(jobs):
        paths.append(folder / f"export{k}.onnx")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(exported, args, str(paths[-1]), opset_version=opset, dynamo=dynamo)
    return paths


@pytest.mark.parametrize("planted", ["none", "zero", "nan", "duplicate"])
@pytest.mark.parametrize("make, inner", [(Branchy, "b"), (Looped, "cell")], ids=["if", "loop"])
def test_control_flow_export_gives_the_torchscript_verdict(make, inner, planted, tmp_path):
    torch.manual_seed(0)
    module = make()
    weight = getattr(module, inner).weight
    with torch.no_grad():
        if planted == "zero":
            weight.zero_()
        elif planted == "nan":
            weight[2, 3] = float("nan")
        elif planted == "duplicate":
            weight[5] = weight[1]
    scripted, _ = save_as(module, "torchscript", tmp_path)
    expected = initaudit.audit(scripted)
    assert rows(expected)[inner][3] == "tanh"
    findings = {(f.rule, f.layer, f.severity) for f in expected.findings}
    for path in exports(module, tmp_path):
        report = initaudit.audit(path)
        assert report.format == "onnx"
        assert rows(report) == rows(expected)
        assert [r.name for r in report.layers] == [r.name for r in expected.layers]
        assert {(f.rule, f.layer, f.severity) for f in report.findings} == findings
    # the health verdicts hold for the bare files, which know no activations
    for fmt in ("state_dict", "safetensors"):
        path, _ = save_as(module, fmt, tmp_path)
        assert serious(initaudit.audit(path, activation="tanh")) == serious(expected)
    assert {layer for _, layer, _ in serious(expected)} == (set() if planted == "none" else {inner})
