"""`initaudit probe`: the measured side of the depth analysis agrees with the prediction, flags the same stacks
(origin "measured"), runs on torch modules, ONNX (onnxruntime) and Hugging Face models built from config."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import depth_models
from helpers.formats import export_onnx
from initaudit.config import Options
from initaudit.load.dispatch import load
from initaudit.probe.run import probe

SIGNAL = ("signal-vanishing", "signal-exploding")
AGREEMENT = 2.0  # prediction and measurement agree within this factor on every layer of these models


def signal(report) -> set[str]:
    return {f.rule for f in report.findings if f.rule in SIGNAL}


def probed(factory, **kwargs):
    return probe(load(None, module=factory()), Options(), **kwargs)


@pytest.mark.parametrize("factory, expected", [
    (depth_models.relu_small, {"signal-vanishing"}),
    (depth_models.relu_unit, {"signal-exploding"}),
    (depth_models.relu_kaiming, set()),
    (depth_models.tanh_xavier, set()),
    (depth_models.tanh_unit, {"signal-exploding"}),
    (depth_models.residual_net, set()),
])
def test_probe_measures_what_check_predicts(factory, expected):
    report = probed(factory)
    assert signal(report) == expected
    assert all(f.origin == "measured" for f in report.findings)
    assert report.exit_code() == (1 if expected else 0)
    assert report.agreement() < AGREEMENT
    assert all(row.scale and row.grad_scale and row.grad_norm for row in report.layers)


def test_stable_stacks_measure_inside_the_band_at_every_depth():
    for factory in (depth_models.relu_kaiming, depth_models.tanh_xavier, depth_models.residual_net):
        for row in probed(factory).layers:
            assert 1e-2 <= row.scale <= 1e2 and 1e-2 <= row.grad_scale <= 1e2, (factory.__name__, row)


def test_saturation_and_dead_units_are_measured():
    saturated = probed(depth_models.tanh_unit).layers
    assert min(row.saturated_fraction for row in saturated[:-1]) > 0.5  # N(0, 1) weights pin tanh at ±1
    assert max(row.saturated_fraction for row in probed(depth_models.tanh_xavier).layers[:-1]) < 0.05
    model = depth_models.relu_kaiming()
    with torch.no_grad():
        model[4].bias[:64] = -100.0  # a quarter of layer 4's units never fire
    dead = {row.name: row.dead_fraction for row in probe(load(None, module=model), Options()).layers}
    assert 0.25 <= dead["4"] < 0.3 and dead["2"] < 0.05  # (a healthy unit may stay negative on 64 samples)


def test_probe_leaves_the_model_as_it_was():
    model = depth_models.relu_kaiming().train()
    model[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe(load(None, module=model), Options())
    assert model.training and not model[0].weight.requires_grad and model[2].weight.grad is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_seeded_batch_is_reproducible():
    a, b = probed(depth_models.relu_kaiming, seed=3), probed(depth_models.relu_kaiming, seed=3)
    assert [r.scale for r in a.layers] == [r.scale for r in b.layers]
    assert [r.scale for r in a.layers] != [r.scale for r in probed(depth_models.relu_kaiming, seed=4).layers]


@pytest.mark.parametrize("name, code", [("relu_small", 1), ("relu_unit", 1), ("relu_kaiming", 0)])
def test_probe_on_an_onnx_export_matches_torch(name, code, cli, tmp_path):
    module = getattr(depth_models, name)()
    path = export_onnx(module, tmp_path / f"{name}.onnx")
    result = cli("probe", path, "--trust-code", "--format", "json", "--batch", "64")
    assert result.exit_code == code, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "onnx" and data["origin"] == "measured" and data["agreement"] < AGREEMENT
    torch_rows = probed(getattr(depth_models, name), batch=64).layers
    for onnx_row, torch_row in zip(data["layers"], torch_rows):
        assert onnx_row["scale"] == pytest.approx(torch_row.scale, rel=0.15)  # one seed, two generators: other draws
        assert onnx_row["grad_scale"] is None  # onnxruntime: forward only
    assert {f["rule"] for f in data["findings"]} == signal(probed(getattr(depth_models, name)))


def test_probe_on_a_hugging_face_model_built_from_config(cli):
    result = cli("probe", "--model", "fixtures.depth_models:tiny_bert", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["layers"]) >= 12
    assert all(row["scale"] and row["scale"] > 0 for row in data["layers"])
    assert sum(row["grad_norm"] is not None for row in data["layers"]) >= 12
    assert "(" in data["inputs"]  # token ids drawn for the config's vocabulary


def test_cli_chart_plot_and_exit_codes(cli, tmp_path):
    plot = tmp_path / "depth.png"
    result = cli("probe", "--model", "fixtures.depth_models:relu_small", "--plot", plot)
    assert result.exit_code == 1
    assert "signal-vanishing" in result.stdout and "measured" in result.stdout and "○" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("probe", "--model", "fixtures.depth_models:relu_kaiming").exit_code == 0


def test_bare_weights_cannot_be_probed(cli, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(depth_models.relu_kaiming().state_dict(), path)
    result = cli("probe", path)
    assert result.exit_code == 2
    assert "--model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cli("probe", "--model", "fixtures.depth_models:relu_kaiming", "--input-shape", "3,x").exit_code == 2


def test_probe_on_torchscript_runs_its_graph(cli, tmp_path):
    import warnings

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(depth_models.relu_unit()).save(str(path))
    result = cli("probe", path, "--trust-code", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["format"] == "torchscript" and data["agreement"] < AGREEMENT
    assert {f["rule"] for f in data["findings"]} == {"signal-exploding"}
    assert all(row["scale"] for row in data["layers"]) and all(row["grad_scale"] is None for row in data["layers"])


def test_torchscript_without_one_forward_graph_is_checked_and_refused_by_probe(cli, tmp_path):
    """A scripted nn.LSTM has an overloaded forward (forward__0, forward__1) and no inlined graph: `check` takes
    its layers in module order, `probe` says in one line why it cannot run it (both were internal errors)."""
    import warnings

    path = tmp_path / "lstm.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.LSTM(32, 64, num_layers=2)).save(str(path))
    result = cli("check", path, "--format", "json")
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.stdout)["layers"]] == [
        "weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    refused = cli("probe", path, "--trust-code", "--input-shape", "5,32")
    assert refused.exit_code == 2 and "overloaded" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_probe_on_a_hugging_face_folder_builds_it_from_config_with_its_weights(cli, tmp_path):
    import contextlib
    import io

    model = depth_models.tiny_bert()
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight.mul_(3)  # the folder's own weights are the ones probed
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(tmp_path / "bert")
    result = cli("probe", tmp_path / "bert", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["layers"]}
    assert all(row["scale"] for row in rows.values()) and all(row["grad_norm"] for row in rows.values()
                                                               if row["name"] != "pooler.dense")
    first, second = (rows[f"encoder.layer.{i}.intermediate.dense"]["scale"] for i in (0, 1))
    assert second / first == pytest.approx(3, rel=0.1)


def test_fix_turns_the_vanishing_stack_stable_as_predicted_and_measured(cli, tmp_path):
    path, out = tmp_path / "small.pt", tmp_path / "fixed.pt"
    torch.save(depth_models.relu_small().state_dict(), path)
    factory = ["--model", "fixtures.depth_models:relu_small"]
    assert cli("check", path, *factory).exit_code == 1
    result = cli("fix", path, *factory, "-o", out, "--seed", 0, "--probe")
    assert result.exit_code == 0, result.output
    assert "signal through depth" in result.stdout and "measured forward" in result.stdout
    assert cli("check", out, *factory).exit_code == 0
    probed_after = cli("probe", out, *factory, "--format", "json")
    assert probed_after.exit_code == 0
    assert all(1e-2 <= row["scale"] <= 1e2 and 1e-2 <= row["grad_scale"] <= 1e2
               for row in json.loads(probed_after.stdout)["layers"])


def test_an_input_shape_the_onnx_model_cannot_take_is_refused(cli, tmp_path):
    """--input-shape is the user's word: one that does not fit the ONNX input is an error, not silently dropped."""
    path = export_onnx(depth_models.relu_kaiming(), tmp_path / "mlp.onnx")  # input [1, 64]
    for shape in ("3,3", "32"):
        result = cli("probe", path, "--trust-code", "--input-shape", shape)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert "--input-shape" in line and "does not fit input" in line
    assert cli("probe", path, "--trust-code", "--input-shape", "64", "--format", "json").exit_code == 0


