"""Names read from a file are shown one way (initaudit.printable): machine formats keep them exact, text and XML
formats escape them; and no library's warning or log line reaches stderr unless --debug asks for it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import ROOT
from initaudit.cli.main import main
from initaudit.common.printable import printable
from initaudit.reporters import FORMATS

# layer names a file can hold: a lone surrogate; ESC, newline and a bidi override; a GitHub command injection
NAMES = {"surrogate": "a\ud800", "controls": "b\x1b[31m\nc\u202e", "injection": "x\n::error file=evil::pwned"}
# what may appear raw in a report: printable text plus the line breaks between its lines
RAW_CONTROL = [chr(c) for c in (*range(0x20), *range(0x7f, 0xa0)) if chr(c) != "\n"] + ["\u202e", "\u2066"]


def cli(*args, env: dict | None = None, path: Path | None = None) -> subprocess.CompletedProcess:
    """initaudit as a user runs it: its own process (`path` importable too), stdout and stderr as bytes."""
    pythonpath = os.pathsep.join(str(p) for p in (ROOT, path) if p is not None)
    return subprocess.run([sys.executable, "-m", "initaudit.cli", *map(str, args)], capture_output=True,
                          env={**os.environ, **(env or {}), "PYTHONPATH": pythonpath}, timeout=300)


@pytest.fixture(scope="module")
def named(tmp_path_factory) -> Path:
    """A torch.save'd state_dict: one all-zero layer (an error) under each name of NAMES, one Kaiming layer."""
    torch.manual_seed(0)
    state = {f"{name}.weight": torch.zeros(32, 32) for name in NAMES.values()}
    state["ok.weight"] = torch.randn(32, 32) * (2 / 32) ** 0.5
    path = tmp_path_factory.mktemp("names") / "named.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def reports(named) -> dict[str, subprocess.CompletedProcess]:
    """`check --format F` on the named file, for every format the command line offers."""
    return {fmt: cli("check", named, "--activation", "relu", "--format", fmt) for fmt in FORMATS}


def shown(result: subprocess.CompletedProcess) -> str:
    """stdout as a terminal gets it: UTF-8 (a surrogate fails here), no control character but line breaks."""
    text = result.stdout.decode("utf-8")
    assert not [c for c in RAW_CONTROL if c in text], text
    return text


def test_every_format_reports_every_name_and_exits_as_its_findings_say(reports):
    findings = json.loads(reports["json"].stdout)["findings"]
    assert {f["layer"] for f in findings if f["rule"] == "zero-weights"} == set(NAMES.values())  # exact, raw
    assert b"\\ud800" in reports["json"].stdout  # a JSON string escape: ASCII on the wire
    sarif = json.loads(reports["sarif"].stdout)
    tensors = {loc["name"] for r in sarif["runs"][0]["results"] for loc in r["locations"][0]["logicalLocations"]}
    assert {f"{name}.weight" for name in NAMES.values()} <= tensors
    code = 1 if any(f["severity"] == "error" for f in findings) else 0
    for fmt, result in reports.items():
        assert (result.returncode, result.stderr) == (code, b""), (fmt, result.stderr)
        shown(result)


@pytest.mark.parametrize("fmt", ["concise", "full", "table"])
def test_text_formats_show_the_backslash_escapes(reports, fmt):
    text = shown(reports[fmt])
    for name in NAMES.values():
        assert printable(name) in text, (fmt, name)
    assert "a\\ud800" in text and "b\\x1b[31m\\nc\\u202e" in text


def test_gitlab_keeps_json_and_shows_the_name_escaped(reports):
    issues = json.loads(reports["gitlab"].stdout)
    descriptions = [i["description"] for i in issues]
    for name in NAMES.values():
        assert any(d.startswith(f"{printable(name)}: ") for d in descriptions), name
    assert not [c for c in RAW_CONTROL + ["\ud800"] if any(c in d for d in descriptions)]
    assert len({i["fingerprint"] for i in issues}) == len(issues)


def test_github_annotations_cannot_be_forged(reports):
    lines = shown(reports["github"]).splitlines()
    findings = json.loads(reports["json"].stdout)["findings"]
    assert len(lines) == len(findings) and all(line.startswith(("::error ", "::warning ", "::notice ")) for line in lines)
    (forged,) = [line for line in lines if "pwned" in line]
    assert forged.startswith("::error file=") and "::x\\n::error file=evil::pwned: " in forged  # one line, escaped
    assert "title=IA101 zero-weights (x\\n%3A%3Aerror file=evil%3A%3Apwned)" in forged


def test_junit_is_xml_with_what_xml_cannot_carry_escaped(reports):
    root = ET.fromstring(reports["junit"].stdout)
    cases = [case.get("name") for case in root.iter("testcase")]
    for name in NAMES.values():
        assert f"{printable(name)}: IA101 zero-weights" in cases, name
    assert root.get("failures") == str(len(NAMES))


