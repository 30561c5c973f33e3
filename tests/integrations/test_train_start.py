"""The plain call for custom loops, `audit_at_train_start`: findings logged one record each at their severity's
level, the config found from the working directory (or passed in), the JSON report written into the run folder
without replacing a file, and models whose parameters hold no values refused in one line."""

from __future__ import annotations

import json
import logging
import pickle
import socket

import pytest
import torch

from helpers.tiny_training import mlp
from initaudit.integrations.errors import InitAuditError, InitAuditFailed, NotMaterialized
from initaudit.integrations.train_start import audit_at_train_start
from initaudit.judge.report import Finding, Report


def test_each_finding_is_one_log_record_at_its_severity(caplog):
    caplog.set_level(logging.INFO, logger="initaudit")
    report = audit_at_train_start(mlp(zero_layer=True), fail_on="never")
    findings = [r for r in caplog.records if hasattr(r, "initaudit_finding")]
    assert len(findings) == len(report.findings) > 1
    levels = {(r.initaudit_finding["rule"], r.initaudit_finding["layer"]): r.levelno for r in findings}
    assert levels[("zero-weights", "2")] == logging.ERROR
    assert {levels[key] for key in levels if key[0] == "nonzero-bias"} == {logging.INFO}


def test_findings_at_fail_on_stop_the_run_with_them():
    with pytest.raises(InitAuditFailed) as raised:
        audit_at_train_start(mlp(zero_layer=True))
    assert [(f.rule, f.layer, f.severity) for f in raised.value.findings] == [("zero-weights", "2", "error")]
    assert raised.value.fail_on == "error"
    assert audit_at_train_start(mlp()).summary["errors"] == 0  # its twin starts well
    sent = pickle.loads(pickle.dumps(raised.value))  # as a spawning launcher sends it back from a rank
    assert (str(sent), sent.findings, sent.fail_on) == (str(raised.value), raised.value.findings, "error")


def test_the_config_is_found_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.initaudit]\nfail-on = "info"\n')
    (tmp_path / "train").mkdir()
    monkeypatch.chdir(tmp_path / "train")
    with pytest.raises(InitAuditFailed) as raised:  # the clean model's biases are info findings
        audit_at_train_start(mlp())
    assert raised.value.fail_on == "info" and {f.rule for f in raised.value.findings} == {"nonzero-bias"}
    assert audit_at_train_start(mlp(), fail_on="error") is not None  # the keyword wins over the file


def test_a_config_file_passed_in_is_used(tmp_path):
    config = tmp_path / "init.toml"
    config.write_text('ignore = ["zero-weights"]\n')
    report = audit_at_train_start(mlp(zero_layer=True), config=config)
    assert "zero-weights" not in {f.rule for f in report.findings}


def test_the_report_is_written_into_the_output_folder_beside_a_file_it_keeps(tmp_path):
    run = tmp_path / "runs" / "42"
    report = audit_at_train_start(mlp(), output_dir=run)
    first = json.loads((run / "initaudit.json").read_text())
    assert first["summary"] == report.summary and first["tool"] == "initaudit"
    (run / "initaudit.json").write_text("the user's notes\n")
    audit_at_train_start(mlp(), output_dir=run)
    assert (run / "initaudit.json").read_text() == "the user's notes\n"
    assert json.loads((run / "initaudit-2.json").read_text())["summary"] == report.summary
    assert not any(p.name.endswith(".initaudit-tmp") for p in run.iterdir())


def one_clear_line(raised: pytest.ExceptionInfo) -> str:
    text = str(raised.value)
    assert "\n" not in text and "nothing" not in text, text
    return text


def test_meta_parameters_are_refused_in_one_line():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(NotMaterialized) as raised:
        audit_at_train_start(model)
    text = one_clear_line(raised)
    assert "meta device" in text and "'0.weight'" in text and "to_empty" in text


def zero3_like(model: torch.nn.Module) -> torch.nn.Module:
    """What DeepSpeed ZeRO-3 leaves outside a gather: each parameter an empty placeholder tagged ds_id/ds_status."""
    for i, p in enumerate(model.parameters()):
        p.data = torch.empty(0)
        p.ds_id, p.ds_status = i, "NOT_AVAILABLE"
    return model


def test_zero3_placeholders_are_refused_in_one_line_and_gathered_ones_audited():
    with pytest.raises(NotMaterialized) as raised:
        audit_at_train_start(zero3_like(mlp()))
    text = one_clear_line(raised)
    assert "ZeRO-3" in text and "6 of its tensors" in text and "GatheredParameters" in text
    gathered = mlp(zero_layer=True)
    for i, p in enumerate(gathered.parameters()):  # inside GatheredParameters: tagged, but holding values
        p.ds_id, p.ds_status = i, "AVAILABLE"
    with pytest.raises(InitAuditFailed):
        audit_at_train_start(gathered)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    """A torch.distributed group of one process (gloo on 127.0.0.1), destroyed after the test."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")  # FSDP1 on one rank says it does not shard
def test_fsdp1_flat_parameters_are_refused_in_one_line(one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    flat = FullyShardedDataParallel(mlp(), device_id=torch.device("cpu"), use_orig_params=False)
    with pytest.raises(NotMaterialized) as raised:
        audit_at_train_start(flat)
    text = one_clear_line(raised)
    assert "FSDP1 flat parameters" in text and "_flat_param" in text and "summon_full_params" in text
    with FullyShardedDataParallel.summon_full_params(flat):  # what the refusal advises: audited, and judged
        with pytest.raises(InitAuditFailed):
            audit_at_train_start(flat, fail_on="info")


def test_dtensor_parameters_go_to_the_sharded_audit(one_rank_group, monkeypatch):
    """A model holding DTensors is handed, with the options, to initaudit.distributed.live.audit_sharded, whose
    rank-0 report decides the verdict."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from initaudit.distributed import live

    model = mlp()
    mesh = init_device_mesh("cpu", (1,))
    model[2].weight = torch.nn.Parameter(distribute_tensor(model[2].weight.detach(), mesh, [Shard(0)]))
    calls = []
    zero = Finding("zero-weights", "IA101", "error", "2", "2.weight", "2: all weights are zero")

    def sharded(module, options):
        calls.append((module, options.ignore))
        return Report(model="sharded", format="torch-module", findings=[zero])

    monkeypatch.setattr(live, "audit_sharded", sharded)
    with pytest.raises(InitAuditFailed) as raised:
        audit_at_train_start(model, ignore=["nonzero-bias"])
    assert calls == [(model, ["nonzero-bias"])] and raised.value.findings == [zero]


def test_an_unusable_keyword_stops_the_run_with_one_line():
    with pytest.raises(InitAuditError) as raised:
        audit_at_train_start(mlp(), fail_on="errors")
    assert "fail_on must be one of" in one_clear_line(raised)


def test_ddp_and_compiled_wrappers_are_audited_inside_under_the_users_names(one_rank_group):
    wrapped = torch.nn.parallel.DistributedDataParallel(torch.compile(mlp(zero_layer=True)))
    with pytest.raises(InitAuditFailed) as raised:
        audit_at_train_start(wrapped)
    assert [(f.layer, f.tensor) for f in raised.value.findings] == [("2", "2.weight")]
