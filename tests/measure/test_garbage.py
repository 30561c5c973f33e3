"""Uninitialized memory (`uninitialized-memory`): a head left holding what allocation left, planted from saved
bytes (deterministic, unlike torch.empty), is an error on that layer only, in a fresh and in a trained model;
the clean twins, an fp16 model whose small weights legitimately hold subnormals and a trained model with a
super weight are not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import initaudit
from helpers import trained_models as tm
from initaudit.measure import stats

RULE = "uninitialized-memory"
HEAD = "18"  # the last Linear of trained_models.mlp()


def saved_bytes(tmp_path, n_bytes: int, seed: int) -> bytes:
    """Seeded random bytes, written to a file and read back: what a never-written allocation held."""
    path = tmp_path / f"memory-{seed}.bin"
    path.write_bytes(np.random.default_rng(seed).bytes(n_bytes))
    return path.read_bytes()


def random_words(tmp_path, shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Random bits read as `dtype`: magnitudes over the whole exponent range, a few NaN/Inf, some denormals."""
    n = math.prod(shape)
    return torch.frombuffer(bytearray(saved_bytes(tmp_path, n * dtype.itemsize, seed)), dtype=dtype).reshape(shape)


def huge_finite(tmp_path, shape, seed=1) -> torch.Tensor:
    """Random words with NaN/Inf dropped and the largest entries at 2.9e38: finite, yet fp32 squares overflow."""
    words = random_words(tmp_path, shape, seed=seed).nan_to_num(0.0, 0.0, 0.0).clamp(-2.9e38, 2.9e38)
    words.view(-1)[0] = 2.9e38
    return words


def small_integers(tmp_path, shape, seed=2) -> torch.Tensor:
    """Small integers (counts, lengths, a pointer's high word) read as float32: every entry a denormal."""
    ints = np.frombuffer(saved_bytes(tmp_path, 4 * math.prod(shape), seed), dtype=np.uint32) >> 12
    return torch.from_numpy((ints | 1).astype(np.uint32).view(np.float32).copy()).reshape(shape)


def fill_pattern(tmp_path, shape, seed=3) -> torch.Tensor:
    """A normal draw with a tenth of it overwritten by a fill byte (glibc MALLOC_PERTURB_-like 0x41414141: 12.08)."""
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.1
    pattern = torch.frombuffer(bytearray(b"\x41" * 4), dtype=torch.float32)
    w.view(-1)[::10] = pattern
    return w


GARBAGE = {"random words": random_words, "finite up to 2.9e38": huge_finite, "denormals": small_integers,
           "fill pattern": fill_pattern}


def findings(model) -> set[tuple[str, str, str]]:
    return {(f.rule, f.layer, f.severity) for f in initaudit.audit(model).findings}


@pytest.fixture(scope="module")
def trained_mlp():
    return tm.trained("mlp")[0]


@pytest.mark.parametrize("kind", GARBAGE)
@pytest.mark.parametrize("state", ["fresh", "trained"])
def test_a_head_left_at_uninitialized_memory_is_named_on_that_layer_only(kind, state, trained_mlp, tmp_path):
    """The trained twin also carries a super weight 100 stds out in layer 4: a spike (weight-spike, info on trained
    weights), not garbage."""
    model = tm.fresh("mlp") if state == "fresh" else trained_mlp
    head, spiked = model[int(HEAD)].weight, model[4].weight
    kept = head.detach().clone(), spiked.detach().clone()
    try:
        with torch.no_grad():
            if state == "trained":
                spiked[3, 5] = 100 * float(spiked.std())
        clean = findings(model)
        with torch.no_grad():
            head.copy_(GARBAGE[kind](tmp_path, tuple(head.shape)))
        garbage = findings(model)
    finally:
        with torch.no_grad():
            head.copy_(kept[0])
            spiked.copy_(kept[1])
    assert {f for f in clean if f[0] == RULE} == set()
    assert {f for f in garbage if f[0] == RULE} == {(RULE, HEAD, "error")}
    if state == "trained":
        assert ("weight-spike", "4", "info") in clean


def test_a_head_of_finite_values_up_to_3e38_gets_a_finite_std_and_the_finding(tmp_path):
    model = tm.fresh("mlp")
    with torch.no_grad():
        model[int(HEAD)].weight.copy_(huge_finite(tmp_path, tuple(model[int(HEAD)].weight.shape)))
    report = initaudit.audit(model)
    st = stats.compute(model[int(HEAD)].weight.detach())
    reference = model[int(HEAD)].weight.detach().double()
    assert st.std == pytest.approx(float(reference.std(unbiased=False)), rel=1e-9)
    assert st.mean == pytest.approx(float(reference.mean()), rel=1e-9)
    finding = next(f for f in report.findings if f.rule == RULE)
    assert finding.layer == HEAD and "2.9e+38" not in finding.message  # evidence in shares, not the raw spike


def test_fp16_raw_bytes_are_garbage_but_small_fp16_weights_with_their_subnormals_are_not(tmp_path):
    """fp16 subnormals start at 6.1e-5: a normal(0, 0.02) draw holds 0.24 % of them legitimately."""
    torch.manual_seed(0)
    model = tm.fresh("mlp")
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    model = model.half()
    head = model[int(HEAD)].weight
    assert stats.compute(model[0].weight.detach()).garbage.subnormal_share > 0.001
    assert not {f for f in findings(model) if f[0] == RULE}
    with torch.no_grad():
        head.copy_(random_words(tmp_path, tuple(head.shape), torch.float16).nan_to_num(0.0, 0.0, 0.0))
    assert {f for f in findings(model) if f[0] == RULE} == {(RULE, HEAD, "error")}


def test_a_saved_checkpoint_with_a_garbage_head_is_named_through_the_cli(tmp_path):
    """Through a file, as a user meets it: the head's finding is the error; its clean twin exits 0."""
    from helpers.cli import run
    model = tm.fresh("mlp")
    torch.save(model.state_dict(), tmp_path / "clean.pt")
    with torch.no_grad():
        model[int(HEAD)].weight.copy_(huge_finite(tmp_path, tuple(model[int(HEAD)].weight.shape)))
    torch.save(model.state_dict(), tmp_path / "garbage.pt")
    for name, expected in (("clean", set()), ("garbage", {(RULE, HEAD, "error")})):
        report = json.loads(run("check", tmp_path / f"{name}.pt", "--format", "json").output)
        assert {(f["rule"], f["layer"], f["severity"]) for f in report["findings"] if f["rule"] == RULE} == expected
        head = next(layer for layer in report["layers"] if layer["name"] == HEAD)
        assert math.isfinite(head["std"]), head


def test_biases_after_one_adam_step_are_not_garbage():
    """Zero biases after Adam's first step sit at ±lr (a few tight clusters, a robust spread near 0): no pile of
    garbage, though each cluster is 'far' in units of that spread."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(*(torch.nn.Linear(96, 96) for _ in range(3)))
    for m in model:
        torch.nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 96)).sum().backward()
    opt.step()
    assert not [f for f in initaudit.audit(model).findings if f.rule == RULE]
