"""Depth recipes read right and their bugs caught (issue 22), each model built in code and checked as a live
module (`--model`), a saved state_dict and an ONNX export: the selection guide at its own word (Xavier feeding a
deep ReLU run is an error), residual streams that compound, zero-initialized branch ends in conv nets as in MLPs,
and norm gains (zeroed, Gemma's 1+w, adaLN-zero)."""

from __future__ import annotations

import pytest

import initaudit
from fixtures import depth_recipes
from helpers.formats import export_onnx, save_as
from helpers.verdicts import MISMATCH, serious

CONV = {"fixup_resnet", "conv_chain_zeroed", "conv_chain_zero_gains", "conv_chain_bn", "zero_init_residual_resnet"}


def audited(name: str, fmt: str, folder, **kwargs):
    """The report of recipe `name` as a live module, a bare state_dict or an ONNX export."""
    module = getattr(depth_recipes, name)()
    if fmt == "module":
        return initaudit.audit(module, **kwargs)
    if fmt == "onnx":
        shape = (2, 3, 32, 32) if name in CONV else (2, depth_recipes.INPUTS)
        return initaudit.audit(export_onnx(module, folder / "model.onnx", shape=shape), **kwargs)
    path, _ = save_as(module, "state_dict", folder)
    return initaudit.audit(path, **kwargs)


def rules_at(report, severity: str) -> set[str]:
    return {f.rule for f in report.findings if f.severity == severity}


# ---------------------------------------------------------------- the guide at its own word

@pytest.mark.parametrize("fmt", ["module", "state_dict", "onnx"])
@pytest.mark.parametrize("name, severity", [("relu_mlp_xavier_12", "error"), ("relu_mlp_xavier_7", "warning")])
def test_xavier_feeding_a_relu_run_is_judged_by_the_runs_depth(name, severity, fmt, tmp_path):
    report = audited(name, fmt, tmp_path, activation="relu" if fmt == "state_dict" else None)
    mismatches = {(f.layer, f.severity) for f in report.findings if f.rule == MISMATCH}
    hidden = int(name.rsplit("_", 1)[1]) - 1
    assert len(mismatches) == hidden and {s for _, s in mismatches} == {severity}
    assert report.exit_code() == (1 if severity == "error" else 0)


def test_kaiming_twin_of_the_deep_relu_mlp_is_clean(tmp_path):
    for fmt in ("module", "onnx"):
        assert not serious(audited("relu_mlp_kaiming_12", fmt, tmp_path)), fmt
