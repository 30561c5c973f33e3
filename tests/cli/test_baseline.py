"""Baselines: `check --write-baseline FILE` records today's findings, `--baseline FILE` (or the config's `baseline`)
fails only on findings it does not record; entries are matched by rule, model path relative to the file, layer
and tensor, so retrained values and a move of the model with its baseline keep them; fixed ones are a note."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures import models
from helpers.cli import one_stderr_line, run


def _save(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _constant(value: float, seed: int = 0) -> torch.nn.Module:
    """The Kaiming ReLU MLP (its draws seeded by `seed`) with its second layer's weights all `value`."""
    model = models.deep_relu_kaiming()
    torch.manual_seed(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    with torch.no_grad():
        model[2].weight.fill_(value)
    return model


def _json(*args) -> tuple[int, dict]:
    result = run("check", *args, "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def _rules(findings: list[dict]) -> set[tuple[str, str]]:
    return {(f["rule"], f["tensor"]) for f in findings}


def test_a_written_baseline_lets_today_s_findings_pass_and_lists_them(tmp_path):
    model = _save(_constant(1.0), tmp_path / "models" / "m.pt")
    base = tmp_path / "base.json"
    assert run("check", model).exit_code == 1
    written = run("check", model, "--write-baseline", base)
    assert written.exit_code == 0, written.output
    saved = json.loads(base.read_text())
    assert saved["version"] == 1
    assert {(e["model"], e["rule"], e["tensor"]) for e in saved["findings"]} == {("models/m.pt", "constant-weights",
                                                                                   "2.weight")}
    code, report = _json(model, "--baseline", base)
    assert code == 0 and report["findings"] == []
    assert _rules(report["baselined"]) == {("constant-weights", "2.weight")}
    assert report["summary"]["baselined"] == 1 and report["summary"]["errors"] == 0
    text = run("check", model, "--baseline", base, "--format", "concise")
    assert text.exit_code == 0 and "1 finding baselined" in text.stdout


def test_only_a_new_bug_fails_a_baselined_run(tmp_path):
    model = _save(_constant(1.0), tmp_path / "m.pt")
    other = _save(models.zero_layer(), tmp_path / "other.pt")
    base = tmp_path / "base.json"
    assert run("check", model, "--write-baseline", base).exit_code == 0
    broken = _constant(1.0)
    torch.nn.init.zeros_(broken[4].weight)  # a new bug beside the baselined one
    _save(broken, model)
    code, report = _json(model, "--baseline", base)
    assert code == 1
    assert _rules(report["findings"]) == {("zero-weights", "4.weight")}
    assert _rules(report["baselined"]) == {("constant-weights", "2.weight")}
    code, both = _json(model, other, "--baseline", base)  # another model's same bug is not in the baseline
    assert code == 1
    by_model = {Path(f["model"]).name: _rules(f["findings"]) for f in both["files"]}
    assert by_model == {"m.pt": {("zero-weights", "4.weight")}, "other.pt": {("zero-weights", "4.weight")}}


def test_retrained_values_of_the_same_bug_stay_baselined(tmp_path):
    model = _save(_constant(1.0, seed=0), tmp_path / "m.pt")
    base = tmp_path / "base.json"
    before = _json(model, "--write-baseline", base)[1]["baselined"]
    _save(_constant(0.37, seed=1), model)  # every value changed, the same layer still constant
    code, report = _json(model, "--baseline", base)
    assert code == 0 and report["findings"] == []
    assert [f["rule"] for f in report["baselined"]] == [f["rule"] for f in before] == ["constant-weights"]
    assert report["baselined"][0]["message"] != before[0]["message"]  # matched without its message


def test_a_model_moved_with_its_baseline_keeps_matching(tmp_path, monkeypatch):
    old = tmp_path / "old"
    _save(_constant(1.0), old / "ckpt" / "m.pt")
    monkeypatch.chdir(old)
    assert run("check", "ckpt/m.pt", "--write-baseline", "base.json").exit_code == 0
    assert str(tmp_path) not in (old / "base.json").read_text()  # paths relative to the baseline's folder
    new = tmp_path / "elsewhere" / "new"
    new.parent.mkdir()
    shutil.move(old, new)
    monkeypatch.chdir(new / "ckpt")  # another working folder: the model is found relative to the baseline
    code, report = _json("m.pt", "--baseline", "../base.json")
    assert code == 0 and _rules(report["baselined"]) == {("constant-weights", "2.weight")}
    code, report = _json(new / "ckpt" / "m.pt", "--baseline", new / "base.json")
    assert code == 0 and report["findings"] == []


def test_a_fixed_entry_is_a_note_never_an_error(tmp_path):
    model = _save(_constant(1.0), tmp_path / "m.pt")
    base = tmp_path / "base.json"
    assert run("check", model, "--write-baseline", base).exit_code == 0
    _save(models.deep_relu_kaiming(), model)
    code, report = _json(model, "--baseline", base)
    assert code == 0 and report["baselined"] == []
    assert any("no longer found (fixed): constant-weights on 2.weight" in note for note in report["notes"])
    code, report = _json(model, "--baseline", base, "--ignore", "constant-weights")  # not checked: not fixed
    assert code == 0 and not any("fixed" in note for note in report["notes"])


def test_the_config_names_the_baseline_relative_to_itself(tmp_path, monkeypatch):
    model = _save(_constant(1.0), tmp_path / "models" / "m.pt")
    (tmp_path / "ci").mkdir()
    assert run("check", model, "--write-baseline", tmp_path / "ci" / "base.json").exit_code == 0
    (tmp_path / "pyproject.toml").write_text('[tool.initaudit]\nbaseline = "ci/base.json"\n')
    monkeypatch.chdir(tmp_path / "models")
    code, report = _json("m.pt")
    assert code == 0 and _rules(report["baselined"]) == {("constant-weights", "2.weight")}
    (tmp_path / "empty.json").write_text('{"tool": "initaudit", "version": 1, "findings": []}')
    assert run("check", "m.pt", "--baseline", tmp_path / "empty.json").exit_code == 1  # the flag wins


@pytest.mark.parametrize("text, said", [
    ("not json {", "not readable JSON"),
    ("[1, 2]", 'no "findings" list'),
    ('{"version": 7, "findings": []}', "baseline version 7"),
    ('{"version": 1, "findings": ["constant-weights"]}', "finding 0 is not a baseline entry"),
    ('{"version": 1, "findings": [{"model": "m.pt", "rule": 3}]}', "finding 0 is not a baseline entry"),
])
def test_a_bad_baseline_file_is_one_line_and_exit_2(tmp_path, text, said):
    model = _save(_constant(1.0), tmp_path / "m.pt")
    base = tmp_path / "base.json"
    base.write_text(text)
    result = run("check", model, "--baseline", base)
    assert result.exit_code == 2
    line = one_stderr_line(result)
    assert str(base) in line and said in line


def test_a_missing_baseline_or_a_folder_is_one_line_and_exit_2(tmp_path):
    model = _save(_constant(1.0), tmp_path / "m.pt")
    missing = run("check", model, "--baseline", tmp_path / "none.json")
    assert missing.exit_code == 2 and "no such baseline file" in one_stderr_line(missing)
    folder = run("check", model, "--baseline", tmp_path)
    assert folder.exit_code == 2 and len(folder.stderr.splitlines()) == 1


def test_writing_the_baseline_never_replaces_a_model_or_the_report(tmp_path):
    model = _save(_constant(1.0), tmp_path / "m.pt")
    before = model.read_bytes()
    result = run("check", model, "--write-baseline", model)
    assert result.exit_code == 2 and "write the baseline elsewhere" in one_stderr_line(result)
    assert model.read_bytes() == before
    same = run("check", model, "--write-baseline", tmp_path / "out.json", "-o", tmp_path / "out.json")
    assert same.exit_code == 2 and not (tmp_path / "out.json").exists()
