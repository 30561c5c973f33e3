"""Conventions known by family, held against the measured tensors: a Mamba/SSM mixer's parameters (told by its
names: a layer holding `A_log`, with its `D`, `dt_bias` or `dt_proj`) judged in the published recipe
(state-spaces/mamba `mamba_simple.py`, transformers' `MambaMixer`/`Mamba2Mixer`), and the rows a transformers
`resize_token_embeddings` appends by mean-resizing, and an offset norm (x·(1+w), as the flow reads it from the
module: the `norm_convention` fact) left at ones. Facts for `convention-mismatch`, `mean-resized-rows`, and the
exceptions they make to `constant-weights`, `duplicate-units` and `nonzero-bias`.

The published SSM recipe: A_log = log(1..N) repeated for every channel (Mamba-1, [d_inner, N]) or the log of A
spread over [1, 16] (Mamba-2, one per head); D = 1; the dt bias (`dt_proj.bias`, Mamba-2's `dt_bias`) the inverse
softplus of dt drawn log-uniform in [dt_min, dt_max] = [0.001, 0.1]; `dt_proj.weight` the constant dt_rank^-0.5
(dt_init="constant") or uniform ±dt_rank^-0.5 (dt_init="random")."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from initaudit.measure.tensors import Measured

DT_MIN, DT_MAX = 0.001, 0.1  # the published dt range (mamba_simple.py, transformers' time_step_min/max)
A_LOG_MIN_SPREAD = 0.1  # std of log(1..N) is 0.35 at N = 2; a generic draw (normal(0.02), zeros) has far less
KS_CRITICAL = 2.7  # Kolmogorov-Smirnov: D·√n beyond this rejects the uniform at p ≈ 1e-6 (2·exp(-2·2.7²))
KS_MIN_VALUES = 16
Verdict = tuple[bool | None, str | None]  # (fits the convention, how it contradicts it); (None, None): no verdict
FITS: Verdict = (True, None)
UNJUDGED: Verdict = (None, None)
SSM_CONVENTION = {
    "A_log": "S4D-real: A_log = log(A), A = 1..N for every channel (Mamba-2: A spread over [1, 16], one per head)",
    "D": "D = 1 (the skip through the SSM)",
    "dt_bias": f"dt bias = inverse softplus of dt drawn log-uniform in [{DT_MIN:g}, {DT_MAX:g}]",
    "dt_proj_weight": "dt_proj weight = dt_rank^-0.5 (constant) or uniform ±dt_rank^-0.5",
}
OFFSET_NORM = "an offset norm computes x·(1+w): w = 0 is its identity (Gemma, Qwen3-Next)"


def add_convention_facts(measured: list[Measured], values: Callable[[str], torch.Tensor | None]) -> None:
    """The convention facts of every measured tensor; `values(key)` reads a tensor again (only SSM parameters and
    heads with duplicate rows are read; None where they are not at hand: no verdict)."""
    mixers = {m.param.key.rpartition(".")[0] for m in measured if m.param.key.rpartition(".")[2] == "A_log"}
    for m in measured:
        facts: dict[str, Any] = {"convention": None, "convention_fits": None, "convention_contradiction": None,
                                 "mean_resized_rows": 0, "duplicates_mean_resized": False}
        role = ssm_role(m.param.key, mixers)
        held = values(m.param.key) if role is not None else None
        v = held.detach().float().flatten() if held is not None else None
        if v is not None and v.numel() and bool(v.isfinite().all()):  # non-finite values are non-finite's
            fits, words = SSM_JUDGES[role](v, m)
            facts.update(convention=SSM_CONVENTION[role], convention_fits=fits, convention_contradiction=words)
        if m.facts.get("norm_convention") == "one_plus" and m.param.role == "norm_weight" and m.stats.finite:
            fits, words = judge_offset_norm(m)
            facts.update(convention=OFFSET_NORM, convention_fits=fits, convention_contradiction=words)
        tail = trailing_group(m) if m.stats.duplicate_groups else None
        held = values(m.param.key) if tail else None
        if held is not None:
            rows = mean_resized_rows(held, m, len(tail))
            facts.update(mean_resized_rows=rows, duplicates_mean_resized=bool(rows) and len(
                m.stats.duplicate_groups) == 1)
        m.facts.update(facts)


def ssm_role(key: str, mixers: set[str]) -> str | None:
    """The SSM parameter a tensor is, by its name inside a mixer (a module holding `A_log`): A_log, D, dt_bias
    (Mamba-2's `dt_bias`, Mamba-1's `dt_proj.bias`) or dt_proj_weight; None for every other tensor."""
    prefix, _, name = key.rpartition(".")
    if prefix in mixers and name in ("A_log", "D", "dt_bias"):
        return name
    owner, _, sub = prefix.rpartition(".")
    if owner in mixers and sub == "dt_proj" and name in ("weight", "bias"):
        return "dt_bias" if name == "bias" else "dt_proj_weight"
    return None


def contradicts(words: str) -> Verdict:
    return False, words


def judge_a_log(v: torch.Tensor, m: Measured) -> Verdict:
    """A_log against S4D-real: a constant, or the spread of a generic draw, contradicts it."""
    if m.stats.constant:
        a = -math.exp(v[0].item())
        return contradicts(f"are all {v[0].item():g}: every state decays alike (A = {a:.3g})")
    if v.std().item() < A_LOG_MIN_SPREAD:
        return contradicts(f"are spread like a generic draw (mean {v.mean().item():.3g}, std {v.std().item():.3g}), "
                           "not log(1..N): a model-wide init overwrote them?")
    return FITS


def judge_d(v: torch.Tensor, m: Measured) -> Verdict:
    """D at ones fits; any other D says nothing (training moves it)."""
    return FITS if m.stats.constant and v[0].item() == 1.0 else UNJUDGED


def judge_dt_bias(v: torch.Tensor, m: Measured) -> Verdict:
    """How a dt bias contradicts its convention: a constant, dt outside the range, evenly spaced values, or a
    spread that is not log-uniform."""
    dt = torch.nn.functional.softplus(v.double())
    if m.stats.constant:
        return contradicts(f"are all {v[0].item():g} (dt = softplus(b) = {dt[0].item():.3g} for every channel)")
    lo, hi = dt.min().item(), dt.max().item()
    if lo < DT_MIN * 0.9 or hi > DT_MAX * 1.1:
        return contradicts(f"put dt = softplus(b) over [{lo:.3g}, {hi:.3g}], outside [{DT_MIN:g}, {DT_MAX:g}]")
    if v.numel() >= 4 and any(evenly_spaced(x) for x in (v.double(), dt, dt.log())):
        return contradicts("are evenly spaced (a linspace, not a log-uniform draw)")
    u = ((dt.log() - math.log(DT_MIN)) / (math.log(DT_MAX) - math.log(DT_MIN))).clamp(0, 1).sort().values
    n = u.numel()
    gap = torch.maximum(torch.arange(1, n + 1) / n - u, u - torch.arange(n) / n).max().item() if n else 0.0
    if n >= KS_MIN_VALUES and gap * math.sqrt(n) > KS_CRITICAL:
        return contradicts(f"are not spread log-uniformly over the range (Kolmogorov-Smirnov D = {gap:.2f} over {n} "
                           "values)")
    return FITS


def evenly_spaced(x: torch.Tensor) -> bool:
    """The sorted values step by one constant (to 1 %)."""
    steps = x.sort().values.diff()
    return bool(steps.mean() > 0 and ((steps - steps.mean()).abs() <= 0.01 * steps.mean()).all())


def judge_dt_proj_weight(v: torch.Tensor, m: Measured) -> Verdict:
    """dt_proj's weight at dt_rank^-0.5 (constant) or uniform ±dt_rank^-0.5 fits; a std far from it (a model-wide
    normal(0.02)) contradicts it; another constant says nothing here (`constant-weights` names it)."""
    if not m.param.fan_in:
        return UNJUDGED
    bound = m.param.fan_in ** -0.5
    if m.stats.constant:
        return FITS if math.isclose(v[0].item(), bound, rel_tol=0.01) else UNJUDGED
    ratio = m.stats.std / (bound / math.sqrt(3))
    if 0.25 <= ratio <= 4:
        return FITS
    return contradicts(f"have std {m.stats.std:.3g}, {ratio:.2g}x the {bound / math.sqrt(3):.3g} of uniform "
                       "±dt_rank^-0.5: a model-wide init overwrote them?")


def judge_offset_norm(m: Measured) -> Verdict:
    """An offset norm's gain at ones doubles the signal (the standard RMSNorm init, 1, applied where the forward adds
    1: huggingface/transformers#40796); any other gain says nothing here."""
    if m.stats.constant and m.stats.max == 1.0:
        return contradicts("are all 1: the norm scales by 1 + 1 = 2, doubling the signal (its variance 4x) at every "
                           "such norm")
    return UNJUDGED


