"""initaudit.testing.assert_well_initialized: the pytest helper fails on a badly initialized model, with the
findings table, and passes on a well initialized one."""

from __future__ import annotations

import pytest

from fixtures import models
from helpers import FIXTURES, ROOT
from initaudit import Report
from initaudit.common.errors import InputError
from initaudit.testing import assert_well_initialized

pytest_plugins = ["pytester"]  # a user's own pytest run, in a subprocess


def test_fails_on_a_bad_model_with_the_findings_table():
    with pytest.raises(AssertionError) as caught:
        assert_well_initialized(models.zero_layer())
    message = str(caught.value)
    assert message.splitlines()[0] == "<module> is not well initialized: 1 finding(s) at or above warning"
    assert "fan in→out" in message and "IA101" in message  # the per-layer table, the finding's code in its row
    assert any(line.startswith("error   IA101 zero-weights 4: all 16384 weights are zero") for line in message.splitlines())
    assert "\x1b" not in message


def test_passes_on_a_good_model_and_returns_its_report():
    report = assert_well_initialized(models.deep_relu_kaiming())
    assert isinstance(report, Report) and report.summary["errors"] == report.summary["warnings"] == 0


def test_takes_paths_and_the_audit_options(tmp_path):
    xavier = str(FIXTURES / "deep_relu_mlp_xavier.pt")
    with pytest.raises(AssertionError, match="11 finding"):
        assert_well_initialized(xavier, activation="relu")  # warnings fail by default
    assert_well_initialized(xavier, activation="relu", fail_on="never")
    assert_well_initialized(xavier, activation="relu", ignore=["init-activation-mismatch"])
    with pytest.raises(AssertionError, match="deep_relu_mlp_xavier.pt is not well initialized"):
        assert_well_initialized(FIXTURES / "deep_relu_mlp_xavier.pt", activation="relu")


def test_works_inside_a_users_pytest_run(pytester):
    pytester.makepyfile(test_user=f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from fixtures import models
        from initaudit.testing import assert_well_initialized

        def test_good():
            assert_well_initialized(models.deep_relu_kaiming())

        def test_bad():
            assert_well_initialized(models.zero_layer())
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*is not well initialized: 1 finding(s) at or above warning*", "*IA101 zero-weights*"])


def test_a_misspelt_fail_on_is_named_not_a_tuple_index_error():
    with pytest.raises(InputError, match="did you mean 'warning'"):
        assert_well_initialized(models.deep_relu_kaiming(), fail_on="warnings")
