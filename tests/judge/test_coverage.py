"""Nothing silently unaudited: every report counts the model's tensors, the audited ones, and names the others
with a reason (JSON `coverage`, a text line, CI formats); a model with nothing auditable exits 2."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET

import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import initaudit

from helpers.cli import one_stderr_line, run
from helpers.formats import export_onnx

BN_FACTORY = "judge.test_coverage:bn_mlp"


def bn_mlp() -> nn.Module:
    """Linear, BatchNorm1d (running_mean, running_var, num_batches_tracked), ReLU, Linear: 9 tensors, 6 weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def checkpoint_with_optimizer(path) -> int:
    """A training checkpoint of `bn_mlp` after one Adam step; returns how many tensors the optimizer state holds."""
    model = bn_mlp()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    torch.save({"state_dict": model.state_dict(), "optimizer": state, "epoch": 1}, path)
    return sum(isinstance(v, torch.Tensor) for per_param in state["state"].values() for v in per_param.values())


def check_json(*args) -> tuple[dict, int]:
    result = run("check", *args, "--format", "json")
    return json.loads(result.stdout), result.exit_code


def not_audited(coverage: dict) -> dict[str, int]:
    """reason -> how many tensors it leaves out."""
    return {entry["reason"]: entry["count"] for entry in coverage["not_audited"]}


def assert_accounted(coverage: dict) -> None:
    """Every tensor is audited or named with a reason."""
    assert coverage["audited"] + sum(e["count"] for e in coverage["not_audited"]) == coverage["tensors"]
    assert all(e["reason"] and ("tensor" in e or e["count"] > 1) for e in coverage["not_audited"])


def test_checkpoint_counts_buffers_and_optimizer_state(tmp_path):
    path = tmp_path / "train.ckpt"
    optimizer_tensors = checkpoint_with_optimizer(path)
    report, code = check_json(path)
    coverage = report["coverage"]
    assert code == 0
    assert (coverage["tensors"], coverage["audited"]) == (9 + optimizer_tensors, 6)
    assert not_audited(coverage) == {"normalization running statistics, not weights": 2,
                                     "a batch counter, not weights": 1,
                                     "an optimizer's state, taken as a sign of training, not audited": optimizer_tensors}
    (counter,) = [e for e in coverage["not_audited"] if e["count"] == 1]
    assert counter["tensor"] == "1.num_batches_tracked"
    assert_accounted(coverage)


def test_distributed_checkpoint_names_its_optimizer_state_unless_asked_to_audit_it(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    model = bn_mlp()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled…"
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"),
                 no_dist=True)
    held = sum(isinstance(v, torch.Tensor) for per_param in optimizer.state_dict()["state"].values()
               for v in per_param.values())
    plain, code = check_json(tmp_path / "ckpt")
    optimizer_left_out = {e["reason"]: e["count"] for e in plain["coverage"]["not_audited"] if e["kind"] == "optimizer tensor"}
    assert code == 0 and plain["coverage"]["audited"] == 6
    assert list(optimizer_left_out) == ["an optimizer's state, --optimizer-state audits it"]
    assert list(optimizer_left_out.values()) == [held]
    asked, _ = check_json(tmp_path / "ckpt", "--optimizer-state")
    assert asked["coverage"]["audited"] == 6 + held
    assert not any(e["kind"] == "optimizer tensor" for e in asked["coverage"]["not_audited"])


def test_safetensors_and_model_factory_count_the_same_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(bn_mlp().state_dict(), path)
    for report, code in (check_json(path), check_json("--model", BN_FACTORY)):
        coverage = report["coverage"]
        assert code == 0 and (coverage["tensors"], coverage["audited"]) == (9, 6)
        assert not_audited(coverage) == {"normalization running statistics, not weights": 2,
                                         "a batch counter, not weights": 1}


def test_onnx_counts_every_initializer(tmp_path):
    path = export_onnx(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), tmp_path / "mlp.onnx",
                       shape=(2, 16))
    report, code = check_json(path)
    assert code == 0
    assert report["coverage"] == {"tensors": 4, "audited": 4, "not_audited": []}