SSM_JUDGES = {"A_log": judge_a_log, "D": judge_d, "dt_bias": judge_dt_bias, "dt_proj_weight": judge_dt_proj_weight}


def trailing_group(m: Measured) -> list[int] | None:
    """The duplicate group made of the tensor's last units (fewer than all of them), if there is one."""
    units = m.stats.n_units
    return next((g for g in m.stats.duplicate_groups
                 if len(g) < units and sorted(g) == list(range(units - len(g), units))), None)


def mean_resized_rows(tensor: torch.Tensor, m: Measured, appended: int) -> int:
    """`appended` (the trailing duplicate group's size) where those units equal the mean of the units before them —
    what transformers' resize_token_embeddings appends by mean-resizing: the mean itself, or a draw around it with
    covariance 1e-9·Σ, to within 1e-3 of the tensor's std and the dtype's rounding; 0 otherwise."""
    rows = tensor.detach().movedim(m.param.unit_axis, 0).reshape(m.stats.n_units, -1)
    mean = rows[:-appended].mean(0, dtype=torch.float32)
    eps = torch.finfo(tensor.dtype).eps if tensor.dtype.is_floating_point else 0.0
    tolerance = 1e-3 * m.stats.std + 2 * eps * mean.abs().max().item()
    return appended if (rows[-appended:].float() - mean).abs().max().item() <= tolerance else 0