def test_chart_off_a_terminal_is_not_wrapped_padded_or_coloured(cli):
    result = cli("probe", "--model", "fixtures.depth_models:relu_small")
    lines = result.stdout.splitlines()
    assert "\x1b" not in result.stdout and all(line == line.rstrip() for line in lines)
    assert any(line.startswith("log axes;") and line.endswith("at the last hidden layer's") for line in lines)


# ---------------------------------------------------------------- a dead main path (issue 22)

def recipe_probe(name: str):
    from fixtures import depth_recipes

    return probe(load(None, module=getattr(depth_recipes, name)()), Options())


@pytest.mark.parametrize("name, layer", [("relu_mlp_zeroed", "6"), ("conv_chain_zeroed", "4")])
def test_a_zeroed_layer_on_the_main_path_is_where_the_signal_dies(name, layer):
    report = recipe_probe(name)
    (finding,) = [f for f in report.findings if f.severity != "info"]
    assert (finding.rule, finding.layer, finding.severity, finding.origin) == ("signal-vanishing", layer, "error",
                                                                               "measured")
    assert "dies here" in finding.message and report.exit_code() == 1
    rows = {row.name: row for row in report.layers}
    assert rows[layer].scale == 0 and all(row.constant for row in report.layers[[r.name for r in report.layers].index(layer) + 1:])


