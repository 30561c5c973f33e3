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


# ---------------------------------------------------------------- residual streams

def test_a_residual_stream_compounding_without_norms_is_exploding_where_it_leaves_the_band(tmp_path):
    for fmt in ("module", "onnx"):
        report = audited("residual_mlp_kaiming", fmt, tmp_path)
        (finding,) = [f for f in report.findings if f.rule == "signal-exploding"]
        assert finding.severity == "error" and finding.origin == "predicted", fmt
        assert "residual stream" in finding.message and "per block" in finding.message
        # Kaiming branches: each block multiplies the stream's variance by 1 + 2 = 3; RMS 100 after ~8 sums.
        assert finding.layer in {f"blocks.{i}.fc2" for i in range(6, 10)}, finding.layer
        assert report.exit_code() == 1


@pytest.mark.parametrize("name", ["prenorm_mlp_kaiming", "prenorm_mlp_gpt2", "postnorm_mlp_kaiming", "fixup_mlp",
                                  "rezero_mlp", "zero_init_residual_resnet"])
def test_residual_recipes_are_not_flagged(name, tmp_path):
    for fmt in ("module", "state_dict", "onnx"):
        assert not serious(audited(name, fmt, tmp_path)), (name, fmt)


def stream_flow(blocks: int, pre_norm: bool):
    """A stem and `blocks` one-layer branches added to the stream, each starting with a norm where `pre_norm`."""
    from initaudit.flow.dataflow import ADD, LAYER, NORM, OUTPUT, PASS, Flow

    flow = Flow()
    stream = flow.add(LAYER, "stem")
    flow.link(flow.add(PASS), stream)
    for k in range(blocks):
        branch = flow.add(LAYER, f"b{k}")
        if pre_norm:
            norm = flow.add(NORM)
            flow.link(stream, norm)
            flow.link(norm, branch)
        else:
            flow.link(stream, branch)
        total = flow.add(ADD)
        flow.link(stream, total)
        flow.link(branch, total)
        stream = total
    flow.link(stream, flow.add(OUTPUT))
    return flow


@pytest.mark.parametrize("pre_norm, gain, exploding", [
    (False, 1.0, True),      # x + W x, E[w²]·fan_in = 1: the stream doubles its variance each block (2^40)
    (False, 0.02, False),    # ×1.02 per block: 2.2x in variance over 40 blocks, inside the band
    (True, 400.0, False),    # pre-norm, branches of RMS 20: the stream grows additively, 1 + 400k, out of the band
])                           # by block 25 but at (k/(k-4))^(1/4) ≈ 1.04 per block: not exponential
def test_stream_growth_is_fitted_over_blocks_not_assumed(pre_norm, gain, exploding):
    from initaudit.measure import depth

    names = ["stem"] + [f"b{k}" for k in range(40)]
    weights = {name: depth.Weights(1, 1, gain if name != "stem" else 1.0) for name in names}
    found = depth.propagate(stream_flow(40, pre_norm), weights, dict.fromkeys(names, "linear"))
    depth.judge_streams(found, (0.01, 100.0))
    flagged = [name for name, d in found.items() if d.stream_exit]
    assert bool(flagged) == exploding, flagged
    assert max(d.stream.scale for d in found.values() if d.stream) > (100 if pre_norm or exploding else 1)
    if exploding:
        (name,) = flagged
        assert found[name].stream.growth == pytest.approx(2.0, rel=1e-6)


# ---------------------------------------------------------------- zero branch ends, conv nets as MLPs

@pytest.mark.parametrize("fmt", ["module", "state_dict", "onnx"])
def test_fixup_resnet_without_batchnorm_is_a_recipe_in_every_format(fmt, tmp_path):
    report = audited("fixup_resnet", fmt, tmp_path)
    assert not serious(report)
    assert {f.severity for f in report.findings if f.rule == "zero-weights"} == {"info"}


@pytest.mark.parametrize("fmt", ["module", "state_dict", "onnx"])
def test_a_zeroed_conv_in_a_plain_chain_stays_an_error(fmt, tmp_path):
    report = audited("conv_chain_zeroed", fmt, tmp_path)
    assert ("zero-weights", "error") in {(f.rule, f.severity) for f in report.findings}


# ---------------------------------------------------------------- norm gains

@pytest.mark.parametrize("fmt", ["module", "state_dict", "onnx"])
def test_zeroed_norm_gains_on_the_main_path_are_an_error(fmt, tmp_path):
    report = audited("conv_chain_zero_gains", fmt, tmp_path)
    zero = [f for f in report.findings if f.rule == "zero-weights"]
    assert len(zero) == 6 and {f.severity for f in zero} == {"error"}


@pytest.mark.parametrize("name", ["conv_chain_bn", "gemma_norm_mlp", "dit_adaln_zero"])
def test_norm_conventions_and_modulation_read_in_their_own_convention(name, tmp_path):
    for fmt in ("module", "state_dict", "onnx"):
        assert not serious(audited(name, fmt, tmp_path)), (name, fmt)


def test_gemma_norms_are_silent_where_the_module_says_one_plus_and_info_in_a_bare_file(tmp_path):
    live = audited("gemma_norm_mlp", "module", tmp_path)
    assert not [f for f in live.findings if f.rule == "zero-weights"]
    bare = audited("gemma_norm_mlp", "state_dict", tmp_path)  # x·(1+w) and a zeroed RMSNorm share the keys
    assert {f.severity for f in bare.findings if f.rule == "zero-weights"} == {"info"}


def test_a_zeroed_standard_rmsnorm_on_the_main_path_is_an_error(tmp_path):
    report = audited("rmsnorm_mlp_zeroed", "module", tmp_path)
    severities = {f.layer: f.severity for f in report.findings if f.rule == "zero-weights"}
    assert severities["final_norm"] == "error"
    assert {severities[f"norms.{i}"] for i in range(4)} == {"info"}  # pre-norm: the stream goes around them


@pytest.mark.parametrize("fmt", ["module", "state_dict"])
def test_every_gain_zeroed_is_no_zero_init_residual(fmt, tmp_path):
    """zero_init_residual zeroes each block's last gain beside live ones; a loop that zeroes them all kills the
    blocks' first norms, on the main path: errors there, in a bare file too (no live twin). (The stem's norm feeds
    the stream itself; its output reaches a sum, which is all `residual_branch` sees: info with a flow.)"""
    report = audited("resnet_all_gains_zeroed", fmt, tmp_path)
    errors = {f.layer for f in report.findings if f.rule == "zero-weights" and f.severity == "error"}
    assert {"layer1.0.bn1", "layer2.0.bn1", "layer4.1.bn1"} <= errors
    assert not any(name.endswith("bn2") for name in errors) or fmt == "state_dict"