def test_fix_draws_and_writes_a_surrogate_name(named, tmp_path):
    result = cli("fix", named, "-o", tmp_path / "fixed.pt", "--seed", 0)
    assert result.returncode == 0, result.stderr
    assert "a\\ud800" in shown(result)
    fixed = torch.load(tmp_path / "fixed.pt")
    assert set(fixed) == set(torch.load(named)) and fixed["a\ud800.weight"].std() > 0


def test_a_pipe_that_cannot_encode_a_name_gets_its_escape(tmp_path):
    torch.save({"caf\xe9\u4e2d.weight": torch.zeros(32, 32)}, tmp_path / "m.pt")
    result = cli("check", tmp_path / "m.pt", "--format", "concise", "--fail-on", "info",
                 env={"PYTHONIOENCODING": "ascii"})
    assert (result.returncode, result.stderr) == (1, b"")
    assert "caf\\xe9\\u4e2d: IA101 zero-weights" in result.stdout.decode("ascii")


def test_per_layer_ignore_matches_the_raw_name_not_the_escaped_one(named):
    def errors(*args) -> set[str]:
        result = CliRunner().invoke(main, ["check", str(named), "--activation", "relu", "--format", "json", *args])
        return {f["layer"] for f in json.loads(result.stdout)["findings"] if f["severity"] == "error"}

    raw = NAMES["controls"].split("[")[0] + "*"  # b<ESC>* ('[' starts a glob character class)
    assert NAMES["controls"] not in errors("--per-layer-ignore", f"{raw}=IA101")
    assert NAMES["controls"] in errors("--per-layer-ignore", f"{printable(raw)}=IA101")


def test_printable_escapes_all_xml_cannot_carry_and_every_bidi_control():
    xml_illegal = [*map(chr, (*range(0x20), *range(0xD800, 0xE000), 0xFFFE, 0xFFFF))]
    for char in xml_illegal:
        if char in "\t\n\r":
            continue
        ET.fromstring(f"<a b='{printable(char)}'>{printable(char)}</a>")  # parses: nothing XML rejects is left
    bidi = [chr(c) for c in range(0x110000) if unicodedata.bidirectional(chr(c)) in
            ("LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI")] + ["\u200e", "\u200f", "\u061c"]
    assert [c for c in bidi if printable(c) == c] == []
    assert printable("\ud800") == "\\ud800" and printable(printable("a\ud800\x1b")) == "a\\ud800\\x1b"


# ---------------------------------------------------------------- libraries' warnings and log lines

def test_torch_warning_in_fix_stays_off_stderr_unless_debug(tmp_path):
    """torch.nn.init warns ("Initializing zero-element tensors is a no-op") when fix re-draws an empty layer."""
    torch.save({"empty.weight": torch.zeros(0, 16), "fc.weight": torch.randn(16, 16)}, tmp_path / "m.pt")
    quiet = cli("fix", tmp_path / "m.pt", "--all", "-o", tmp_path / "fixed.pt")
    assert (quiet.returncode, quiet.stderr) == (0, b"")
    loud = cli("fix", tmp_path / "m.pt", "--all", "-o", tmp_path / "again.pt", "--debug")
    assert loud.returncode == 0 and b"zero-element tensors is a no-op" in loud.stderr


FACTORY = '''
import transformers

def deberta():
    config = transformers.DebertaConfig(vocab_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    return transformers.DebertaModel(config)
'''


def test_transformers_log_line_in_probe_stays_off_stderr_unless_debug(tmp_path):
    """DeBERTa's forward logs "We strongly recommend passing in an `attention_mask`..." through transformers'
    own stderr handler when the synthetic batch holds its pad token."""
    pytest.importorskip("transformers")
    (tmp_path / "user_models.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    try:
        import user_models

        torch.save(user_models.deberta().state_dict(), tmp_path / "deberta.pt")
    finally:
        sys.path.remove(str(tmp_path))
    args = ("probe", "--model", "user_models:deberta", tmp_path / "deberta.pt")
    quiet = cli(*args, path=tmp_path)
    assert quiet.returncode in (0, 1) and quiet.stderr == b"", quiet.stderr
    loud = cli("--debug", *args, path=tmp_path)
    assert loud.returncode == quiet.returncode and b"attention_mask" in loud.stderr


def test_the_command_line_leaves_the_process_warnings_and_logging_as_they_were(named):
    warnings.simplefilter("always")  # a caller's own filters (pytest restores its own after the test)
    filters, disabled = list(warnings.filters), logging.root.manager.disable
    result = CliRunner().invoke(main, ["check", str(named), "--format", "json", "--debug"])
    assert result.exit_code == 1
    assert (warnings.filters, logging.root.manager.disable) == (filters, disabled)
