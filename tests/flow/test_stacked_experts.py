"""Mixture-of-experts weights stored stacked (transformers 5 writes Mixtral, Qwen3-MoE and GPT-OSS experts as one 3-D
tensor per projection): each projection is a linear layer judged at one expert's fans, whichever layout ([experts,
out, in], or GPT-OSS's [experts, in, out] with its bias); experts left at zero are an error, not a parameter's info,
while a zero down_proj alone at the end of every block stays the residual recipe it is."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import initaudit
from initaudit.config import Options
from initaudit.load.dispatch import load
from initaudit.pipeline import analyse

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
MODELS = {"mixtral": ("MixtralConfig", dict(intermediate_size=128, num_local_experts=8)),
          "gpt_oss": ("GptOssConfig", dict(intermediate_size=96, num_local_experts=8, head_dim=16))}
FANS = {"mixtral": {"gate_up_proj": (64, 256), "down_proj": (128, 64)},
        "gpt_oss": {"gate_up_proj": (64, 192), "down_proj": (96, 64)}}


def state(name: str) -> dict[str, torch.Tensor]:
    cls, extra = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**SMALL, **extra)
    return {k: v.detach().clone() for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}


def saved(sd: dict[str, torch.Tensor], path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


def serious(path) -> set[tuple[str, str, str]]:
    return {(f.rule, f.layer.rsplit(".", 1)[-1], f.severity) for f in initaudit.audit(path).findings
            if f.severity != "info"}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_stacked_projection_is_a_linear_layer_at_one_experts_fans(name, tmp_path):
    graph = analyse(load(saved(state(name), tmp_path / "m.pt")), Options()).graph
    layers = {l.name: l for l in graph if ".experts." in l.name}
    assert set(layers) == {f"model.layers.{b}.mlp.experts.{p}" for b in range(3) for p in FANS[name]}
    for layer in layers.values():
        weight = layer.param("weight")
        assert layer.kind == "linear" and layer.weighted
        assert (weight.fan_in, weight.fan_out) == FANS[name][layer.name.rsplit(".", 1)[-1]]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fresh_experts_read_clean_and_zeroed_experts_are_errors(name, suffix, tmp_path):
    sd = state(name)
    assert serious(saved(sd, tmp_path / f"fresh{suffix}")) == set()
    for key in [k for k in sd if ".experts." in k and sd[k].dim() == 3]:
        sd[key] = torch.zeros_like(sd[key])
    found = serious(saved(sd, tmp_path / f"zero{suffix}"))
    assert {rule for rule, _, severity in found if severity == "error"} == {"zero-weights"}, found


@pytest.mark.parametrize("name", list(MODELS))
def test_a_zero_down_proj_ending_every_block_stays_a_recipe(name, tmp_path):
    sd = state(name)
    for key in [k for k in sd if k.endswith("experts.down_proj")]:
        sd[key] = torch.zeros_like(sd[key])
    zeros = {f.layer: f.severity for f in initaudit.audit(saved(sd, tmp_path / "m.pt")).findings
             if f.rule == "zero-weights"}
    assert set(zeros) == {f"model.layers.{b}.mlp.experts.down_proj" for b in range(3)}
    assert set(zeros.values()) == {"info"}


def test_experts_left_at_normal_1_are_judged_at_their_fans(tmp_path):
    sd = state("mixtral")
    for key in [k for k in sd if ".experts." in k and sd[k].dim() == 3]:
        sd[key] = torch.randn_like(sd[key])
    assert ("variance-out-of-range", "gate_up_proj", "warning") in serious(saved(sd, tmp_path / "m.pt"))


def test_a_fanned_out_check_keeps_stacked_experts_whole(tmp_path, monkeypatch):
    """Units cut a tensor by dim-0 rows; stacked experts hold their units on another axis, so each is one unit, and
    the fanned-out report is the single process's (units cut small here, so every other weight is cut)."""
    from initaudit.distributed import checkpoint
    from initaudit.load import plan
    from initaudit.measure import stats
    from initaudit.pipeline import run

    path = saved(state("mixtral"), tmp_path / "m.safetensors")
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 64 * 16)  # chunks of 16 rows of 64
    monkeypatch.setattr(plan, "UNIT_BYTES", 64 * 16 * 4)
    loaded, options = load(path), Options()
    work, skipped = checkpoint.tasks(loaded, options)
    experts = [t for t in work if ".experts." in t.unit.key]
    assert experts and all(t.unit.size == t.unit.shape for t in experts)
    assert any(t.unit.size != t.unit.shape for t in work)
    found = checkpoint.finished([checkpoint.measure_unit(t) for t in work], skipped)
    assert analyse(loaded, options, measured_from=found).report.to_dict() == run(load(path), options).to_dict()
