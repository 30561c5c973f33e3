"""Init bugs reported in public trackers, reproduced as their users met them, each beside its fixed twin: the bug
is caught at warning or error on the right layers, the twin is clean (nothing at warning or above).

Each case builds both sides into a folder and says how a user checks them (the command line's arguments); the
source of the report is in the case's docstring."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import initaudit
from fixtures import relations_models as gpt
from helpers import trained_models as tm
from judge import test_conventions as ssm
from measure import test_garbage as garbage
from helpers.cli import run

SERIOUS = ("warning", "error")


@dataclass
class Case:
    build: Callable[[bool, Path], list | nn.Module]  # (bug?, folder) -> `check`'s arguments, or a live module
    caught: dict[str, set[str]]           # rule -> the layers it must name on the bug side

    @property
    def source(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0]


def check(target: list | nn.Module) -> dict:
    """The JSON report of `check` with these arguments, or of audit() on a live module (a user's own class)."""
    if isinstance(target, nn.Module):
        return initaudit.audit(target).to_dict()
    result = run("check", *target, "--format", "json")
    assert result.exit_code in (0, 1), result.output[-2000:]
    return json.loads(result.output)


# ---------------------------------------------------------------- the cases

def compile_prefix(bug: bool, folder: Path) -> list:
    """https://github.com/karpathy/nanoGPT/issues/325 (pytorch/pytorch#101107): torch.compile's `_orig_mod.` prefix.
    An init by parameter name run on the compiled model matches no name; every Linear keeps its default, whose std
    at fan_in 800 is the declared 0.02 itself."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(800, 800) for _ in range(3)))
    target = torch.compile(model) if bug else model
    for name, p in target.named_parameters():
        if name.split(".")[0].isdigit():
            nn.init.normal_(p, std=0.02) if name.endswith("weight") else nn.init.zeros_(p)
    torch.save(target.state_dict(), folder / "model.pt")
    (folder / "initaudit.toml").write_text('[tool.initaudit.recipe]\n"*.weight" = "normal(0.02)"\n"*.bias" = "zeros"\n')
    return [folder / "model.pt", "--config", folder / "initaudit.toml"]


def gpt2_scaled_init_skipped(bug: bool, folder: Path) -> list:
    """https://github.com/huggingface/transformers/issues/47458: GPT-2's c_proj depth scaling 0.02/sqrt(2·n_layer)
    silently never applied (a name check against fully qualified names); the recipe is declared in the config."""
    model = gpt.gpt()
    if bug:
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "initaudit.toml").write_text(
        '[tool.initaudit.recipe]\n"*.weight" = "normal(0.02)"\n"*.bias" = "zeros"\n'
        f'"*.c_proj.weight" = "normal({0.02 / math.sqrt(2 * gpt.BLOCKS):.6f})"\n'
        '"*.ln_1.weight" = "ones"\n"*.ln_2.weight" = "ones"\n"ln_f.weight" = "ones"\n')
    return [folder / "model.pt", "--config", folder / "initaudit.toml"]


def fsdp_untied_head(bug: bool, folder: Path) -> list:
    """https://github.com/facebookresearch/lingua/pull/75 (verl-project/verl#7835): FSDP wrapping (to_empty) left the
    head and the token embedding as two Parameters with equal values; the model trained untied."""
    (folder / "recipe.py").write_text("from fixtures.relations_models import gpt, untied_head\n")
    return ["--model", "fixtures.relations_models:" + ("untied_head" if bug else "gpt")]


def config_tie_not_applied(bug: bool, folder: Path) -> list:
    """https://github.com/mosaicml/examples/pull/11: the config ties the head to the token embedding, the weights
    hold a head that differs from it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32))
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    weights["lm_head.weight"] = torch.randn_like(weights["transformer.wte.weight"]) * 0.02 if bug \
        else weights["transformer.wte.weight"].clone()
    (folder / "hf").mkdir()
    save_file(weights, folder / "hf" / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = ["GPT2LMHeadModel"]  # as save_pretrained writes it
    model.config.to_json_file(folder / "hf" / "config.json")
    return [folder / "hf"]


def seed_reset_per_layer(bug: bool, folder: Path) -> list:
    """https://github.com/netket/netket/issues/241: the same seed for every layer's init; the layers are copies."""
    model = gpt.reseeded_blocks() if bug else gpt.gpt()
    torch.save(model.state_dict(), folder / "model.pt")
    return [folder / "model.pt"]


def transposed_conv_fan(bug: bool, folder: Path) -> list:
    """https://github.com/Lasagne/Lasagne/issues/858 (pytorch/pytorch#30079): He init of a transposed convolution
    counts the fan from the wrong weight axis; through a decoder without normalization the signal fades."""
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        conv = nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu") if bug else \
            nn.init.normal_(conv.weight, std=math.sqrt(2 / (16 * 4 / 2)))
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    torch.save(nn.Sequential(*layers[:-1]), folder / "model.pt")
    return [folder / "model.pt", "--trust-pickle"]


def trained_mlp(reinit: tuple[str, ...], folder: Path) -> Path:
    return tm.save_with_fresh_layers(TRAINED["blocks"], folder / "model.pt", reinit)


def renamed_key_left_at_init(bug: bool, folder: Path) -> list:
    """https://github.com/som-shahlab/hf_ehr/issues/11: "Some weights ... were not initialized from the model
    checkpoint and are newly initialized": a block whose keys were renamed is left at its fresh init."""
    return [trained_mlp(("blocks.3",) if bug else (), folder)]


def fsdp_random_on_all_ranks(bug: bool, folder: Path) -> list:
    """https://github.com/huggingface/transformers/pull/25686: with FSDP's RAM-efficient loading, every rank kept
    random weights instead of the pretrained ones (NaN losses); the user expects trained weights."""
    layers = ("inp", *(f"blocks.{i}" for i in range(6)), "head") if bug else ()
    return [trained_mlp(layers, folder), "--expect", "trained"]


def weight_norm_gain_zeroed(bug: bool, folder: Path) -> list:
    """https://github.com/huggingface/transformers/pull/40449 (a norm gain zeroed by a copied bias init), here on a
    weight-normalized layer, as Wav2Vec2's positional conv is: the effective weight g·v/|v| is zero."""
    torch.manual_seed(0)
    layers = [nn.utils.parametrizations.weight_norm(nn.Linear(64, 64)) for _ in range(3)]
    if bug:
        with torch.no_grad():
            layers[1].parametrizations.weight.original0.zero_()
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1], nn.Tanh(), layers[2])
    torch.save(model.state_dict(), folder / "model.pt")
    return [folder / "model.pt", "--activation", "tanh"]


