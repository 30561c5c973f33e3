"""Fresh or trained: models trained here for a few hundred steps are told from fresh ones, keep their
health findings, lose their init-scheme warnings, and `fix` never re-draws them without --force."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import initaudit
from fixtures import models
from helpers import trained_models as tm
from helpers.formats import save_as
from helpers.verdicts import serious

NAMES = sorted(tm.BUILDERS)
SCHEME_RULES = {"init-activation-mismatch", "variance-out-of-range"}
FORMATS = ("state_dict", "checkpoint", "safetensors", "torchscript")
HIDDEN = "4"  # a hidden Linear of the trained MLPs


@pytest.fixture(scope="session")
def trained():
    """Each model trained once per session (a few seconds each), with its optimizer."""
    cache: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tm.trained(name)
        return cache[name]

    return get


def save(model: torch.nn.Module, fmt: str, folder, optimizer=None):
    """The model in a format users hold; a checkpoint carries the optimizer's state and step counters."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fmt == "state_dict":
        torch.save(state, folder / "model.pt")
        return folder / "model.pt"
    if fmt == "checkpoint":
        torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 2,
                    "global_step": tm.STEPS}, folder / "last.ckpt")
        return folder / "last.ckpt"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
        return folder / "model.safetensors"
    torch.jit.script(model).save(str(folder / "scripted.pt"))
    return folder / "scripted.pt"


def states(report) -> dict[str, str]:
    return {row.name: row.state for row in report.layers}


@pytest.mark.parametrize("name", NAMES)
def test_trained_models_are_reported_trained(name, trained):
    model, _ = trained(name)
    report = initaudit.audit(model)
    layer_states = states(report)
    assert report.weights_state == "trained", report.state_evidence
    assert sum(s == "trained" for s in layer_states.values()) >= len(layer_states) / 2, layer_states
    assert "fresh" not in layer_states.values() or name == "weight_decay", layer_states
    assert report.summary["errors"] == 0, serious(report)
    assert not {rule for rule, _, _ in serious(report)} & SCHEME_RULES
    assert any("look trained" in note for note in report.notes)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_copies_are_fresh(name):
    report = initaudit.audit(tm.fresh(name, seed=5))
    assert report.weights_state == "fresh", report.state_evidence
    assert "trained" not in states(report).values()
    assert report.state_evidence["layers"]["fresh"] >= 1
    assert not any("look trained" in note for note in report.notes)


def test_scheme_rules_fire_on_fresh_and_are_set_aside_on_trained(trained):
    """The deep ReLU MLP at torch's default init: warned fresh, not trained, and the report says why."""
    fresh = initaudit.audit(tm.fresh("mlp"), activation="relu")
    assert {rule for rule, _, sev in serious(fresh) if sev == "warning"} & SCHEME_RULES
    report = initaudit.audit(trained("mlp")[0], activation="relu")
    assert not {rule for rule, _, _ in serious(report)} & SCHEME_RULES
    aside = report.state_evidence["rules_set_aside"]
    assert set(aside) & SCHEME_RULES
    note = next(n for n in report.notes if "look trained" in n)
    assert all(rule in note for rule in aside)


