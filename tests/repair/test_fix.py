"""`initaudit fix`: check → fix → check is clean, in every format; untouched tensors are bit-identical."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open

import initaudit
from fixtures import models
from helpers.cli import one_error_line
from helpers.formats import BARE, export_onnx, save_as
from helpers.verdicts import EXPECTED, serious

FILE_FORMATS = ("state_dict", "checkpoint", "safetensors", "torchscript", "pickled_module", "onnx")
FAULTY = sorted(name for name, (_, expected) in EXPECTED.items() if expected)


def args_for(fmt: str, activation: str) -> list[str]:
    return (["--activation", activation] if fmt in BARE else []) + (["--trust-pickle"] if fmt == "pickled_module" else [])


def tensors_of(path, fmt) -> dict[str, torch.Tensor]:
    """Every tensor of a written file, by its name in the file."""
    if fmt == "safetensors":
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if fmt == "torchscript":
        return dict(torch.jit.load(str(path)).state_dict())
    if fmt == "onnx":
        model = onnx.load(str(path))
        return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    obj = torch.load(path, weights_only=fmt != "pickled_module")
    if fmt == "pickled_module":
        return dict(obj.state_dict())
    if fmt == "checkpoint":
        return obj["state_dict"]
    return obj


@pytest.mark.parametrize("fmt", FILE_FORMATS)
@pytest.mark.parametrize("name", FAULTY)
def test_check_fix_check_is_clean(name, fmt, tmp_path, cli):
    activation, expected = EXPECTED[name]
    path, _ = save_as(getattr(models, name)(), fmt, tmp_path)
    before = path.read_bytes()
    extra = args_for(fmt, activation)
    assert cli("check", path, "--fail-on", "warning", *extra).exit_code == 1
    out = tmp_path / f"fixed{path.suffix}"
    result = cli("fix", path, "-o", out, "--seed", 1, *extra)
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == before  # the input is never written
    again = cli("check", out, "--fail-on", "warning", *extra)
    assert again.exit_code == 0, again.output
    report = initaudit.audit(out, trust_pickle=fmt == "pickled_module", activation=activation if fmt in BARE else None)
    assert serious(report) == set()
    # untouched tensors are bit-identical; only the flagged layers changed
    old, new = tensors_of(path, fmt), tensors_of(out, fmt)
    assert old.keys() == new.keys()
    changed = {k for k in old if not (old[k].dtype == new[k].dtype and torch.equal(old[k], new[k]))}
    assert changed, "nothing was rewritten"
    flagged = {layer for _, layer, _ in expected}
    assert all(any(k.replace("module.", "").startswith(f"{layer}.") for layer in flagged) or "onnx::" in k
               for k in changed), changed


def test_checkpoint_structure_is_kept(tmp_path, cli):
    path, _ = save_as(models.zero_layer(), "checkpoint", tmp_path)
    out = tmp_path / "fixed.ckpt"
    assert cli("fix", path, "-o", out, "--activation", "relu").exit_code == 0
    old, new = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    assert new["epoch"] == 3 and new["optimizer"] == {"lr": 0.1}
    assert list(new["state_dict"]) == list(old["state_dict"])  # keys, order and the DDP prefix
    assert all(new["state_dict"][k].dtype == old["state_dict"][k].dtype for k in old["state_dict"])


def test_safetensors_metadata_and_dtypes_are_kept(tmp_path, cli):
    from safetensors.torch import save_file

    state = {k: v.half() for k, v in models.zero_layer().state_dict().items()}
    path = tmp_path / "half.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "author": "me"})
    out = tmp_path / "fixed.safetensors"
    assert cli("fix", path, "-o", out, "--activation", "relu").exit_code == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "author": "me"}
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert float(f.get_tensor("4.weight").float().std()) == pytest.approx((2 / 128) ** 0.5, rel=0.05)


def test_onnx_external_data_stays_external_and_shared_zero_biases_are_left(tmp_path, cli):

    exported = export_onnx(models.zero_layer(), tmp_path / "exported.onnx")
    src = tmp_path / "ext"
    src.mkdir()
    onnx.save(onnx.load(str(exported)), str(src / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    data_before = (src / "model.onnx.data").read_bytes()
    result = cli("fix", src / "model.onnx", "--in-place", "--seed", 3)
    assert result.exit_code == 0, result.output
    assert (src / "model.onnx.data").read_bytes() == data_before  # the old data file is not reused
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.2.data"}
    assert serious(initaudit.audit(src / "model.onnx")) == set()
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(exported)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src / "model.onnx")).graph.initializer}
    assert [k for k in before if not np.array_equal(before[k], after[k])] == ["4.weight"]
    # the rewritten model still runs, and its zero layer now passes a signal on
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(0).normal(size=(2, models.INPUTS)).astype(np.float32)  # the exported batch size
    sessions = [ort.InferenceSession(str(p)) for p in (exported, src / "model.onnx")]
    outputs = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions]
    assert outputs[0].shape == outputs[1].shape and np.isfinite(outputs[1]).all()
    assert np.ptp(outputs[0], axis=0).max() < 1e-6 < np.ptp(outputs[1], axis=0).max()  # constant before, varies after


def test_dry_run_writes_nothing_and_seed_reproduces(tmp_path, cli):
    path, _ = save_as(models.deep_relu_xavier(), "state_dict", tmp_path)
    result = cli("fix", path, "--dry-run", "--activation", "relu")
    assert result.exit_code == 0 and "would re-initialize" in result.output and "kaiming-normal" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    for name, seed in (("a.pt", 7), ("b.pt", 7), ("c.pt", 8)):
        assert cli("fix", path, "-o", tmp_path / name, "--seed", seed, "--activation", "relu").exit_code == 0
    a, b, c = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt", "c.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["2.weight"], c["2.weight"])


def test_input_is_never_overwritten_without_in_place(tmp_path, cli):

    path, _ = save_as(models.zero_layer(), "state_dict", tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert "-o OUT" in one_error_line(cli("fix", path, "--activation", "relu"))
    assert "--in-place" in one_error_line(cli("fix", path, "-o", path, "--activation", "relu"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert cli("fix", path, "--in-place", "--activation", "relu").exit_code == 0
    assert serious(initaudit.audit(path, activation="relu")) == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, cli, monkeypatch):
    path, _ = save_as(models.zero_layer(), "state_dict", tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        [tmp] = tmp_path.glob(".model.pt.*.initaudit-tmp")  # the file being written, beside the target
        with open(tmp, "r+b") as handle:
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    assert cli("fix", path, "--in-place", "--activation", "relu").exit_code == 130  # "interrupted"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_layers_that_cannot_be_redrawn_are_reported_not_guessed(tmp_path, cli):
    path, _ = save_as(models.zero_layer(), "state_dict", tmp_path)
    result = cli("fix", path, "-o", tmp_path / "out.pt")  # a bare state_dict, no --activation: the documented fallback
    assert result.exit_code == 0 and "(fallback)" in result.output and "kaiming_normal_" in result.output

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    torch.nn.init.zeros_(model.a.weight)
    result = initaudit.fix(model, seed=0)
    assert [s.layer for s in result.skipped] == ["a"] and "shared" in result.skipped[0].reason
    assert float(model.a.weight.detach().abs().sum()) == 0  # not guessed


def test_only_and_all_choose_layers(tmp_path, cli):
    model = models.deep_relu_kaiming()
    changed = initaudit.fix(model, only=["0", "4"], seed=0)
    assert {c.layer for c in changed} == {"0", "4"}
    model = models.deep_relu_kaiming()
    assert {c.layer for c in initaudit.fix(model, all_layers=True, seed=0)} == {str(2 * i) for i in range(12)}


def test_fix_api_repairs_a_module_in_place():
    model = models.deep_tanh_kaiming()
    result = initaudit.fix(model, seed=0)
    assert {c.layer for c in result if c.tensor.endswith("weight")} == {str(2 * i) for i in range(11)}
    assert {c.new_scheme for c in result if c.tensor.endswith("weight")} == {"xavier-uniform"}
    assert serious(initaudit.audit(model)) == set()


# ---------------------------------------------------------------- training

def train(model: torch.nn.Module, steps: int = 150) -> list[float]:
    """A few Adam steps on a fixed synthetic regression task (targets from a random teacher)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, models.INPUTS, generator=gen)
    teacher = torch.randn(models.INPUTS, models.CLASSES, generator=gen) / models.INPUTS ** 0.5
    y = torch.tanh(x @ teacher) * 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_stalls_before_the_fix_and_learns_after():
    torch.manual_seed(0)
    stalled = train(models.zero_layer())
    fixed_model = models.zero_layer()
    initaudit.fix(fixed_model, seed=0)
    learned = train(fixed_model)
    # a zero layer passes nothing on and gets no gradient through ReLU: only the output bias learns
    assert stalled[-1] > 0.9 * min(stalled[:10])
    assert learned[-1] < 0.25 * stalled[-1]


