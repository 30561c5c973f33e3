"""Conventions known by family (judge/conventions.py): a Mamba mixer's A_log, D, dt bias and dt_proj judged in their
published recipe, and the rows transformers' resize_token_embeddings appends by mean-resizing — each on real models
(a pure-PyTorch Mamba-1 block, transformers' Mamba/Mamba-2/Llama built offline from a config), live and saved, beside
the bug twins of public trackers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from initaudit.pipeline import audit

transformers = pytest.importorskip("transformers")

SSM_RULES = {"constant-weights", "duplicate-units", "nonzero-bias", "convention-mismatch", "zero-weights"}
SSM_TENSORS = (".A_log", ".D", ".dt_bias", ".dt_proj.weight", ".dt_proj.bias")


class MambaBlock(nn.Module):
    """Mamba-1's mixer as state-spaces/mamba `mamba_simple.py` builds and initializes it (dt_init="constant"), with
    transformers' slow-path selective scan as its forward."""

    def __init__(self, d_model: int = 32, d_state: int = 16, expand: int = 2, d_conv: int = 4):
        super().__init__()
        d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
        self.dt_rank, self.d_state = dt_rank, d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        nn.init.constant_(self.dt_proj.weight, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h, z = self.in_proj(x).chunk(2, dim=-1)
        h = nn.functional.silu(self.conv1d(h.transpose(1, 2))[..., :length]).transpose(1, 2)
        dt, b, c = self.x_proj(h).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = nn.functional.softplus(self.dt_proj(dt))
        a = -torch.exp(self.A_log)
        state = torch.zeros(x.shape[0], h.shape[-1], self.d_state)
        ys = []
        for t in range(length):
            state = torch.exp(dt[:, t, :, None] * a) * state + dt[:, t, :, None] * b[:, t, None, :] * h[:, t, :, None]
            ys.append((state * c[:, t, None, :]).sum(-1))
        y = torch.stack(ys, dim=1) + h * self.D
        return self.out_proj(y * nn.functional.silu(z))


class LanguageModel(nn.Module):
    """athms/mad-lab's wrapper: embedding, Mamba blocks with norms, a head; `_init_weights` as mad-lab wrote it
    (every Linear normal(0.02), every bias zero) or as it was fixed (dt_proj's `_no_reinit` bias and weight kept)."""

    def __init__(self, blocks: int = 4, d_model: int = 32, vocab: int = 300, fixed: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(MambaBlock(d_model) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(blocks))
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.fixed = fixed
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module, initializer_range: float = 0.02) -> None:
        if isinstance(m, nn.Linear):
            if self.fixed and m.bias is not None and getattr(m.bias, "_no_reinit", False):
                return
            nn.init.normal_(m.weight, mean=0, std=initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block, norm in zip(self.blocks, self.norms):
            x = x + block(norm(x))
        return self.head(x)


def findings(report, rules=SSM_RULES, severities=("error", "warning", "info"), tensors=SSM_TENSORS):
    """(rule, tensor) of the report's findings of these rules at these severities, on tensors named so."""
    return {(f.rule, f.tensor) for f in report.findings
            if f.rule in rules and f.severity in severities and f.tensor.endswith(tensors)}


def both_ways(model: nn.Module, tmp_path) -> list:
    """The model audited live and from a saved state_dict."""
    torch.save(model.state_dict(), tmp_path / "model.pt")
    return [audit(model), audit(tmp_path / "model.pt")]


def hf_mamba(constant_dt: bool = True, layers: int = 3):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=300, hidden_size=64, state_size=16, num_hidden_layers=layers, expand=2,
                         time_step_init_scheme="constant" if constant_dt else "random")
    return MambaForCausalLM(config)


def hf_mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=300, hidden_size=64, state_size=16, num_hidden_layers=3, expand=2, head_dim=8,
                        num_heads=16, n_groups=1)