def test_text_formats_carry_the_coverage_line(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(bn_mlp().state_dict(), path)
    for fmt in ("concise", "full"):
        out = run("check", path, "--format", fmt).stdout
        line = next(line for line in out.splitlines() if "coverage:" in line)
        assert "6 of 9 tensors audited" in line and "1.num_batches_tracked (a batch counter, not weights)" in line


def test_several_models_each_have_their_coverage_and_the_summary_totals_them(tmp_path):
    torch.save(bn_mlp().state_dict(), tmp_path / "a.pt")
    torch.save(nn.Linear(4, 4).state_dict(), tmp_path / "b.pt")
    report, code = check_json(tmp_path / "a.pt", tmp_path / "b.pt")
    assert [f["coverage"]["audited"] for f in report["files"]] == [6, 2]
    assert (report["summary"]["tensors"], report["summary"]["audited"]) == (11, 8)


def integer_only(path) -> None:
    torch.save({"step": torch.tensor(3), "ids": torch.arange(10), "mask": torch.ones(4, dtype=torch.bool)}, path)


def test_nothing_auditable_is_exit_2_with_one_line(tmp_path):
    path = tmp_path / "ints.pt"
    integer_only(path)
    result = run("check", path, "--format", "json")
    assert result.exit_code == 2
    line = one_stderr_line(result)
    assert str(path) in line and "nothing audited" in line and "0 of 3 tensors audited" in line
    coverage = json.loads(result.stdout)["coverage"]
    assert coverage["audited"] == 0 and not_audited(coverage) == {"integer or bool values": 3}
    text = run("check", path, "--format", "concise")
    assert text.exit_code == 2 and "coverage: 0 of 3 tensors audited" in text.stdout


def test_nothing_auditable_fails_the_pytest_helper_and_the_api_exit_code(tmp_path):
    from initaudit.testing import assert_well_initialized

    path = tmp_path / "ints.pt"
    integer_only(path)
    with pytest.raises(AssertionError, match="nothing audited: coverage: 0 of 3 tensors audited"):
        assert_well_initialized(path)
    report = initaudit.audit(path)
    assert report.nothing_audited and report.exit_code() == 2 and report.findings == []


def test_nothing_auditable_is_an_error_in_ci_formats(tmp_path):
    path = tmp_path / "ints.pt"
    integer_only(path)
    sarif = json.loads(run("check", path, "--format", "sarif").stdout)
    invocation = sarif["runs"][0]["invocations"][0]
    assert not invocation["executionSuccessful"]
    assert "nothing audited" in invocation["toolExecutionNotifications"][0]["message"]["text"]
    junit = ET.fromstring(run("check", path, "--format", "junit").stdout)
    assert junit.get("errors") == "1" and junit.find("testsuite/testcase/error").get("type") == "coverage"
    github = run("check", path, "--format", "github").stdout
    assert github.startswith(f"::error file={path},title=initaudit::nothing audited")


def quantized_onnx(folder) -> tuple[object, set[str], str]:
    """An MLP exported to ONNX, then quantized by onnxruntime's quantize_dynamic (MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    plain = export_onnx(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), folder / "mlp.onnx",
                        shape=(1, 64))
    path = folder / "mlp_q.onnx"
    quantize_dynamic(str(plain), str(path), weight_type=QuantType.QInt8)
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    return path, {name for name in names if name.endswith("_quantized")}, "quantized (MatMulInteger): not audited yet"


def quantized_torch(folder) -> tuple[object, set[str], str]:
    """The state_dict of torch's dynamically quantized MLP: weights and biases packed in `_packed_params` tuples."""
    torch.manual_seed(0)
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                                                   {nn.Linear}, dtype=torch.qint8)
    path = folder / "quantized.pt"
    torch.save(model.state_dict(), path)
    weights = {f"{i}._packed_params._packed_params.{j}" for i in (0, 2) for j in (0, 1)}
    return path, weights, "packed in a quantized layer's parameters: not audited yet"


@pytest.mark.parametrize("make", [quantized_onnx, quantized_torch])
def test_a_quantized_model_is_never_a_clean_zero_layer_report(tmp_path, make):
    path, weights, reason = make(tmp_path)
    result = run("check", path, "--format", "json")
    report = json.loads(result.stdout)
    coverage = report["coverage"]
    assert_accounted(coverage)
    left_out = {name for e in coverage["not_audited"] for name in e.get("examples", [e.get("tensor")])}
    if not report["layers"]:  # its weights are not audited: named, with the reason, and no clean exit
        assert result.exit_code == 2 and "no layer audited" in one_stderr_line(result)
        assert {e["reason"] for e in coverage["not_audited"] if weights & set(e.get("examples", []))} == {reason}
        assert weights <= left_out
    else:  # its weights audited (dequantized): none of them left out
        assert not weights & left_out