def test_training_goes_nan_before_the_fix_and_learns_after():
    assert np.isnan(train(models.nan_layer(), steps=5)).all()
    model = models.nan_layer()
    initaudit.fix(model, seed=0)
    losses = train(model)
    assert np.isfinite(losses).all() and losses[-1] < 0.25 * losses[0]


def test_fix_with_the_architecture_from_code_writes_the_checkpoint_format(tmp_path, cli):
    path, _ = save_as(models.zero_layer(), "checkpoint", tmp_path)
    out = tmp_path / "fixed.ckpt"
    factory = "fixtures.models:mlp_factory_for_tests"
    assert cli("fix", path, "--model", factory, "-o", out, "--seed", 0).exit_code == 0
    assert set(torch.load(out, weights_only=True)) == {"epoch", "optimizer", "state_dict"}
    assert serious(initaudit.audit(out, model=factory)) == set()
    assert "initaudit.fix(module)" in cli("fix", "--model", factory).output


def test_output_must_be_a_file_name_for_a_file(tmp_path, cli):

    path, _ = save_as(models.zero_layer(), "state_dict", tmp_path)
    (tmp_path / "folder").mkdir()
    assert "a folder" in one_error_line(cli("fix", path, "-o", tmp_path / "folder", "--activation", "relu"))
    assert "no such folder" in one_error_line(cli("fix", path, "-o", tmp_path / "nowhere" / "x.pt", "--activation", "relu"))