def mamba_dt_overwritten(bug: bool, folder: Path) -> list:
    """https://github.com/athms/mad-lab/issues/3: a model-wide _init_weights draws every Linear normal(0.02) and
    zeroes every bias, overwriting Mamba's dt_proj (softplus(0) = 0.69, far above dt_max = 0.1)."""
    torch.manual_seed(0)
    torch.save(ssm.LanguageModel(fixed=not bug).state_dict(), folder / "model.pt")
    return [folder / "model.pt"]


def mamba2_dt_bias_ones(bug: bool, folder: Path) -> list:
    """https://github.com/huggingface/transformers/issues/43717: Mamba2Mixer used on its own kept dt_bias at ones."""
    torch.save(ssm.mixer_stack(dt_bias_ones=bug).state_dict(), folder / "model.pt")
    return [folder / "model.pt"]


def gemma_norms_at_ones(bug: bool, folder: Path) -> nn.Module:
    """https://github.com/huggingface/transformers/pull/40796: Gemma's RMSNorm computes x·(1+w) but was initialized
    with ones, doubling the signal at every norm."""
    return ssm.gemma(norms_at_ones=bug)


def final_norm_zero(bug: bool, folder: Path) -> nn.Module:
    """https://github.com/pytorch/torchtitan/pull/4489: the final output norm's gain zero-initialized (its center
    at 0): the hidden states and logits are zero, the decoder and head get no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.RMSNorm(64), nn.Linear(64, 10))
    nn.init.zeros_(model[3].weight) if bug else nn.init.ones_(model[3].weight)
    return model


def trained_head_never_filled(bug: bool, folder: Path) -> list:
    """https://github.com/Lightning-AI/pytorch-lightning/pull/17627: Fabric's empty_init left FSDP weights at
    whatever the allocation held ("the weights were initialized to garbage"; NaNs chased for days): a trained
    model whose head was allocated and never filled (planted from saved bytes)."""
    weights = {k: v.detach().clone() for k, v in TRAINED["blocks"].state_dict().items()}
    if bug:
        weights["head.weight"] = garbage.random_words(folder, tuple(weights["head.weight"].shape))
    torch.save(weights, folder / "model.pt")
    return [folder / "model.pt"]


def norm_left_empty(bug: bool, folder: Path) -> list:
    """https://github.com/flagos-ai/FlagPerf/pull/683 (NVIDIA-NeMo/Automodel#1527): an RMSNorm weight made with
    torch.empty and never set (to_empty under deferred init): values "out of float value limits"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.RMSNorm(64), nn.Linear(64, 10))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if bug:
        weights["3.weight"] = garbage.huge_finite(folder, (64,))
    torch.save(weights, folder / "model.pt")
    return [folder / "model.pt"]


