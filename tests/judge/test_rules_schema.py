"""Rules are data with a schema: the shipped ones load, and malformed ones are rejected by name."""

from __future__ import annotations

import pytest

from initaudit.judge import rules
from initaudit.common.errors import InputError

CONTRACT = {"zero-weights", "constant-weights", "non-finite", "dead-units", "duplicate-units",
            "init-activation-mismatch", "variance-out-of-range", "nonzero-bias"}


def test_shipped_rules_cover_the_contract_with_unique_codes():
    loaded = rules.builtin_rules()
    assert CONTRACT <= {r.name for r in loaded}
    assert len({r.code for r in loaded}) == len(loaded)
    for r in loaded:
        assert r.why and r.summary and r.example, r.name


GOOD = """
- code: XX901
  name: tiny-std
  summary: std below a floor
  severity: warning
  when: {std: {lt: 0.001}, kind: [linear]}
  severity_by:
    - {severity: error, when: {std: {lt: 0.0001}}}
  message: "{layer}: std {std:.2g}"
  why: because
  metadata: {owner: me}
"""


def test_custom_rule_evaluates(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(GOOD)
    (rule,) = rules.load_file(f)
    assert rule.verdict({"role": "weight", "kind": "linear", "std": 0.0005, "layer": "x"}) == "warning"
    assert rule.verdict({"role": "weight", "kind": "linear", "std": 0.00005}) == "error"
    assert rule.verdict({"role": "weight", "kind": "conv2d", "std": 0.0005}) is None
    assert rule.verdict({"role": "bias", "kind": "linear", "std": 0.0005}) is None
    assert rule.render({"layer": "x", "std": 0.0005}) == "x: std 0.0005"
    assert rule.render({}) == "?: std ?"


@pytest.mark.parametrize("mutation,complaint", [
    (("severity: warning", "severity: fatal"), "severity must be"),
    (("  why: because", "  why: because\n  colour: red"), "unknown key(s) ['colour']"),
    (("{std: {lt: 0.001}, kind: [linear]}", "{stdd: {lt: 0.001}}"), "unknown fact 'stdd'"),
    (("{std: {lt: 0.001}, kind: [linear]}", "{std: {below: 0.001}}"), "unknown operator"),
    (("name: tiny-std", "name: Tiny_Std"), "kebab-case"),
    (("code: XX901", "code: 901"), "code must look like"),
])
def test_malformed_rules_name_file_and_rule(tmp_path, mutation, complaint):
    f = tmp_path / "bad.yaml"
    f.write_text(GOOD.replace(*mutation))
    with pytest.raises(InputError) as err:
        rules.load_file(f)
    assert complaint in str(err.value) and "bad.yaml" in str(err.value)


def test_select_and_ignore_by_name_code_and_prefix():
    loaded = rules.builtin_rules()
    assert {r.name for r in rules.select(loaded, ["IA1"])} == {"zero-weights", "constant-weights", "dead-units", "duplicate-units",
                                                              "weight-spike", "uninitialized-memory", "truncation-edge"}
    assert "nonzero-bias" not in {r.name for r in rules.select(loaded, None, ["nonzero-bias"])}
    with pytest.raises(InputError):
        rules.select(loaded, ["no-such-rule"])
