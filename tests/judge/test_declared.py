"""Declared recipes and expected states, held against the weights: `recipe-mismatch` (init code that never ran,
through a real torch.compile prefix and a real Hugging Face model) and `unexpected-fresh` (layers left at init
where trained weights were expected)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import initaudit
from helpers import trained_models as tm
from helpers.cli import one_stderr_line, run
from initaudit.common.errors import InputError
from initaudit.measure import recipes

WIDTH = 800  # fan_in where torch's default std, 1/sqrt(3·800) = 0.0204, is the declared 0.02: only the shape differs


def serious(report_or_json) -> set[tuple[str, str]]:
    findings = report_or_json["findings"] if isinstance(report_or_json, dict) else [
        {"rule": f.rule, "layer": f.layer, "severity": f.severity} for f in report_or_json.findings]
    return {(f["rule"], f["layer"]) for f in findings if f["severity"] in ("warning", "error")}


class Stack(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def init_by_name(model: nn.Module) -> None:
    """The per-parameter init users write: normal(0.02) on weights of the blocks, zeros on biases."""
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            with torch.no_grad():
                nn.init.normal_(p, std=0.02) if name.endswith("weight") else nn.init.zeros_(p)


RECIPE = '[tool.initaudit.recipe]\n"*.weight" = "normal(0.02)"\n"*.bias" = "zeros"\n'


@pytest.mark.parametrize("init_before_compile", [False, True])
def test_init_that_missed_every_name_behind_torch_compile(init_before_compile, tmp_path):
    """torch.compile's `_orig_mod.` prefix makes the name check miss every parameter: they keep nn.Linear's
    default, whose std at fan_in 800 is the declared 0.02; only the uniform shape gives it away."""
    torch.manual_seed(0)
    model = Stack()
    if init_before_compile:
        init_by_name(model)
    compiled = torch.compile(model)
    if not init_before_compile:
        init_by_name(compiled)  # every name is '_orig_mod.blocks.…': nothing is initialized
    torch.save(compiled.state_dict(), tmp_path / "model.pt")
    (tmp_path / "initaudit.toml").write_text(RECIPE)
    result = run("check", tmp_path / "model.pt", "--config", tmp_path / "initaudit.toml", "--format", "json")
    report = json.loads(result.output)
    mismatched = {f["tensor"] for f in report["findings"] if f["rule"] == "recipe-mismatch" and f["severity"] == "error"}
    if init_before_compile:
        assert mismatched == set() and result.exit_code == 0, result.output[-1500:]
    else:
        assert mismatched == {f"blocks.{i}.{t}" for i in range(3) for t in ("weight", "bias")}
        message = next(f["message"] for f in report["findings"] if f["tensor"] == "blocks.0.weight"
                       and f["rule"] == "recipe-mismatch")
        assert "not a normal draw" in message and "torch-default" in message
    assert report["recipe"] == [{"source": "[tool.initaudit] recipe",
                                 "patterns": {"*.weight": "normal(0.02)", "*.bias": "zeros"}}]


def test_fix_draws_the_declared_recipe(tmp_path):
    torch.manual_seed(0)
    torch.save(Stack().state_dict(), tmp_path / "model.pt")
    (tmp_path / "initaudit.toml").write_text(RECIPE)
    config = ("--config", tmp_path / "initaudit.toml")
    fixed = run("fix", tmp_path / "model.pt", "-o", tmp_path / "fixed.pt", "--seed", 0, *config)
    assert fixed.exit_code == 0, fixed.output
    weights = torch.load(tmp_path / "fixed.pt")
    assert weights["blocks.1.weight"].std().item() == pytest.approx(0.02, rel=0.01)
    assert not weights["blocks.1.bias"].any()
    assert run("check", tmp_path / "fixed.pt", *config).exit_code == 0


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=300, n_positions=32))


def test_a_hugging_face_model_follows_its_initializer_range(tmp_path):
    """A fresh GPT-2 fits what its family's init declares (normal(0.02), c_proj at 0.02/sqrt(2·n_layer), LayerNorms
    ones and zeros); a layer replaced after post_init() keeps torch's default and contradicts it, as a live model and
    as a folder (read from config.json, built on the meta device)."""
    model = tiny_gpt2()
    assert not {r for r, _ in serious(initaudit.audit(model))} & {"recipe-mismatch"}
    model.transformer.h[2].mlp.c_fc = nn.Linear(64, 256)  # swapped in after post_init: nn.Linear's default
    found = {layer for rule, layer in serious(initaudit.audit(model)) if rule == "recipe-mismatch"}
    assert found == {"transformer.h.2.mlp.c_fc"}
    model.save_pretrained(tmp_path / "hf")
    report = json.loads(run("check", tmp_path / "hf", "--format", "json").output)
    assert {layer for rule, layer in serious(report) if rule == "recipe-mismatch"} == {"transformer.h.2.mlp.c_fc"}
    (declared,) = report["recipe"]
    assert declared["source"] == "the model family's own init" and declared["tensors"] >= 4 * 12  # every block's



@pytest.fixture(scope="module")
def trained_blocks():
    torch.manual_seed(0)
    return tm.train(tm.Blocks(), "vector")[0]


def test_a_block_left_at_init_in_a_trained_model_is_a_warning(trained_blocks, tmp_path):
    clean = initaudit.audit(tm.save_with_fresh_layers(trained_blocks, tmp_path / "clean.pt"))
    assert clean.weights_state == "trained" and not serious(clean)
    left = initaudit.audit(tm.save_with_fresh_layers(trained_blocks, tmp_path / "left.pt", ("blocks.3",)))
    assert [(f.rule, f.layer, f.severity) for f in left.findings if f.severity != "info"] == [
        ("unexpected-fresh", "blocks.3", "warning")]


def test_declared_trained_makes_it_an_error_and_a_fresh_head_is_allowed(trained_blocks, tmp_path):
    path = tm.save_with_fresh_layers(trained_blocks, tmp_path / "model.pt", ("blocks.3", "head"))
    declared = run("check", path, "--expect", "trained", "--format", "json")
    assert declared.exit_code == 1
    assert {(f["layer"], f["severity"]) for f in json.loads(declared.output)["findings"]
            if f["rule"] == "unexpected-fresh"} == {("blocks.3", "error"), ("head", "error")}
    (tmp_path / "initaudit.toml").write_text('[tool.initaudit.expect]\n"*" = "trained"\n"head" = "fresh"\n')
    report = json.loads(run("check", path, "--config", tmp_path / "initaudit.toml", "--format", "json").output)
    assert {f["layer"] for f in report["findings"] if f["rule"] == "unexpected-fresh"} == {"blocks.3"}
    assert report["expect"] == {"*": "trained", "head": "fresh"}


def test_a_fresh_model_is_not_unexpected_without_a_declaration(tmp_path):
    torch.manual_seed(0)
    report = initaudit.audit(tm.save_with_fresh_layers(tm.Blocks(), tmp_path / "fresh.pt"))
    assert report.weights_state == "fresh"
    assert "unexpected-fresh" not in {f.rule for f in report.findings}


@pytest.mark.parametrize("text, shape, std", [
    ("normal(0.02)", "normal", 0.02), ("normal_(mean=0, std=0.5)", "normal", 0.5),
    ("uniform(-0.3, 0.3)", "uniform", 0.3 / math.sqrt(3)), ("xavier_uniform(gain=1)", "uniform", math.sqrt(2 / 300)),
    ("kaiming_normal(mode=fan_out, nonlinearity=relu)", "normal", math.sqrt(2 / 200)),
    ("orthogonal", "normal", 1 / math.sqrt(200)), ("zeros", "constant", 0.0),
])
def test_recipe_grammar(text, shape, std):
    got_shape, got_std, _ = recipes.parse(text).expected(100, 200)
    assert got_shape == shape and got_std == pytest.approx(std)


def test_truncated_normal_recipe_knows_its_own_std_and_shape():
    recipe = recipes.parse("trunc_normal(1.0, -2, 2)")
    shape, std, _ = recipe.expected(10, 10)
    assert shape == "trunc" and std == pytest.approx(0.8796, abs=1e-3)  # timm's fact: std·0.88 at ±2σ
    torch.manual_seed(0)
    w = torch.empty(200, 200)
    nn.init.trunc_normal_(w, std=1.0, a=-2, b=2)
    kurtosis = float(((w - w.mean()) ** 4).mean() / w.var(correction=0) ** 2 - 3)
    assert recipes.contradiction(recipe, std=float(w.std()), mean=float(w.mean()), kurtosis=kurtosis, values=w.numel(),
                                 constant=False, value=None, fan_in=200, fan_out=200) is None
    nn.init.normal_(w, std=0.88)
    kurtosis = float(((w - w.mean()) ** 4).mean() / w.var(correction=0) ** 2 - 3)
    assert "not a trunc draw" in recipes.contradiction(recipe, std=float(w.std()), mean=0.0, kurtosis=kurtosis,
                                                       values=w.numel(), constant=False, value=None, fan_in=200,
                                                       fan_out=200)


@pytest.mark.parametrize("table, fragment", [
    ('[tool.initaudit.recipe]\n"*" = "normal(std=relu)"\n', "std must be a number"),
    ('[tool.initaudit.recipe]\n"*" = "__import__(\'os\')"\n', "unknown init"),
    ('[tool.initaudit.recipe]\n"*" = "kaiming_normal(mode=fan)"\n', "mode must be one of fan_in, fan_out"),
    ('[tool.initaudit]\nexpect = "tranied"\n', "must be one of trained, fresh"),
])
def test_a_bad_declaration_is_one_line_and_exit_2(table, fragment, tmp_path):
    torch.save(nn.Linear(4, 4).state_dict(), tmp_path / "m.pt")
    (tmp_path / "initaudit.toml").write_text(table)
    result = run("check", tmp_path / "m.pt", "--config", tmp_path / "initaudit.toml")
    assert result.exit_code == 2 and fragment in one_stderr_line(result)


def test_parse_refuses_what_is_not_a_call():
    with pytest.raises(InputError):
        recipes.parse("normal(0.02); import os")