def test_written_files_keep_the_input_mode_or_follow_the_umask(tmp_path, cli):
    import os
    import stat

    path, _ = save_as(models.zero_layer(), "state_dict", tmp_path)
    os.chmod(path, 0o640)
    assert cli("fix", path, "--in-place", "--activation", "relu").exit_code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    umask = os.umask(0o022)
    try:
        assert cli("fix", path, "-o", tmp_path / "new.pt", "--all", "--activation", "relu").exit_code == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == 0o644


@pytest.mark.parametrize("init, kwargs, scheme, gain", [
    (torch.nn.init.xavier_uniform_, {"gain": 5 / 3}, "xavier-uniform-tanh-gain", 5 / 3),
    (torch.nn.init.kaiming_normal_, {"mode": "fan_out", "nonlinearity": "relu"}, "kaiming-normal-fan-out", 2 ** 0.5),
])
def test_fallback_redraws_with_the_scheme_the_rest_of_the_model_uses(init, kwargs, scheme, gain, tmp_path, cli):
    torch.manual_seed(0)
    widths = [256, 384, 256, 384, 256, 384]
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    state = {}
    for i, layer in enumerate(layers):
        init(layer.weight, **kwargs)
        state[f"{i}.weight"], state[f"{i}.bias"] = layer.weight.detach(), torch.zeros(layer.out_features)
    state["2.weight"] = torch.zeros_like(state["2.weight"])
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    out = tmp_path / "out.pt"
    result = cli("fix", path, "-o", out)  # activations unknown: the model's own scheme
    assert result.exit_code == 0, result.output
    new = torch.load(out)["2.weight"]
    fan_in, fan_out = new.shape[1], new.shape[0]
    expected = gain * (2 / (fan_in + fan_out)) ** 0.5 if scheme.startswith("xavier") else gain / fan_out ** 0.5
    assert abs(float(new.std()) / expected - 1) < 0.03
    assert scheme in result.output and "(fallback)" in result.output


def test_fallback_takes_the_scheme_of_the_same_layer_in_the_other_blocks(tmp_path, cli):
    """GPT-2 as a bare safetensors file: no scheme holds most of the model (normal 0.02 on c_attn/c_fc/lm_head,
    0.02/sqrt(2·n_layer) on c_proj), so a zeroed c_fc and c_proj are drawn like their namesakes in the other
    blocks, each with its own std."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_model

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=1000,
                                                                 n_positions=64, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.zero_()
        model.transformer.h[2].mlp.c_proj.weight.zero_()
    path, out = tmp_path / "gpt2.safetensors", tmp_path / "fixed.safetensors"
    save_model(model, str(path))
    result = cli("fix", path, "-o", out)
    assert result.exit_code == 0, result.output
    fixed = load_file(out)
    assert float(fixed["transformer.h.1.mlp.c_fc.weight"].std()) == pytest.approx(0.02, rel=0.03)
    assert float(fixed["transformer.h.2.mlp.c_proj.weight"].std()) == pytest.approx(0.02 / 8 ** 0.5, rel=0.03)
    assert "normal-0.02-scaled (fallback)" in result.output
