"""Correlation and mean through depth: probe measures, per layer, the mean cosine between different inputs'
outputs and the channel mean; signal-collapse (measured) judges the cosine at the last hidden layer of a deep
plain run. The ordered phase (tanh at small gain with a bias) collapses; the chaotic/critical side (orthogonal
tanh at 5/3) and the slow rise of a deep Kaiming-ReLU MLP do not; a dead network has no direction at all."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fixtures import depth_models
from helpers.formats import export_onnx
from initaudit.config import Options
from initaudit.load.dispatch import load
from initaudit.probe.input_batch import InputBatch
from initaudit.probe.representation import describe
from initaudit.probe.run import probe
from initaudit.reporters import depth_chart

LAST_HIDDEN = "56"  # the 30-layer stacks: Linear layers at 0, 2, ..., 58; 58 is the output


def probed(model: nn.Module):
    return probe(load(None, module=model), Options())


def collapse(report) -> list:
    return [f for f in report.findings if f.rule == "signal-collapse"]


def cosines(report) -> dict[str, float | None]:
    return {row.name: row.cosine for row in report.layers}


def test_the_ordered_phase_collapses_at_the_last_hidden_layer():
    report = probed(depth_models.tanh_ordered())
    (finding,) = collapse(report)
    assert (finding.layer, finding.severity, finding.origin, finding.code) == (LAST_HIDDEN, "error", "measured", "IA303")
    assert finding.actual > 0.999 and "mean cosine" in finding.message
    rows = {row.name: row for row in report.layers}
    assert abs(report.input_cosine) < 0.02  # the synthetic batch's samples are independent draws
    assert cosines(report)["0"] < 0.5  # the first layer still tells its inputs apart; depth takes it away
    assert rows[LAST_HIDDEN].mean == pytest.approx(rows[LAST_HIDDEN].scale, rel=1e-3)  # all of it is one shift


def test_orthogonal_tanh_at_five_thirds_stays_decorrelated():
    report = probed(depth_models.tanh_orthogonal())
    assert not collapse(report)
    assert all(abs(c) < 0.05 for c in cosines(report).values())
    rows = {row.name: row for row in report.layers}
    assert rows[LAST_HIDDEN].mean < 0.3 * rows[LAST_HIDDEN].scale  # centred: the channel mean is sampling noise


def test_the_slow_rise_of_a_deep_kaiming_relu_mlp_is_no_collapse():
    report = probed(depth_models.relu_kaiming_deep())
    assert not collapse(report) and report.exit_code() == 0
    rising = cosines(report)
    assert 0.9 < rising[LAST_HIDDEN] < 0.99  # the known rise (about 0.95 by layer 25), measured, not judged
    assert rising["2"] == pytest.approx(1 / math.pi, abs=0.05)  # two ReLU'd independent Gaussians: cosine 1/π


def test_a_dead_network_has_no_cosine_and_no_collapse():
    """The zero twin: all-zero weights and biases put out zeros, which point nowhere."""
    report = probed(depth_models.stack(nn.init.zeros_, nn.Tanh, depth=30))
    assert all(c is None for c in cosines(report).values())
    assert not collapse(report)
    assert {f.rule for f in report.findings} == {"signal-vanishing"}


def test_a_trained_net_fed_noise_is_told_so_its_own_data_decides():
    """Weights declared trained (--state trained) may map the synthetic noise to one place: info; on a batch of
    the user's (--input-batch) the collapse is theirs: an error again."""
    loaded, options = load(None, module=depth_models.tanh_ordered()), Options(state="trained")
    (noise,) = collapse(probe(loaded, options))
    assert noise.severity == "info"
    batch = InputBatch(args=(torch.randn(32, depth_models.INPUTS),), source="batch.pt")
    (given,) = collapse(probe(loaded, options, given=batch))
    assert given.severity == "error"


@pytest.mark.parametrize("model, batch, upto", [
    (lambda: depth_models.relu_kaiming_deep(), torch.randn(12, depth_models.INPUTS), 5),  # Linear "4"'s output
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), torch.randn(6, 3, 10, 10) + 0.5, 3),
])
def test_cosine_and_mean_are_the_shared_descriptions_of_the_layer_output(model, batch, upto):
    """What probe reports is representation.describe of the layer's output: the cosine as it is, the channel mean
    (conv: over channels, axis 1) relative to the input's RMS, as the scale is."""
    module = model()
    report = probe(load(None, module=module), Options(), given=InputBatch(args=(batch,)))
    row = report.layers[-1] if upto == len(module) else {r.name: r for r in report.layers}[str(upto - 1)]
    with torch.no_grad():
        shared = describe(module[:upto](batch), conv=isinstance(module[upto - 1], nn.Conv2d))
    rms_in = batch.pow(2).mean().sqrt().item()
    assert row.cosine == pytest.approx(shared.cosine, abs=1e-9)
    assert row.mean * rms_in == pytest.approx(shared.mean, rel=1e-6)
    assert row.scale * rms_in == pytest.approx(shared.rms, rel=1e-6)


def test_json_carries_cosine_and_mean_per_layer(cli):
    result = cli("probe", "--model", "fixtures.depth_models:tanh_ordered", "--format", "json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert abs(data["input_cosine"]) < 0.02
    for row in data["layers"]:
        assert -1 <= row["cosine"] <= 1 + 1e-9 and 0 <= row["mean"] <= row["scale"] * (1 + 1e-9)
    assert {f["rule"]: f["origin"] for f in data["findings"]}["signal-collapse"] == "measured"


def test_an_onnx_export_of_batch_one_measures_the_cosine_across_runs(cli, tmp_path):
    """A fixed batch of 1: each run is one sample, paired with the run before's (one pair per run would be none)."""
    path = export_onnx(depth_models.tanh_ordered(), tmp_path / "ordered.onnx", shape=(1, depth_models.INPUTS))
    result = cli("probe", path, "--trust-code", "--format", "json", "--batch", "16")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert "x 16 runs" in data["inputs"]
    onnx_cosines = {row["name"]: row["cosine"] for row in data["layers"]}
    torch_cosines = cosines(probed(depth_models.tanh_ordered()))
    assert onnx_cosines["0"] == pytest.approx(torch_cosines["0"], abs=0.1)
    assert onnx_cosines[LAST_HIDDEN] > 0.999
    assert [f["layer"] for f in data["findings"] if f["rule"] == "signal-collapse"] == [LAST_HIDDEN]


def test_the_chart_shows_the_cosine_column_and_panel(tmp_path):
    report = probed(depth_models.tanh_ordered())
    figure = depth_chart.figure(report, (0.01, 100))
    panel = figure.axes[2]
    assert "cosine" in panel.get_title()
    line = panel.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([row.cosine for row in report.layers])
    import io

    from initaudit.reporters import View

    out = io.StringIO()
    depth_chart.write(report, out, (0.01, 100), View())
    assert "cos" in out.getvalue() and "1.000000" in out.getvalue()
