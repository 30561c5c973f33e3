"""Every rule fires on a model built to have that fault, and stays silent on correct inits — in every format."""

from __future__ import annotations

import pytest
import torch

import initaudit
from fixtures import models
from helpers.formats import BARE, FORMATS, save_as
from helpers.verdicts import EXPECTED, MISMATCH, serious


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verdict_in_every_format(name, fmt, tmp_path):
    module = getattr(models, name)()
    path, kwargs = save_as(module, fmt, tmp_path, factory=f"fixtures.models:{name}")
    if fmt == "factory":
        path = None
    activation, expected = EXPECTED[name]
    if fmt in BARE:
        kwargs["activation"] = activation  # a bare state_dict does not say; the user names it
    report = initaudit.audit(path, **kwargs)
    assert serious(report) == expected
    assert report.summary["layers"] == 12 if name != "shallow_default" else 3


def test_bare_state_dict_without_activation_says_so(tmp_path):
    path, _ = save_as(models.deep_relu_xavier(), "state_dict", tmp_path)
    report = initaudit.audit(path)
    assert {row.activation for row in report.layers[:-1]} == {"unknown"}
    assert report.layers[-1].activation == "identity"  # the last layer of a state_dict is the output
    assert any("--activation" in note for note in report.notes)
    assert not any(f.rule == MISMATCH for f in report.findings)  # no activation, no mismatch claimed


def test_xavier_relu_told_apart_from_defaults_by_fingerprint_not_std():
    xavier = initaudit.audit(models.deep_relu_xavier())
    default = initaudit.audit(models.deep_relu_default())
    assert {row.scheme for row in xavier.layers[1:-1]} == {"xavier-normal"}
    assert {row.scheme for row in default.layers[1:-1]} == {"torch-default"}
    assert MISMATCH in {f.rule for f in xavier.findings} and MISMATCH not in {f.rule for f in default.findings}


def test_shallow_defaults_and_kaiming_cnn_have_no_error():
    for factory in (models.shallow_default, models.deep_cnn_kaiming, models.resnet_style_bn):
        assert initaudit.audit(factory()).summary["errors"] == 0


def test_duplicate_finding_names_the_copied_units():
    report = initaudit.audit(models.duplicate_filters())
    (finding,) = [f for f in report.findings if f.rule == "duplicate-units"]
    assert finding.tensor == "features.8.weight" and "0, 1, 2" in finding.message and finding.actual == 2


def test_nan_finding_counts_values():
    (finding,) = [f for f in initaudit.audit(models.nan_layer()).findings if f.rule == "non-finite"]
    assert finding.tensor == "6.weight" and finding.actual == 2 and "1 NaN and 1 Inf" in finding.message


def test_module_built_in_code_with_checkpoint_weights(tmp_path):
    """--model gives the architecture, the checkpoint its weights (DDP prefix and all)."""
    path, _ = save_as(models.zero_layer(), "checkpoint", tmp_path)
    report = initaudit.audit(path, model="fixtures.models:mlp_factory_for_tests")
    assert serious(report) == {("zero-weights", "4", "error")}
    assert report.layers[0].activation == "relu"


def test_lightning_and_model_wrappers(tmp_path):
    state = models.ones_layer().state_dict()
    for wrapped in ({"model": state}, {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1},
                    {"model_state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}):
        path = tmp_path / "ckpt.pt"
        torch.save(wrapped, path)
        report = initaudit.audit(path, activation="relu")
        assert serious(report) == {("constant-weights", "2", "error")}
