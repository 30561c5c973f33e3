"""The command line as CI jobs use it: exit codes, JSON contract, config, clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

import initaudit
from fixtures import models
from helpers import FIXTURES
from helpers.cli import one_error_line
from helpers.formats import export_onnx, save_as



def test_clean_model_exits_0(cli):
    result = cli("check", FIXTURES / "deep_relu_mlp_kaiming.pt", "--activation", "relu")
    assert result.exit_code == 0, result.output
    assert "0 errors, 0 warnings" in result.output


def test_error_exits_1_and_names_layer(cli):
    result = cli("check", FIXTURES / "zero_layer_mlp.pt", "--activation", "relu")
    assert result.exit_code == 1
    assert "zero-weights" in result.output and "IA101" in result.output


def test_fail_on_controls_warnings(cli):
    path = FIXTURES / "duplicate_filters_cnn.pt"  # one duplicate-units warning
    assert cli("check", path, "--activation", "relu").exit_code == 0
    assert cli("check", path, "--activation", "relu", "--fail-on", "warning").exit_code == 1
    assert cli("check", FIXTURES / "zero_layer_mlp.pt", "--fail-on", "never").exit_code == 0


def test_json_contract(cli):
    result = cli("check", FIXTURES / "deep_relu_mlp_xavier.pt", "--activation", "relu", "--format", "json")
    data = json.loads(result.output)
    assert set(data) >= {"tool", "version", "model", "format", "layers", "findings", "summary"}
    assert data["tool"] == "initaudit" and data["format"] == "torch-state-dict"
    layer = data["layers"][0]
    assert set(layer) >= {"name", "kind", "fan_in", "fan_out", "activation", "std", "expected_std", "scheme"}
    assert (layer["name"], layer["kind"], layer["fan_in"], layer["fan_out"]) == ("0", "linear", 64, 128)
    finding = data["findings"][0]
    assert set(finding) >= {"rule", "code", "severity", "layer", "tensor", "message", "expected", "actual", "fix"}
    assert finding["rule"] == "init-activation-mismatch" and finding["actual"] == "xavier-normal"
    assert finding["expected"] == "kaiming-normal" and "kaiming_normal_" in finding["fix"]
    assert data["summary"] == {"layers": 12, "errors": 11, "warnings": 0, "infos": 0}


def test_select_and_ignore(cli):
    path = FIXTURES / "zero_layer_mlp.pt"
    assert cli("check", path, "--ignore", "zero-weights").exit_code == 0
    assert cli("check", path, "--select", "IA2").exit_code == 0
    assert cli("check", path, "--select", "IA101").exit_code == 1


def test_pyproject_config_and_per_layer_ignores(cli, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.initaudit]\nactivation = "relu"\nfail-on = "warning"\n'
        '[tool.initaudit.per-layer-ignores]\n"4" = ["zero-weights"]\n')
    monkeypatch.chdir(tmp_path)
    assert cli("check", FIXTURES / "zero_layer_mlp.pt").exit_code == 0
    result = cli("check", FIXTURES / "deep_relu_mlp_xavier.pt")  # activation and fail-on from config
    assert result.exit_code == 1 and "init-activation-mismatch" in result.output


def test_bad_inputs_exit_2_with_one_line(cli, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert "not a readable PyTorch checkpoint" in one_error_line(cli("check", garbage))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((FIXTURES / "resnet_kaiming.pt").read_bytes()[:5000])
    assert "not a readable PyTorch checkpoint" in one_error_line(cli("check", truncated))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    assert "safetensors" in one_error_line(cli("check", bad_st))
    assert "no such file" in one_error_line(cli("check", tmp_path / "missing.pt"))
    assert "unknown activation" in one_error_line(cli("check", FIXTURES / "resnet_kaiming.pt", "--activation", "relu7"))
    assert "unknown rule" in one_error_line(cli("check", FIXTURES / "resnet_kaiming.pt", "--ignore", "nope"))
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nostate.pt")
    assert "no state_dict" in one_error_line(cli("check", tmp_path / "nostate.pt"))
    (tmp_path / "pyproject.toml").write_text("[tool.initaudit]\ncolour = 1\n")
    assert "unknown [tool.initaudit] key" in one_error_line(
        cli("check", FIXTURES / "resnet_kaiming.pt", "--config", tmp_path / "pyproject.toml"))


def test_pickled_module_is_refused_without_trust(cli, tmp_path):
    path, _ = save_as(models.zero_layer(), "pickled_module", tmp_path)
    before = path.read_bytes()
    line = one_error_line(cli("check", path))
    assert "--trust-pickle" in line and "torch.nn.modules.container.Sequential" in line
    assert cli("check", path, "--trust-pickle").exit_code == 1  # now loaded: the zero layer is an error
    assert path.read_bytes() == before


def test_model_factory_errors_are_clear(cli):
    assert "package.module:factory" in one_error_line(cli("check", "--model", "nocolon"))
    assert "No module named" in one_error_line(cli("check", "--model", "no_such_pkg.x:f"))
    line = one_error_line(cli("check", FIXTURES / "resnet_kaiming.pt", "--model", "fixtures.models:mlp_factory_for_tests"))
    assert "do not fit" in line


def test_rules_and_explain(cli):
    listing = cli("rules").output
    assert "IA101" in listing and "zero-weights" in listing and "variance-out-of-range" in listing
    text = cli("explain", "init-activation-mismatch").output
    assert "Why is this bad?" in text and "Kaiming" in text
    assert cli("explain", "IA101").exit_code == 0
    assert cli("explain", "nope").exit_code == 2


def test_fixture_script_reproduces_shipped_files(tmp_path):
    from fixtures import make_fixtures

    make_fixtures.main(tmp_path)
    for name in make_fixtures.SHIPPED:
        shipped = torch.load(FIXTURES / name, weights_only=True)
        fresh = torch.load(tmp_path / name, weights_only=True)
        assert shipped.keys() == fresh.keys()
        assert all(torch.equal(shipped[k], fresh[k]) for k in shipped), name


@pytest.mark.parametrize("fmt", ["state_dict", "checkpoint", "safetensors", "torchscript", "onnx"])
def test_truncated_and_corrupted_files_never_traceback(cli, tmp_path, fmt):
    """Every prefix of a real file is an input error; flipped bytes are an error or a verdict, never a crash."""
    path, _ = save_as(models.deep_cnn_kaiming(), fmt, tmp_path)
    data = path.read_bytes()
    bad = tmp_path / f"bad{path.suffix}"
    for frac in (0.0, 0.001, 0.05, 0.3, 0.6, 0.9, 0.999):
        bad.write_bytes(data[:int(len(data) * frac)])
        assert str(bad) in one_error_line(cli("check", bad))
    rng = random.Random(0)
    for pos in (0.2, 0.5, 0.8):
        corrupt = bytearray(data)
        start = int(len(corrupt) * pos)
        corrupt[start:start + 64] = bytes(rng.randrange(256) for _ in range(64))
        bad.write_bytes(bytes(corrupt))
        result = cli("check", bad)
        assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output
        assert "internal error" not in result.output


def test_files_are_read_by_content_not_suffix(tmp_path):

    module = models.zero_layer()
    expected = {(f.rule, f.layer) for f in initaudit.audit(module).findings}
    for fmt, wrong_name in (("state_dict", "weights.onnx"), ("safetensors", "weights.bin"), ("onnx", "weights.pt")):
        path = export_onnx(module, tmp_path / "m.onnx") if fmt == "onnx" else save_as(module, fmt, tmp_path)[0]
        misnamed = path.rename(tmp_path / wrong_name)
        report = initaudit.audit(misnamed, activation="relu")
        assert {(f.rule, f.layer) for f in report.findings} == expected, fmt


def test_the_report_never_overwrites_the_model(cli, tmp_path):
    path, _ = save_as(models.zero_layer(), "state_dict", tmp_path)
    before = path.read_bytes()
    assert "MODEL itself" in one_error_line(cli("check", path, "--format", "json", "-o", path))
    assert path.read_bytes() == before
    assert cli("check", path, "--format", "json", "-o", tmp_path / "r.json").exit_code == 1
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "torch-state-dict"


def test_safetensors_header_length_with_a_pickle_like_first_byte(tmp_path):
    from safetensors.torch import save_file

    from initaudit.load.paths import sniff

    for pad in range(300):  # find a header whose length's low byte is 0x80 (as torchvision's googlenet has)
        path = tmp_path / "m.safetensors"
        save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and sniff(path) == "safetensors"
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"w": torch.zeros(2, 2)}, torch_file)  # a torch file under a safetensors name
    assert sniff(torch_file) == "torch" and initaudit.audit(torch_file).format == "torch-state-dict"
