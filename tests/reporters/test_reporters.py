"""SARIF (validated against the official 2.1.0 schema) and GitHub annotations."""

from __future__ import annotations

import json

import pytest

from helpers import FIXTURES, SARIF_SCHEMA

ZERO = FIXTURES / "zero_layer_mlp.pt"


def test_sarif_is_valid_and_carries_findings(cli):
    result = cli("check", ZERO, "--activation", "relu", "--format", "sarif")
    assert result.exit_code == 1
    sarif = json.loads(result.output)
    (run,) = sarif["runs"]
    (res,) = run["results"]
    assert res["ruleId"] == "IA101" and res["level"] == "error"
    assert res["locations"][0]["logicalLocations"][0]["name"] == "4.weight"
    assert run["tool"]["driver"]["rules"][res["ruleIndex"]]["name"] == "zero-weights"
    if not SARIF_SCHEMA.exists():
        pytest.skip(f"the SARIF schema is not at {SARIF_SCHEMA} (shared/ is not beside this checkout)")
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test extra")
    jsonschema.validate(sarif, json.loads(SARIF_SCHEMA.read_text()))


def test_github_annotations(cli):
    out = cli("check", ZERO, "--activation", "relu", "--format", "github").output.splitlines()
    assert len(out) == 1
    assert out[0].startswith("::error file=") and "title=IA101 zero-weights (4)::" in out[0]
