"""The cross-tensor rules on the bugs behind them, each beside its fixed twin (fixtures/relations_models.py: a
nanoGPT-like GPT; transformers' GPT-2 for declared ties):

- IA501 tied-weights-diverged: a head tied to its embedding that a copy or a re-draw made into two tensors
  (nanoGPT's `self.transformer.wte.weight = self.lm_head.weight` undone by FSDP wrapping or a re-init:
  pytorch/pytorch#86270-style reports, transformers' `tie_word_embeddings` checkpoints whose head differs);
- IA502 sibling-scale-mismatch: GPT-2's 1/√(2L) depth scaling applied to `c_fc` of some blocks instead of
  `c_proj` of every block; per-layer depth scaling (OLMo, torchtitan: 0.02/√(2(l+1))) is a recipe;
- IA503 identical-layers: the seed reset before each block's init.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fixtures import relations_models as models
from helpers.cli import run as cli
import initaudit
from initaudit import audit

TIE, SIBLING, IDENTICAL = "tied-weights-diverged", "sibling-scale-mismatch", "identical-layers"
RELATIONS = {TIE, SIBLING, IDENTICAL}


def relations(report) -> set[tuple[str, str, str]]:
    """(rule, tensor, severity) of each cross-tensor finding."""
    return {(f.rule, f.tensor, f.severity) for f in report.findings if f.rule in RELATIONS}


def serious(report) -> set[tuple[str, str, str]]:
    return {(f.rule, f.tensor, f.severity) for f in report.findings if f.severity != "info"}


def check_json(*args) -> dict:
    result = cli("check", *args, "--format", "json")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def json_relations(report: dict) -> set[tuple[str, str, str]]:
    return {(f["rule"], f["tensor"], f["severity"]) for f in report["findings"] if f["rule"] in RELATIONS}


def hf_gpt2() -> nn.Module:
    """transformers' GPT-2 (4 blocks), its head tied to `transformer.wte` by its config's tie_word_embeddings."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=2, vocab_size=96, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def head_copy(model: nn.Module, embedding: nn.Embedding) -> nn.Module:
    """The tie broken as FSDP wrapping or a re-init breaks it: a new Parameter holding the same values."""
    model.lm_head.weight = nn.Parameter(embedding.weight.detach().clone())
    return model


# ------------------------------------------------------------------ IA501 tied-weights-diverged

def test_a_live_head_copied_off_its_embedding_is_a_broken_tie_even_with_equal_values(tmp_path):
    """Live, the tie is judged by identity: a copy is two Parameters. In a file, by value: torch.save keeps shared
    storage but safetensors' save_file cannot, and a copy is how a tie is saved there."""
    assert relations(audit(models.gpt())) == set()
    broken = audit(models.untied_head())
    assert relations(broken) == {(TIE, "lm_head.weight", "warning")}
    assert "wte.weight" in next(f.message for f in broken.findings if f.rule == TIE)
    assert json_relations(check_json("--model", "fixtures.relations_models:untied_head")) == \
        {(TIE, "lm_head.weight", "warning")}
    assert json_relations(check_json("--model", "fixtures.relations_models:gpt")) == set()
    state = {k: v.detach().clone().contiguous() for k, v in models.untied_head().state_dict().items()}
    torch.save(state, tmp_path / "copy.pt")
    save_file(state, tmp_path / "copy.safetensors")
    assert relations(audit(tmp_path / "copy.pt")) == set()
    assert relations(audit(tmp_path / "copy.safetensors")) == set()


def test_a_tie_the_config_declares_broken_in_a_live_model_is_an_error():
    assert relations(audit(hf_gpt2())) == set()
    model = hf_gpt2()
    broken = audit(head_copy(model, model.transformer.wte))
    assert relations(broken) == {(TIE, "lm_head.weight", "error")}
    finding = next(f for f in broken.findings if f.rule == TIE)
    assert "transformer.wte.weight" in finding.message and "(config)" in finding.message