@pytest.mark.parametrize("constant_dt", [True, False])
def test_mamba_published_init_is_clean(constant_dt, tmp_path):
    """transformers' MambaForCausalLM at its own init (modeling_mamba.py init_mamba_weights): A_log's repeated rows,
    D's ones, dt_proj's constant dt_rank^-0.5 weight and its inverse-softplus bias are the recipe, not findings
    (`constant-weights` error on dt_proj and info on D before)."""
    for report in both_ways(hf_mamba(constant_dt), tmp_path):
        assert findings(report) == set()


def test_mamba2_published_init_is_clean(tmp_path):
    """transformers' Mamba2ForCausalLM at its own init: A_log = log(1..heads), D = 1, dt_bias log-uniform."""
    from transformers import Mamba2ForCausalLM

    torch.manual_seed(0)
    model = Mamba2ForCausalLM(hf_mamba2_config())
    for report in both_ways(model, tmp_path):
        assert findings(report) == set()
    model.save_pretrained(tmp_path / "hf")
    assert findings(audit(tmp_path / "hf")) == set()


def test_mad_lab_model_wide_init_overwrites_dt_proj(tmp_path):
    """https://github.com/athms/mad-lab/issues/3: LanguageModel._init_weights draws every Linear normal(0.02) and
    zeroes every bias, overwriting dt_proj (softplus(0) = 0.69, far above dt_max = 0.1); the fixed twin, which keeps
    dt_proj's own init, is clean."""
    torch.manual_seed(0)
    bug = LanguageModel(fixed=False)
    for report in both_ways(bug, tmp_path):
        caught = {t for rule, t in findings(report, {"convention-mismatch"}, ("error",))}
        assert caught == {f"blocks.{i}.dt_proj.{p}" for i in range(4) for p in ("weight", "bias")}
    torch.manual_seed(0)
    for report in both_ways(LanguageModel(fixed=True), tmp_path):
        assert findings(report) == set()


def mixer_stack(dt_bias_ones: bool) -> nn.Module:
    """A user's model of transformers' Mamba2Mixer layers imported on their own (no PreTrainedModel init)."""
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    config = hf_mamba2_config()
    stack = nn.Sequential(*(Mamba2Mixer(config, layer_idx=i) for i in range(3)))
    if dt_bias_ones:  # transformers v5.0.0's mixer: `self.dt_bias = nn.Parameter(torch.ones(self.num_heads))`
        for mixer in stack:
            nn.init.ones_(mixer.dt_bias)
    return stack


def test_mamba2_mixer_dt_bias_left_at_ones(tmp_path):
    """https://github.com/huggingface/transformers/issues/43717: a Mamba2Mixer used outside Mamba2PreTrainedModel kept
    dt_bias at all ones (fixed by PR #43778, the mixer initializing itself): the bug is a convention-mismatch error
    on every dt_bias, the fixed mixer clean."""
    for report in both_ways(mixer_stack(dt_bias_ones=True), tmp_path):
        assert findings(report, {"convention-mismatch"}, ("error",)) == {
            ("convention-mismatch", f"{i}.dt_bias") for i in range(3)}
    for report in both_ways(mixer_stack(dt_bias_ones=False), tmp_path):
        assert findings(report) == set()


def zero_dt_bias(model):
    """https://github.com/hustvl/Vim/issues/19: Vim's _init_weights zeroes every Linear bias, dt_proj's too."""
    nn.init.zeros_(model.dt_proj.bias)


def evenly_spaced_dt(model):
    """The issue 23 list: an evenly spaced dt (a linspace over [dt_min, dt_max]) is not the log-uniform draw."""
    dt = torch.linspace(0.001, 0.1, model.dt_proj.bias.numel())
    model.dt_proj.bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))


def uniform_dt(model):
    """The issue 23 list: dt drawn uniform (not log-uniform) over [dt_min, dt_max]."""
    dt = torch.empty(model.dt_proj.bias.numel()).uniform_(0.001, 0.1)
    model.dt_proj.bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))


def a_log_overwritten(model):
    """The issue 23 list: a model-wide normal(0.02) over every parameter overwrites A_log = log(1..N)."""
    nn.init.normal_(model.A_log, std=0.02)