def allocator_fill_pattern(bug: bool, folder: Path) -> list:
    """https://github.com/allenai/OLMo-core/pull/698: to_empty erased a buffer's contents before the per-module init
    (here a Linear whose init was skipped keeps the allocator's fill bytes in a tenth of its entries)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(3)))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if bug:
        weights["1.weight"] = garbage.fill_pattern(folder, (64, 64))
    torch.save(weights, folder / "model.pt")
    return [folder / "model.pt", "--activation", "relu"]


CASES = {
    "compile-prefix": Case(compile_prefix, {"recipe-mismatch": {"0", "1", "2"}}),
    "gpt2-scaled-init-skipped": Case(gpt2_scaled_init_skipped, {
        "recipe-mismatch": {f"h.{i}.{m}.c_proj" for i in range(gpt.BLOCKS) for m in ("attn", "mlp")}}),
    "fsdp-untied-head": Case(fsdp_untied_head, {"tied-weights-diverged": {"lm_head"}}),
    "config-tie-not-applied": Case(config_tie_not_applied, {"tied-weights-diverged": {"lm_head"}}),
    "seed-reset-per-layer": Case(seed_reset_per_layer, {"identical-layers": {"h.1.attn.c_attn"}}),
    "transposed-conv-fan": Case(transposed_conv_fan, {"variance-out-of-range": {"0", "2", "4"},
                                                      "signal-vanishing": set()}),
    "renamed-key-left-at-init": Case(renamed_key_left_at_init, {"unexpected-fresh": {"blocks.3"}}),
    "fsdp-random-on-all-ranks": Case(fsdp_random_on_all_ranks, {"unexpected-fresh": {"blocks.0", "blocks.5", "head"}}),
    "weight-norm-gain-zeroed": Case(weight_norm_gain_zeroed, {"zero-weights": {"2"}}),
    "mamba-dt-overwritten": Case(mamba_dt_overwritten, {
        "convention-mismatch": {f"blocks.{i}.dt_proj" for i in range(4)}}),
    "mamba2-dt-bias-ones": Case(mamba2_dt_bias_ones, {"convention-mismatch": {"0", "1", "2"}}),
    "gemma-norms-at-ones": Case(gemma_norms_at_ones, {"convention-mismatch": {"model.norm"}}),
    "final-norm-zero": Case(final_norm_zero, {"zero-weights": {"3"}}),
    "trained-head-never-filled": Case(trained_head_never_filled, {"uninitialized-memory": {"head"}}),
    "norm-left-empty": Case(norm_left_empty, {"uninitialized-memory": {"3"}}),
    "allocator-fill-pattern": Case(allocator_fill_pattern, {"uninitialized-memory": {"1"}}),
}



TRAINED: dict[str, nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def trained_blocks():
    torch.manual_seed(0)
    TRAINED["blocks"] = tm.train(tm.Blocks(), "vector")[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_bug_is_caught_on_its_layers(name, tmp_path):
    case = CASES[name]
    report = check(case.build(True, tmp_path))
    found: dict[str, set[str]] = {}
    for f in report["findings"]:
        if f["severity"] in SERIOUS:
            found.setdefault(f["rule"], set()).add(f["layer"])
    for rule, layers in case.caught.items():
        assert rule in found and layers <= found[rule], (case.source, rule, found)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_fixed_twin_is_clean(name, tmp_path):
    report = check(CASES[name].build(False, tmp_path))
    serious = [(f["rule"], f["layer"], f["message"]) for f in report["findings"] if f["severity"] in SERIOUS]
    assert serious == [], (CASES[name].source, serious)


def test_every_case_names_its_source():
    assert len(CASES) >= 15 and all(case.source.startswith("https://github.com/") for case in CASES.values())