def hf_folder(folder: Path, head: str, tie: bool = True, weights: str = "safetensors") -> Path:
    """A GPT-2 folder as transformers writes it (config.json, `tie_word_embeddings`), whose weights hold the head
    beside the embedding: `head` equal to it, or drawn apart ('differs')."""
    folder.mkdir()
    model = hf_gpt2()
    config = {**model.config.to_dict(), "architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": tie}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if head == "differs":
        state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"]) * 0.02
    if weights == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:  # a torch state_dict with its shard index, as transformers' save_pretrained(safe_serialization=False)
        torch.save(state, folder / "pytorch_model.bin")
        index = {"metadata": {}, "weight_map": {k: "pytorch_model.bin" for k in state}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_a_file_whose_head_differs_from_the_embedding_its_config_ties_it_to(tmp_path, weights):
    assert relations(audit(hf_folder(tmp_path / "equal", "equal", weights=weights))) == set()
    assert relations(audit(hf_folder(tmp_path / "untied", "differs", tie=False, weights=weights))) == set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_gpt2().save_pretrained(tmp_path / "saved")  # keeps one tensor for the tie
    assert relations(audit(tmp_path / "saved")) == set()
    broken = audit(hf_folder(tmp_path / "differs", "differs", weights=weights))
    assert relations(broken) == {(TIE, "lm_head.weight", "error")}
    assert json_relations(check_json(tmp_path / "differs")) == {(TIE, "lm_head.weight", "error")}


def test_a_config_that_ties_an_architecture_not_built_is_read_by_the_usual_names(tmp_path):
    """An architecture transformers does not know: `tie_word_embeddings` and the names (`lm_head.weight`,
    `model.embed_tokens.weight`) declare the tie."""
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(96, 64, generator=g) * 0.02
    state = {"model.embed_tokens.weight": embedding, "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64) * 0.02,
             "lm_head.weight": torch.randn(96, 64, generator=g) * 0.02}
    verdicts = {}
    for tie in (True, False):
        folder = tmp_path / f"tie-{tie}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "not-in-transformers", "tie_word_embeddings": tie}))
        save_file(state, folder / "model.safetensors")
        verdicts[tie] = relations(audit(folder))
    assert verdicts == {True: {(TIE, "lm_head.weight", "error")}, False: set()}


# ------------------------------------------------------------------ IA502 sibling-scale-mismatch

def test_depth_scaling_on_the_wrong_projection_of_some_blocks_is_found():
    for recipe in (models.gpt, models.per_layer_depth_scaled):
        assert relations(audit(recipe())) == set(), recipe.__name__
    one = audit(models.scaled_fc_one_block())
    assert relations(one) == {(SIBLING, "h.2.mlp.c_fc.weight", "warning")}
    finding = next(f for f in one.findings if f.rule == SIBLING)
    assert "0.35x" in finding.message and "constant" in finding.message
    some = audit(models.scaled_fc_some_blocks())
    assert relations(some) == {(SIBLING, "h.1.mlp.c_fc.weight", "warning"), (SIBLING, "h.3.mlp.c_fc.weight", "warning")}


def test_sibling_scales_are_judged_in_a_saved_state_dict_and_from_a_factory(tmp_path):
    torch.save(models.scaled_fc_one_block().state_dict(), tmp_path / "bug.pt")
    torch.save(models.per_layer_depth_scaled().state_dict(), tmp_path / "recipe.pt")
    assert json_relations(check_json(tmp_path / "bug.pt")) == {(SIBLING, "h.2.mlp.c_fc.weight", "warning")}
    assert json_relations(check_json(tmp_path / "recipe.pt")) == set()
    assert json_relations(check_json("--model", "fixtures.relations_models:scaled_fc_some_blocks")) == \
        {(SIBLING, "h.1.mlp.c_fc.weight", "warning"), (SIBLING, "h.3.mlp.c_fc.weight", "warning")}


def test_timm_beits_per_layer_rescale_is_a_recipe_and_one_block_rescaled_twice_is_not():
    """timm's BEiT divides each block's output projections by √(2(l+1)) (`fix_init_weight`): a recipe, fitted as
    such; one block's projection rescaled a second time departs from it."""
    timm = pytest.importorskip("timm")

    def beit() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("beit_base_patch16_224", pretrained=False, depth=6, embed_dim=64, num_heads=2,
                                 img_size=32, num_classes=10)

    assert relations(audit(beit())) == set()
    twice = beit()
    with torch.no_grad():
        twice.blocks[3].attn.proj.weight.div_(math.sqrt(2 * 4))
    assert relations(audit(twice)) == {(SIBLING, "blocks.3.attn.proj.weight", "warning")}
    finding = next(f for f in audit(twice).findings if f.rule == SIBLING)
    assert "1/√(l+1)" in finding.message


def blocks(stds: list[float], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One square projection per block, block l drawn at stds[l]."""
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{l}.proj.weight": torch.randn(width, width, generator=g) * std for l, std in enumerate(stds)}


def sibling_findings(state: dict[str, torch.Tensor], tmp_path: Path) -> set[str]:
    torch.save(state, tmp_path / "blocks.pt")
    return {f.tensor for f in audit(tmp_path / "blocks.pt").findings if f.rule == SIBLING}


def test_a_departure_is_judged_against_the_sampling_error_of_the_std(tmp_path):
    """A block at 0.8x its siblings is plain in 256x256 layers (the std known to 0.3 %), not in 6x6 ones (12 %):
    the same departure is flagged in the first and not in the second; six blocks drawn alike stay clean."""
    off = [0.02, 0.02, 0.016, 0.02, 0.02, 0.02]
    assert sibling_findings(blocks(off, 256), tmp_path) == {"layers.2.proj.weight"}
    assert sibling_findings(blocks(off, 6), tmp_path) == set()
    assert sibling_findings(blocks([0.02] * 6, 256), tmp_path) == set()


def test_per_layer_depth_recipes_are_fitted_against_the_block_index(tmp_path):
    depth = [0.02 / math.sqrt(2 * (l + 1)) for l in range(6)]
    assert sibling_findings(blocks(depth, 128), tmp_path) == set()
    depth[4] = depth[1]  # one block drawn at another block's depth
    assert sibling_findings(blocks(depth, 128), tmp_path) == {"layers.4.proj.weight"}


# ------------------------------------------------------------------ IA503 identical-layers

PROJECTIONS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
COPIES = {(IDENTICAL, f"h.{b}.{p}.weight", "error") for b in (1, 2, 3) for p in PROJECTIONS}  # each one h.0's copy


def test_blocks_drawn_after_resetting_the_seed_are_identical_layers(tmp_path):
    assert relations(audit(models.gpt())) == set()
    report = audit(models.reseeded_blocks())
    assert relations(report) == COPIES
    message = next(f.message for f in report.findings if f.tensor == "h.3.mlp.c_fc.weight")
    assert "identical to h.0.mlp.c_fc.weight" in message and "4 layers" in message
    state = {k: v.detach().clone().contiguous() for k, v in models.reseeded_blocks().state_dict().items()}
    save_file(state, tmp_path / "reseeded.safetensors")
    assert json_relations(check_json(tmp_path / "reseeded.safetensors")) == COPIES


def test_one_block_deep_copied_into_every_position_is_found_and_one_block_shared_is_not():
    """A block registered at every position (weight sharing, ALBERT-style) holds one tensor; a block deep-copied
    into every position holds copies."""
    shared, copied = models.gpt(), models.gpt()
    for i in range(1, len(shared.h)):
        shared.h[i] = shared.h[0]
        copied.h[i] = copy.deepcopy(copied.h[0])
    assert relations(audit(shared)) == set()
    assert relations(audit(copied)) == COPIES


# ------------------------------------------------------------------ trained weights

@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return models.trained()


def test_a_trained_tiny_gpt_stays_quiet_and_faults_planted_in_it_are_caught(trained, tmp_path):
    report = audit(trained)
    assert report.weights_state == "trained"
    assert relations(report) == set() and not any(f.severity == "error" for f in report.findings)
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    assert relations(audit(tmp_path / "trained.pt")) == set()
    untied = copy.deepcopy(trained)
    assert relations(audit(head_copy(untied, untied.wte))) == {(TIE, "lm_head.weight", "warning")}
    copied = copy.deepcopy(trained)
    with torch.no_grad():
        for block in copied.h[1:]:
            block.mlp["c_fc"].weight.copy_(copied.h[0].mlp["c_fc"].weight)
    assert relations(audit(copied)) == {(IDENTICAL, f"h.{b}.mlp.c_fc.weight", "warning") for b in (1, 2, 3)}


def test_fix_redraws_copies_and_an_off_block_like_their_sibling_blocks():
    """`fix` draws a layer of a repeated block as the other blocks draw it (normal(0.02) here, not the selection
    guide's Kaiming, which would leave it off its siblings)."""
    for bug in (models.reseeded_blocks, models.scaled_fc_one_block):
        model = bug()
        changed = {c.layer for c in initaudit.fix(model).changes}
        assert changed == {f.layer for f in audit(bug()).findings if f.rule in RELATIONS}, bug.__name__
        assert relations(audit(model)) == set(), bug.__name__
        assert all(abs(model.h[b].mlp["c_fc"].weight.std().item() - 0.02) < 0.002 for b in range(4))