def a_log_zeros(model):
    """The issue 23 list: A_log zeroed (every state decays at the same rate, A = -1)."""
    nn.init.zeros_(model.A_log)


@pytest.mark.parametrize("plant, tensor", [(zero_dt_bias, "dt_proj.bias"), (evenly_spaced_dt, "dt_proj.bias"),
                                           (uniform_dt, "dt_proj.bias"), (a_log_overwritten, "A_log"),
                                           (a_log_zeros, "A_log")])
def test_ssm_parameters_off_their_convention(plant, tensor, tmp_path):
    """Each planted departure from the SSM recipe in one mixer of a transformers Mamba is a convention-mismatch error
    on that tensor alone; the other mixers stay clean."""
    model = hf_mamba()
    torch.manual_seed(1)
    with torch.no_grad():
        plant(model.backbone.layers[1].mixer)
    for report in both_ways(model, tmp_path):
        assert findings(report, {"convention-mismatch"}) == {
            ("convention-mismatch", f"backbone.layers.1.mixer.{tensor}")}


def llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("vocab", [1000, 40])
def test_mean_resized_rows_are_named_not_duplicates(vocab, tmp_path):
    """resize_token_embeddings (mean_resizing=True) appends 8 rows to the head at the old rows' mean: drawn with
    covariance 1e-9·Σ (vocab 1000 > hidden: Σ positive definite) or the mean itself (vocab 40): named as
    mean-resized rows, not a duplicate-units warning; rows copied from a token's row instead are still duplicates."""
    model = llama(vocab)
    model.resize_token_embeddings(vocab + 8)
    model.save_pretrained(tmp_path / "hf")
    for report in [*both_ways(model, tmp_path), audit(tmp_path / "hf")]:
        assert findings(report, {"duplicate-units"}, tensors="") == set()
        (named,) = [f for f in report.findings if f.rule == "mean-resized-rows"]
        assert (named.tensor, named.severity) == ("lm_head.weight", "info") and "8 rows" in named.message
    with torch.no_grad():
        model.lm_head.weight[-8:] = model.lm_head.weight[3]
    for report in both_ways(model, tmp_path):
        assert findings(report, {"duplicate-units"}, ("warning", "error"), "") == {("duplicate-units", "lm_head.weight")}
        assert not [f for f in report.findings if f.rule == "mean-resized-rows"]


def test_copies_beside_mean_resized_rows_stay_flagged(tmp_path):
    """Mean-resized rows excuse only themselves: a row copied over another in the head before it was resized is a
    duplicate, and the appended rows are still named."""
    model = llama(1000)
    with torch.no_grad():
        model.lm_head.weight[10] = model.lm_head.weight[20]
    model.resize_token_embeddings(1008)
    for report in both_ways(model, tmp_path):
        assert findings(report, {"duplicate-units"}, ("warning", "error"), "") == {("duplicate-units", "lm_head.weight")}
        assert [f.tensor for f in report.findings if f.rule == "mean-resized-rows"] == ["lm_head.weight"]


def gemma(norms_at_ones: bool):
    """transformers' Gemma at its own init (RMSNorm weights 0: the forward computes x·(1+w)), or with every RMSNorm
    filled with ones as transformers' standard init did before PR #40796."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=16))
    if norms_at_ones:
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                nn.init.ones_(module.weight)
    return model


def test_offset_norm_filled_with_ones():
    """https://github.com/huggingface/transformers/pull/40796: Gemma's and Qwen3-Next's RMSNorm compute x·(1+w) but
    were initialized with ones (1 + 1 = 2, doubling the signal at every norm): convention-mismatch on every norm of the
    live model; the fixed init (zeros) is clean."""
    bug = audit(gemma(norms_at_ones=True))
    norms = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert {f.tensor for f in bug.findings if f.rule == "convention-mismatch" and f.severity == "error"} == {
        *norms, "model.norm.weight"}
    fixed = audit(gemma(norms_at_ones=False))
    assert not [f for f in fixed.findings if f.rule == "convention-mismatch"]
