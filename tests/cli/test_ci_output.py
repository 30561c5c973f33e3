"""The CLI as a CI job sees it: instant start without torch, plain non-TTY output, concise/full/junit/gitlab,
--quiet/--statistics/--exit-zero/--output-file/--color, help on mistakes, rule docs in sync."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import save_file

from fixtures import models
from helpers import FIXTURES, ROOT
from helpers.cli import run

ZERO, CLEAN, XAVIER = (FIXTURES / n for n in ("zero_layer_mlp.pt", "deep_relu_mlp_kaiming.pt", "deep_relu_mlp_xavier.pt"))
ESCAPE = re.compile(r"\x1b\[")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- instant start

PROBE = """
import runpy, sys, time
start = time.perf_counter()
sys.argv = ["initaudit", *sys.argv[1:]]
try:
    runpy.run_module("initaudit.cli", run_name="__main__")
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "onnx", "numpy", "safetensors") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), f"SECONDS={time.perf_counter() - start:.3f}", file=sys.stderr)
"""


def probe(*args: str) -> tuple[subprocess.CompletedProcess, list[str], float]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=120)
    heavy, seconds = re.search(r"HEAVY=(\S*) SECONDS=(\S+)", done.stderr).groups()
    return done, [m for m in heavy.split(",") if m], float(seconds)


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, initaudit.cli, initaudit; initaudit.__version__; print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["rules"], ["explain", "zero-weights"], ["check", "--help"],
                                  ["explain", "zero-weight"], ["check", "--format", "jsn", "m.pt"],
                                  ["check", "missing.pt", "--ignore", "zero-weight"], ["check", "missing.pt"], ["check"]])
def test_help_rules_explain_and_usage_errors_never_import_torch(args):
    done, heavy, seconds = probe(*args)
    assert heavy == [], (args, heavy)
    assert seconds < 2.0, seconds  # 0.1 s on an idle machine; the bound leaves room for a loaded CI box


def test_the_package_api_still_answers_lazily():
    import initaudit
    from initaudit.pipeline import analyse

    assert callable(analyse) and callable(initaudit.audit) and initaudit.audit.__module__ == "initaudit.pipeline"
    assert initaudit.Report.__name__ == "Report" and callable(initaudit.fix)
    report = initaudit.audit(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
    assert isinstance(report, initaudit.Report) and not report.failed()


# ---------------------------------------------------------------- plain output off a terminal

def long_named_model(tmp_path):
    """The zero-layer MLP whose layer names are 200 characters long (a table would wrap them)."""
    prefix = "encoder." + "very_long_block_name." * 9
    state = {f"{prefix}{k}": v.contiguous() for k, v in models.zero_layer().state_dict().items()}
    path = tmp_path / "long.safetensors"
    save_file(state, str(path))
    return path


def test_non_tty_output_is_one_plain_line_per_finding(tmp_path):
    path = long_named_model(tmp_path)
    findings = json.loads(run("check", path, "--activation", "relu", "--format", "json").stdout)["findings"]
    result = run("check", path, "--activation", "relu")  # not a terminal: concise by default
    assert result.exit_code == 1
    assert not ESCAPE.search(result.stdout) and not ESCAPE.search(result.stderr) and result.stderr == ""
    lines = result.stdout.splitlines()
    expected = [f"{path}:{f['layer']}: {f['code']} {f['rule']} {f['severity']}: "
                + f["message"].removeprefix(f"{f['layer']}: ") for f in findings]
    assert lines[:len(findings)] == expected  # whole, unwrapped, unpadded: no line longer than its message
    assert len(max(expected, key=len)) > 250
    assert all(line == line.rstrip() for line in lines)
    assert lines[-1] == f"12 layers: {sum(f['severity'] == 'error' for f in findings)} errors, 0 warnings, " \
                        f"{sum(f['severity'] == 'info' for f in findings)} infos"


def test_the_full_table_off_a_terminal_is_neither_wrapped_nor_padded(tmp_path):
    path = long_named_model(tmp_path)
    full = run("check", path, "--activation", "relu", "--format", "full").stdout
    assert not ESCAPE.search(full)
    assert all(line == line.rstrip() for line in full.splitlines())
    name = json.loads(run("check", path, "--format", "json").stdout)["layers"][0]["name"]
    assert any(name in line for line in full.splitlines())  # the long name on one line of the table


@pytest.mark.parametrize("env, flag, coloured", [
    ({}, "auto", False), ({"FORCE_COLOR": "1"}, "auto", True), ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, "auto", False),
    ({"NO_COLOR": "1"}, "always", True), ({"FORCE_COLOR": "1"}, "never", False)])
def test_color_auto_always_never(env, flag, coloured):
    for fmt in ("concise", "full"):
        result = run("check", ZERO, "--color", flag, "--format", fmt, env=env)
        assert bool(ESCAPE.search(result.stdout)) == coloured, (env, flag, fmt)
        assert "\x1b[1m" not in result.stdout or coloured  # NO_COLOR: not even bold


def test_quiet_statistics_exit_zero_and_output_file(tmp_path):
    args = ["check", ZERO, XAVIER, "--activation", "relu"]
    quiet = run(*args, "--quiet").stdout.splitlines()
    assert len(quiet) == 12 and all(re.match(r"\S+\.pt:\d+: IA\d{3} [a-z-]+ (error|warning|info): ", ln) for ln in quiet)
    stats = run(*args, "--statistics").stdout.splitlines()
    assert stats[:2] == ["   11  IA201  init-activation-mismatch  error", "    1  IA101  zero-weights  error"]
    assert stats[-1] == "2 files, 24 layers: 12 errors, 0 warnings, 0 infos"
    assert run(*args).exit_code == 1 and run(*args, "--exit-zero").exit_code == 0
    assert run(*args, "--exit-zero", "--fail-on", "warning").exit_code == 0
    report = tmp_path / "report.txt"
    result = run(*args, "--output-file", report, env={"FORCE_COLOR": "1"})  # a file stays plain text
    assert result.exit_code == 1 and result.stdout == ""
    assert report.read_text().splitlines() == run(*args).stdout.splitlines()


def test_junit_parses_back(tmp_path):
    result = run("check", ZERO, XAVIER, CLEAN, "--activation", "relu", "--format", "junit", "--fail-on", "warning")
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout)
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {str(ZERO), str(XAVIER), str(CLEAN)}
    assert suites[str(XAVIER)].get("failures") == "11" and len(suites[str(XAVIER)].findall("testcase")) == 11
    (zero_case,) = suites[str(ZERO)].findall("testcase")
    assert zero_case.get("name") == "4: IA101 zero-weights" and zero_case.find("failure").get("type") == "error"
    assert [c.get("name") for c in suites[str(CLEAN)].findall("testcase")] == ["no findings"]
    assert suites[str(CLEAN)].get("failures") == "0"
    assert root.get("failures") == "12"
    relaxed = ET.fromstring(run("check", XAVIER, "--activation", "relu", "--format", "junit", "--fail-on", "never").stdout)
    assert relaxed.get("failures") == "0" and len(list(relaxed.iter("testcase"))) == 11  # findings below --fail-on


def test_gitlab_code_quality_parses_back():
    result = run("check", ZERO, XAVIER, "--activation", "relu", "--format", "gitlab")
    issues = json.loads(result.stdout)
    assert len(issues) == 12 and len({i["fingerprint"] for i in issues}) == 12
    for issue in issues:
        assert set(issue) == {"description", "check_name", "fingerprint", "severity", "location"}
        assert issue["severity"] in ("info", "minor", "major", "critical", "blocker")
        assert issue["location"]["path"] in (str(ZERO), str(XAVIER)) and issue["location"]["lines"]["begin"] == 1
    (zero,) = [i for i in issues if i["location"]["path"] == str(ZERO)]
    assert zero["check_name"] == "IA101 zero-weights" and zero["severity"] == "major"
    assert zero["description"].startswith("4: all 16384 weights are zero")
    again = json.loads(run("check", ZERO, XAVIER, "--activation", "relu", "--format", "gitlab").stdout)
    assert [i["fingerprint"] for i in again] == [i["fingerprint"] for i in issues]  # stable across runs


def test_github_annotations_name_each_file():
    lines = run("check", ZERO, XAVIER, "--activation", "relu", "--format", "github").stdout.splitlines()
    assert len(lines) == 12
    assert sum(f"file={ZERO}".replace(":", "%3A") in ln for ln in lines) == 1


# ---------------------------------------------------------------- help on mistakes

@pytest.mark.parametrize("args, fragment", [
    (["check", ZERO, "--ignore", "zero-weight"], "unknown rule 'zero-weight'; did you mean 'zero-weights'?"),
    (["check", ZERO, "--select", "IA10"], None),  # a code prefix is a valid selection
    (["explain", "zero-weight"], "unknown rule 'zero-weight'; did you mean 'zero-weights'?"),
    (["explain", "nonfinite"], "did you mean 'non-finite'"),
    (["check", ZERO, "--format", "jsno"], "did you mean 'json'?"),
    (["check", ZERO, "--color", "allways"], "did you mean 'always'?"),
    (["check", ZERO, "--per-layer-ignore", "4=zero-weight"], "did you mean 'zero-weights'?"),
    (["check", ZERO, "--per-layer-ignore", "4"], "use PATTERN=RULE"),
])
def test_did_you_mean(args, fragment):
    result = run(*args)
    if fragment is None:
        assert result.exit_code == 1
        return
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert fragment in line, line


def test_config_key_typo_and_any_toml_file(tmp_path):
    other = tmp_path / "initaudit-ci.toml"
    other.write_text('[tool.initaudit]\nfail-on = "warning"\nactivation = "relu"\n')
    assert run("check", XAVIER).exit_code == 0  # warnings do not fail by default
    assert run("check", XAVIER, "--config", other).exit_code == 1  # the table of a non-pyproject TOML applies
    bare = tmp_path / "bare.toml"
    bare.write_text('fail-on = "warning"\nactivation = "relu"\nextend-exclud = ["x"]\n')
    (line,) = run("check", XAVIER, "--config", bare).stderr.splitlines()
    assert "unknown [tool.initaudit] key 'extend-exclud' (did you mean 'extend-exclude'?" in line


def test_per_layer_ignore_on_the_command_line():
    assert run("check", ZERO, "--activation", "relu").exit_code == 1
    result = run("check", ZERO, "--activation", "relu", "--per-layer-ignore", "4=IA1", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["findings"] == []
    assert run("check", ZERO, "--activation", "relu", "--per-layer-ignore", "3=IA101").exit_code == 1


# ---------------------------------------------------------------- rule docs

def test_rule_docs_are_in_sync_and_linked():
    from initaudit.judge import ruledocs
    from initaudit.judge.rules import builtin_rules

    folder = ROOT / "docs" / "rules"
    pages = ruledocs.pages()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.md")}
    assert on_disk == pages, "docs/rules/ is stale: run `python -m initaudit.judge.ruledocs`"
    rules = builtin_rules()
    for rule in rules:
        page = pages[f"{rule.name}.md"]
        for heading in ("## What it does", "## Why is this bad?", "## Fix"):
            assert heading in page, (rule.name, heading)
        assert rule.code in page and " ".join(rule.why.split()) in " ".join(page.split())
    assert f"Docs: {ruledocs.url(rules[0])}" in run("explain", rules[0].name).stdout
    sarif = json.loads(run("check", ZERO, "--format", "sarif").stdout)
    help_uris = [r["helpUri"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]]
    assert help_uris == [ruledocs.url(r) for r in rules] and all(u.rsplit("/", 1)[1] in pages for u in help_uris)


def test_progress_stays_off_the_log():
    """Off a terminal (a CI log) nothing but the report is written, even for a run of several models."""
    done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", str(ZERO), str(CLEAN), str(XAVIER)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and done.stderr == ""
    assert not ESCAPE.search(done.stdout)



class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("delay, tty, quiet, shown", [(0.0, True, False, True), (5.0, True, False, False),
                                                      (0.0, False, False, False), (0.0, True, True, False)])
def test_progress_appears_on_a_terminal_after_its_delay(monkeypatch, delay, tty, quiet, shown):
    from initaudit.common import progress as progress_mod

    stderr = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(progress_mod, "DELAY", delay)
    with progress_mod.Progress(2, enabled=not quiet) as bar:
        bar.step("models/a.pt", 0)
        threading.Event().wait(0.5)  # the bar refreshes on its own thread while a model is audited
        bar.step("models/b.pt", 1)
    assert ("models/a.pt" in stderr.getvalue()) == shown, stderr.getvalue()


def test_quiet_full_names_the_model_of_each_finding():
    """`--quiet` drops the tables, whose titles named the models: with several models, a header per model says
    whose findings follow (the default on a terminal is `full`)."""
    lines = run("check", CLEAN, ZERO, XAVIER, "--activation", "relu", "--quiet", "--format", "full").stdout.splitlines()
    assert lines[0] == f"{ZERO}:" and lines[2] == f"{XAVIER}:" and len(lines) == 14
    assert lines[1].startswith("error   IA101 zero-weights ")
    assert all(line.startswith("error   IA201 init-activation-mismatch ") for line in lines[3:])
    single = run("check", ZERO, "--quiet", "--format", "full").stdout.splitlines()
    assert len(single) == 1 and single[0].startswith("error   IA101 zero-weights ")