def test_all_dead_units_kill_the_signal_too():
    from fixtures import depth_recipes

    model = depth_recipes.relu_mlp_kaiming_12()
    with torch.no_grad():
        model[4].bias.fill_(-1e3)  # layer 4's units never fire: what follows sees zeros, puts out its bias
    report = probe(load(None, module=model), Options())
    assert {(f.rule, f.layer, f.severity) for f in report.findings if f.severity != "info"} == \
        {("signal-vanishing", "4", "error")}


@pytest.mark.parametrize("name", ["fixup_resnet", "fixup_mlp", "zero_init_residual_resnet", "dit_adaln_zero",
                                  "rezero_mlp", "relu_mlp_kaiming_12"])
def test_zeros_that_are_recipes_are_not_a_dead_network(name):
    report = recipe_probe(name)
    assert not [f for f in report.findings if f.severity != "info"] and report.exit_code() == 0


def test_the_chart_marks_the_dead_layer(cli):
    result = cli("probe", "--model", "fixtures.depth_recipes:relu_mlp_zeroed")
    assert result.exit_code == 1
    rows = {line.split()[3]: line for line in result.stdout.splitlines() if line.count("│") > 8}
    assert all("✕" in rows[name] for name in ("6", "8", "22"))  # the zeroed layer and those after it: exactly 0
    assert "✕ exactly 0: dead" in result.stdout
    from initaudit.reporters.depth_chart import bar

    assert bar(1.0, 0.0, (-2, 2), (0.01, 100)).plain.startswith("✕")  # 0 has no place on a log axis: its floor
    assert "✕" not in bar(1.0, 1e-6, (-8, 2), (0.01, 100)).plain