def test_biases_speak_of_init_only_on_fresh_layers(trained):
    """torch's default bias draw is non-zero (info on fresh layers); training moves every bias, so on
    trained layers nonzero-bias keeps quiet and the note names it among the rules set aside."""
    fresh = initaudit.audit(tm.fresh("mlp"), activation="relu")
    assert any(f.rule == "nonzero-bias" for f in fresh.findings)
    report = initaudit.audit(trained("mlp")[0], activation="relu")
    on_trained = {layer for layer, state in states(report).items() if state == "trained"}
    assert on_trained
    assert not [f for f in report.findings if f.rule == "nonzero-bias" and f.layer in on_trained]
    assert "nonzero-bias" in report.state_evidence["rules_set_aside"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_same_verdict_in_every_format(name, fmt, trained, tmp_path):
    model, optimizer = trained(name)
    report = initaudit.audit(save(model, fmt, tmp_path, optimizer))
    assert report.weights_state == "trained"
    assert report.summary["errors"] == 0, serious(report)
    assert not {rule for rule, _, _ in serious(report)} & SCHEME_RULES
    assert states(report) == states(initaudit.audit(model))
    if fmt == "checkpoint":
        signs = " ".join(report.state_evidence["file_signs"])
        assert "optimizer state" in signs and f"global_step = {tm.STEPS}" in signs


def _planted(model: torch.nn.Module, fault: str) -> dict[str, torch.Tensor]:
    """A copy of the model's state_dict with a fault planted in one hidden layer."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = state[f"{HIDDEN}.weight"]
    if fault == "nan":
        w[3, 5] = float("nan")
    elif fault == "zeroed":
        w.zero_()
    elif fault == "constant":
        w.fill_(0.05)
    elif fault == "duplicated":
        w[1:4] = w[0]
    elif fault == "spike":
        w[2, 2] = 1e4
    return state


FAULTS = {"nan": ("non-finite", "error"), "zeroed": ("zero-weights", "error"),
          "constant": ("constant-weights", "error"), "duplicated": ("duplicate-units", "warning"),
          "spike": ("weight-spike", "error")}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_faults_are_found_on_trained_weights(fault, trained, tmp_path):
    torch.save(_planted(trained("mlp")[0], fault), tmp_path / "model.pt")
    report = initaudit.audit(tmp_path / "model.pt")
    assert report.weights_state == "trained"
    assert serious(report) == {(*FAULTS[fault][:1], HIDDEN, FAULTS[fault][1])}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fix_refuses_trained_weights_without_force(fault, trained, tmp_path, cli):
    path, out = tmp_path / "model.pt", tmp_path / "fixed.pt"
    torch.save(_planted(trained("mlp")[0], fault), path)
    refused = cli("fix", path, "-o", out, "--seed", 0)
    assert refused.exit_code == 2
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"({HIDDEN})" in lines[0] and "--force" in lines[0], lines
    assert not out.exists()
    assert cli("fix", path, "--dry-run", "--seed", 0).exit_code == 2

    dry = cli("fix", path, "--dry-run", "--force", "--seed", 0)
    assert dry.exit_code == 0 and f"{HIDDEN}.weight" in dry.output and not out.exists()
    forced = cli("fix", path, "-o", out, "--force", "--seed", 0)
    assert forced.exit_code == 0, forced.output
    assert "findings on the re-drawn layers are gone, none left" in forced.output
    old, new = torch.load(path), torch.load(out)
    changed = {k for k in old if not torch.equal(old[k].nan_to_num(), new[k].nan_to_num())}
    assert changed and all(k.startswith(f"{HIDDEN}.") for k in changed), changed
    assert serious(initaudit.audit(out)) == set()


def test_force_on_trained_duplicates_redraws_only_the_copies(trained, tmp_path, cli):
    path, out = tmp_path / "model.pt", tmp_path / "fixed.pt"
    torch.save(_planted(trained("mlp")[0], "duplicated"), path)
    assert cli("fix", path, "-o", out, "--force", "--seed", 0).exit_code == 0
    old, new = torch.load(path)[f"{HIDDEN}.weight"], torch.load(out)[f"{HIDDEN}.weight"]
    changed = {u for u in range(old.shape[0]) if not torch.equal(old[u], new[u])}
    assert changed == {1, 2, 3}
    assert serious(initaudit.audit(out)) == set()


def test_output_layer_of_trained_weights_is_kept_unless_named(trained, tmp_path, cli):
    state = {k: v.detach().clone() for k, v in trained("mlp")[0].state_dict().items()}
    last = max(int(k.split(".")[0]) for k in state)
    state[f"{last}.weight"].zero_()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    kept = cli("fix", path, "-o", tmp_path / "a.pt", "--force")
    assert kept.exit_code == 1 and "output layer" in kept.output
    assert not (tmp_path / "a.pt").exists()  # nothing re-drawn: nothing written
    named = cli("fix", path, "-o", tmp_path / "b.pt", "--force", "--only", str(last))
    assert named.exit_code == 0, named.output
    assert torch.load(tmp_path / "b.pt")[f"{last}.weight"].abs().sum() > 0


@pytest.mark.parametrize("share, expected", [(0.25, set()), (0.6, {("dead-units", HIDDEN, "warning")})])
def test_dead_units_on_trained_weights_only_by_a_large_share(share, expected, trained, tmp_path):
    state = {k: v.detach().clone() for k, v in trained("mlp")[0].state_dict().items()}
    dead = int(share * state[f"{HIDDEN}.weight"].shape[0])
    state[f"{HIDDEN}.weight"][:dead] = 0
    state[f"{HIDDEN}.bias"][:dead] = -0.1
    torch.save(state, tmp_path / "model.pt")
    report = initaudit.audit(tmp_path / "model.pt", activation="relu")
    assert report.weights_state == "trained"
    assert serious(report) == expected


def test_near_zero_units_of_weight_decay_are_not_duplicates(trained):
    model = trained("weight_decay")[0]
    fresh = tm.fresh("weight_decay")
    for m in (model, fresh):
        with torch.no_grad():
            m[2].weight[:3] = torch.randn(3, m[2].weight.shape[1]) * 1e-9  # units decayed to nothing
    assert not any(f.rule == "duplicate-units" for f in initaudit.audit(model).findings)
    # on weights taken as fresh the same near-zero units are copies of each other
    assert ("duplicate-units", "2", "warning") in serious(initaudit.audit(fresh, state="fresh"))


@pytest.mark.parametrize("name, layer, rule", [("zero_layer", "4", "zero-weights"), ("ones_layer", "2", "constant-weights"),
                                               ("duplicate_filters", "features.8", "duplicate-units")])
def test_fix_on_a_bare_file_falls_back_when_the_activation_is_unknown(name, layer, rule, tmp_path, cli):
    path, _ = save_as(getattr(models, name)(), "state_dict", tmp_path)
    before = initaudit.audit(path)
    assert (rule, layer) in {(r, lay) for r, lay, _ in serious(before)}
    out = tmp_path / "fixed.pt"
    result = cli("fix", path, "-o", out, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "fallback" in result.output and "none left" in result.output
    assert (rule, layer) not in {(r, lay) for r, lay, _ in serious(initaudit.audit(out))}
    old, new = torch.load(path), torch.load(out)
    assert {k.rsplit(".", 1)[0] for k in old if not torch.equal(old[k], new[k])} == {layer}


def test_trained_bare_file_falls_back_to_torch_default_with_force(trained, tmp_path, cli):
    torch.save(_planted(trained("mlp")[0], "constant"), tmp_path / "model.pt")
    result = cli("fix", tmp_path / "model.pt", "-o", tmp_path / "fixed.pt", "--force", "--seed", 1)
    assert result.exit_code == 0, result.output
    assert "kaiming_uniform_(a=2.23606797749979)" in result.output  # torch's default for Linear


def test_state_override_and_json_fields(tmp_path, cli):
    path, _ = save_as(tm.fresh("mlp"), "state_dict", tmp_path)
    fresh = json.loads(cli("check", path, "--activation", "relu", "--format", "json").output)
    assert fresh["weights_state"] == "fresh" and {row["state"] for row in fresh["layers"]} == {"fresh"}
    assert fresh["state_evidence"]["layers"]["fresh"] == len(fresh["layers"])
    assert any(f["rule"] == "variance-out-of-range" and f["severity"] == "warning" for f in fresh["findings"])
    forced = cli("check", path, "--activation", "relu", "--state", "trained", "--fail-on", "warning")
    assert forced.exit_code == 0 and "taken as trained" in forced.output
    assert initaudit.audit(path, state="trained").summary["warnings"] == 0


def test_small_tensors_cannot_tell_and_file_signs_decide(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    bare = initaudit.audit(tmp_path / "bare.pt")
    assert set(states(bare).values()) == {"unknown"} and bare.weights_state == "unknown"
    assert all("too few" in v["reason"] for v in bare.state_evidence["tensors"].values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, tmp_path / "ckpt.pt")
    assert initaudit.audit(tmp_path / "ckpt.pt").weights_state == "trained"


@pytest.mark.parametrize("state", ["trained", "fresh"])
def test_a_super_weight_is_information_on_trained_weights_only(state, trained, tmp_path):
    """A learned entry 100 std from the rest (half a layer's variance, as "super weights" hold) is info on
    trained weights; the very same spike on fresh weights, which no init draws, stays an error."""
    model = trained("mlp")[0] if state == "trained" else tm.fresh("mlp")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = weights[f"{HIDDEN}.weight"]
    w[2, 2] = w.mean() + 100 * w.std()
    torch.save(weights, tmp_path / "model.pt")
    report = initaudit.audit(tmp_path / "model.pt")
    spikes = [f for f in report.findings if f.rule == "weight-spike"]
    assert [(f.layer, f.severity) for f in spikes] == [(HIDDEN, "info" if state == "trained" else "error")]
    assert "super weight" in spikes[0].message


class MaskedConv2d(torch.nn.Conv2d):
    """PixelCNN's masked convolution as its common ports write it: the kernel's future positions zeroed in place."""

    def __init__(self, mask_type: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _, _, h, w = self.weight.shape
        with torch.no_grad():
            self.weight[:, :, h // 2, w // 2 + (mask_type == "B"):] = 0
            self.weight[:, :, h // 2 + 1:] = 0


def pixelcnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [MaskedConv2d("A", 1, 64, 7, padding=3, bias=False), torch.nn.ReLU()]
    for _ in range(4):
        layers += [MaskedConv2d("B", 64, 64, 7, padding=3, bias=False), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(64, 256, 1))


def test_a_masked_convs_zeroed_positions_are_a_mask_not_training(tmp_path):
    """Half of each kernel is zero for every unit (PixelCNN's causal mask): the inputs no unit reads are left out
    of the per-input and spectrum tests, so a fresh PixelCNN is fresh; the same layers after a rank-4 update of
    their unmasked entries (what training leaves) are still trained."""
    fresh = pixelcnn()
    path = tmp_path / "pixelcnn.pt"
    torch.save(fresh.state_dict(), path)
    assert initaudit.audit(path).weights_state == "fresh"
    updated = pixelcnn()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in updated:
            if isinstance(m, MaskedConv2d):
                w = m.weight.view(m.weight.shape[0], -1)
                u, v = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
                w += (u @ v) * (w != 0) * w.std() * 0.5
    torch.save(updated.state_dict(), path)
    assert initaudit.audit(path).weights_state == "trained"
