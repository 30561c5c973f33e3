"""`initaudit probe --widths`: the coord check. A standard-parametrization MLP grows with width after one Adam step
and its μP twin (microsoft/mup's MuReadout, set_base_shapes, MuAdam through --optimizer) does not; the update
ratio follows Adam's first step (lr·sign(g)) over a range of rates; the records round-trip into mup's own
coord-check DataFrame and plot; the chart's panels are read back from the figure."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from fixtures import coord_models
from initaudit.config import Options
from initaudit.probe.coord import Sweep, coord_check
from initaudit.reporters import coord_chart

WIDTHS = (64, 128, 256)
SP, MUP = "fixtures.coord_models:sp_mlp", "fixtures.coord_models:mup_mlp"
MU_ADAM = "fixtures.coord_models:mu_adam"
UPDATE_BAND = 0.5  # rules/IA3-coord.yaml: update-ratio fires above it


def swept(spec: str, **settings):
    return coord_check(spec, Sweep(settings.pop("widths", WIDTHS), **settings), Options())


def rules_by_layer(report, rule: str) -> dict[str, str]:
    return {f.layer: f.severity for f in report.findings if f.rule == rule}


def test_sp_grows_with_width_after_one_adam_step_and_its_mup_twin_does_not():
    sp = swept(SP, steps=1, seeds=(0, 1), lr=1e-2)
    mup = swept(MUP, steps=1, seeds=(0, 1), lr=1e-2, optimizer=MU_ADAM)
    grows = rules_by_layer(sp, "width-dependent-scale")
    assert grows.get("4") == "error" and "0" not in grows  # the readout grows ∝ width; the input layer's fan is fixed
    assert all(f.origin == "measured" for f in sp.findings)
    assert sp.exit_code() == 1
    assert mup.findings == [] and mup.exit_code() == 0
    by_name = {row.name: row for row in mup.layers}
    assert by_name["readout"].slopes[1] is None  # zero readout at init: no log, no verdict
    assert abs(by_name["readout"].slopes[2]) < 0.2
    assert by_name["fc2"].update_ratio == 0  # behind a zero readout the hidden layers get no gradient on step 1


def test_the_width_rule_judges_growth_at_init_and_never_shrinking():
    grows = swept("fixtures.coord_models:growing_readout", steps=0, seeds=(0,))
    shrinks = swept("fixtures.coord_models:shrinking_readout", steps=0, seeds=(0,))
    assert rules_by_layer(grows, "width-dependent-scale") == {"4": "error"}
    assert {row.name: row.slopes[1] for row in shrinks.layers}["4"] < -0.5  # μP's readout at init: by design
    assert shrinks.findings == []
    two = swept("fixtures.coord_models:growing_readout", widths=(64, 256), steps=0, seeds=(0,))
    assert two.findings == [] and "fewer than 3 widths" in two.notes[0]


def sign_step_ratio(layer: torch.nn.Linear, lr: float) -> float:
    """Adam's first step on every entry is lr·sign(g): lr·√numel against the weight's norm."""
    return lr * math.sqrt(layer.weight.numel()) / float(layer.weight.detach().double().norm())


@pytest.mark.parametrize("lr", [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
def test_the_first_adam_step_moves_each_layer_by_lr_over_its_std(lr):
    report = swept(SP, widths=(64, 256), steps=1, seeds=(0,), lr=lr)
    torch.manual_seed(0)
    widest = coord_models.sp_mlp(256)  # the sweep builds each width under the seed: the same init
    flagged = rules_by_layer(report, "update-ratio")
    for row in report.layers:
        ratios = {r.width: r.update_ratio for r in report.records if r.module == row.name and r.t == 2}
        predicted = sign_step_ratio(widest.get_submodule(row.name), lr)
        assert ratios[256] == pytest.approx(predicted, rel=0.02)  # every entry's gradient is nonzero here
        assert row.update_ratio == max(ratios.values())
        if abs(math.log(row.update_ratio / UPDATE_BAND)) > 0.15:
            assert (row.name in flagged) == (row.update_ratio > UPDATE_BAND), (lr, row)


def test_ten_times_the_rate_rewrites_the_layers_in_one_step():
    base = swept(SP, steps=1, seeds=(0,), lr=1e-2)
    tenfold = swept(SP, steps=1, seeds=(0,), lr=1e-1)
    assert rules_by_layer(base, "update-ratio") == {}
    # lr / std: 0.1 / 0.036 = 2.8 on the layers of fan_in 256 (the step is twice the weight and more: error);
    # 0.1 / 0.144 = 0.69 on the input layer (fan_in 16): above half the weight, a warning.
    assert rules_by_layer(tenfold, "update-ratio") == {"0": "warning", "2": "error", "4": "error"}
    finding = next(f for f in tenfold.findings if f.rule == "update-ratio")
    assert "Adam at lr 0.1" in finding.message and finding.origin == "measured"


def test_a_zero_weight_is_measured_against_its_recommended_init():
    report = swept(MUP, steps=1, seeds=(0,), lr=1e-2, optimizer=MU_ADAM)
    readout = {row.name: row for row in report.layers}["readout"]
    # MuAdam keeps the readout's rate (its 1/width lives in the forward): ΔW = lr·sign(g) on 256 x 10 entries,
    # against the norm a LeCun/Kaiming-scale draw at fan_in 256 would have, not against 0.
    assert 0.01 < readout.update_ratio < 1 and math.isfinite(readout.update_ratio)
    assert readout.sign_step_ratio == pytest.approx(readout.update_ratio, rel=0.02)


def test_loss_and_modes_are_stated_and_kept():
    coord_models.CALLS.clear()
    report = swept("fixtures.coord_models:mode_spy_mlp", steps=2, seeds=(0, 1), lr=1e-3)
    assert "cross-entropy" in report.loss and "10 classes" in report.loss
    assert report.settings()["modes"] == {"steps": "train", "measurements": "eval"}
    calls = coord_models.CALLS
    assert calls.count((False, False)) == 3 * 2 * 3  # widths x seeds x (steps + 1) measurements: eval, no grad
    assert calls.count((True, True)) >= 3 * 2 * 2    # every step: train mode, with gradients
    assert set(calls) == {(False, False), (True, True)}
    regression = swept("fixtures.coord_models:regression_mlp", steps=1, seeds=(0,))
    assert regression.loss.startswith("mean squared error")


def test_csv_round_trips_into_mups_coord_check_columns(cli):
    pandas = pytest.importorskip("pandas")
    coord_check_mod = pytest.importorskip("mup.coord_check")
    result = cli("probe", "--model", SP, "--widths", "64,128,256", "--steps", "1", "--seeds", "2", "--lr", "0.01",
                 "--format", "csv")
    assert result.exit_code == 1, result.stderr
    ours = pandas.read_csv(io.StringIO(result.stdout))
    torch.manual_seed(0)
    batch = (torch.randn(8, coord_models.INPUTS), torch.randint(0, coord_models.CLASSES, (8,)))
    models = {w: (lambda w=w: coord_models.sp_mlp(w)) for w in WIDTHS}
    theirs = coord_check_mod.get_coord_data(models, [batch], optimizer="adam", lr=0.01, mup=False, nsteps=2,
                                            nseeds=2, cuda=False, show_progress=False,
                                            filter_module_by_name=lambda name: name in {"0", "2", "4"})
    assert list(theirs.columns) == ["width", "module", "t", "l1", "optimizer", "lr"]
    mine = ours[list(theirs.columns)].astype({"module": str})
    assert dict(mine.dtypes) == dict(theirs.dtypes)
    key = ["width", "module", "t"]
    assert sorted(map(tuple, mine[key].values.tolist())) == sorted(map(tuple, theirs[key].values.tolist()))
    figure = coord_check_mod.plot_coord_data(mine, y="l1", legend=False)  # mup's own plot reads our rows
    assert [ax.get_title() for ax in figure.axes] == ["t=1", "t=2"]
    import matplotlib.pyplot as plt
    plt.close(figure)


def test_json_carries_the_records_beside_the_report(cli):
    result = cli("probe", "--model", SP, "--widths", "64,128,256", "--steps", "1", "--seeds", "2", "--lr", "0.01",
                 "--format", "json")
    data = json.loads(result.stdout)
    assert data["check"] == "coord" and data["origin"] == "measured"
    assert {"width-dependent-scale"} <= {f["rule"] for f in data["findings"]}
    assert data["settings"]["modes"] == {"steps": "train", "measurements": "eval"}
    assert len(data["records"]) == 3 * 3 * 2 * 2  # layers x widths x t x seeds
    first = data["records"][0]
    assert set(first) == {"width", "module", "t", "seed", "l1", "rms", "mean", "cosine", "update_ratio"}
    assert first["t"] == 1 and first["update_ratio"] is None
    assert all(r["update_ratio"] > 0 for r in data["records"] if r["t"] == 2)


def test_the_chart_has_a_panel_per_step_and_a_line_per_layer_with_error_bars(cli, tmp_path):
    from matplotlib.container import ErrorbarContainer

    png = tmp_path / "coord.png"
    result = cli("probe", "--model", SP, "--widths", "64,128,256", "--steps", "2", "--seeds", "2", "--lr", "0.01",
                 "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "t=3 (after 2 steps)" in result.stdout and "width-dependent-scale" in result.stdout
    report = swept(SP, steps=2, seeds=(0, 1), lr=1e-2)
    figure = coord_chart.figure(report)
    assert [ax.get_title() for ax in figure.axes] == ["t=1 (init)", "t=2 (after 1 step)", "t=3 (after 2 steps)"]
    for ax in figure.axes:
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 3  # one line per layer
        for bar in bars:
            line, _, (ranges,) = bar.lines
            assert list(line.get_xdata()) == list(WIDTHS) and ax.get_xscale() == ax.get_yscale() == "log"
            assert any(len(segment) == 2 and segment[0][1] < segment[1][1] for segment in ranges.get_segments())
    labels = [text.get_text() for text in figure.axes[-1].get_legend().get_texts()]
    assert "4 (grows with width)" in labels and "0" in labels


def test_the_time_limit_scales_with_widths_seeds_and_steps(cli):
    result = cli("probe", "--model", SP, "--widths", "64,128,256", "--steps", "1", "--seeds", "2",
                 "--time-limit", "0.0001")
    assert result.exit_code == 2
    assert "0.0012 s time limit" in result.stderr  # 0.0001 s x 3 widths x 2 seeds x 2 passes


@pytest.mark.parametrize("args, complaint", [
    (["--steps", "1"], "--steps belong to the coord check"),
    (["--format", "csv"], "--format csv belong to the coord check"),
    (["fixtures/zero_layer_mlp.pt", "--widths", "64,128,256"], "holds one width's weights"),
    (["--widths", "64,64,128"], "distinct positive widths"),
    (["--widths", "64,128,256", "--width-arg", "d_model"], "--width-arg names its width keyword"),
    (["--widths", "64,128,256", "--optimizer", "fixtures.coord_models:INPUTS"], "not a callable"),
    (["--widths", "64,128,256", "--memory-limit", "1GB", "--trust-code"],
     "--trust-code, --memory-limit: not applied by the coord check"),
])
def test_coord_usage_errors_are_one_line_exit_2(cli, args, complaint):
    model = [] if args[0].endswith(".pt") else ["--model", SP]
    result = cli("probe", *args, *model)
    assert result.exit_code == 2 and complaint in result.stderr, result.stderr
