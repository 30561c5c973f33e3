"""Fingerprints: each torch.nn.init scheme is named, on layers where the schemes differ."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from initaudit.measure import schemes, stats
from initaudit.flow.activations import Activation

OUT, IN = 256, 512  # a non-square layer: Xavier, LeCun, Kaiming fan_in and fan_out all differ


def draw(init) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.empty(OUT, IN)
    init(w)
    return w


CASES = {
    "torch-default": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "kaiming-normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "kaiming-uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming-normal-fan-out": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming-uniform-fan-out": lambda w: nn.init.kaiming_uniform_(w, mode="fan_out", nonlinearity="relu"),
    "xavier-normal": nn.init.xavier_normal_,
    "xavier-uniform": nn.init.xavier_uniform_,
    "lecun-normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
    "normal-0.02": lambda w: nn.init.normal_(w, std=0.02),
    "normal-0.01": lambda w: nn.init.normal_(w, std=0.01),
    "trunc-normal-0.02": lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04),
    "orthogonal": nn.init.orthogonal_,
    "constant": lambda w: nn.init.constant_(w, 0.5),
    "zeros": nn.init.zeros_,
}


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_each_scheme_is_named(scheme):
    w = draw(CASES[scheme])
    fp = schemes.fingerprint(stats.compute(w), IN, OUT, weight=w)
    assert fp.scheme == scheme
    if scheme not in ("constant", "zeros"):
        assert fp.fit == pytest.approx(1.0, abs=0.05)


def test_xavier_with_tanh_gain_is_xavier():
    w = draw(lambda t: nn.init.xavier_uniform_(t, gain=nn.init.calculate_gain("tanh")))
    assert schemes.fingerprint(stats.compute(w), IN, OUT).family == "xavier"


def test_square_tie_is_named_after_the_activation():
    """On a square layer Xavier and LeCun draw the same std; the activation decides the name."""
    torch.manual_seed(0)
    w = nn.init.xavier_normal_(torch.empty(256, 256))
    st = stats.compute(w)
    assert schemes.fingerprint(st, 256, 256, activation=Activation("selu")).family == "lecun"
    assert schemes.fingerprint(st, 256, 256, activation=Activation("tanh")).family == "xavier"


def test_lstm_default_is_torch_default():
    lstm = nn.LSTM(32, 64)
    w = lstm.weight_ih_l0.detach()
    fp = schemes.fingerprint(stats.compute(w), 32, 256, kind="recurrent", hidden=64)
    assert fp.scheme == "torch-default"


def test_unnamed_scale_is_unknown_with_nearest():
    w = draw(lambda t: nn.init.normal_(t, std=0.3))
    fp = schemes.fingerprint(stats.compute(w), IN, OUT)
    assert fp.scheme == "unknown" and fp.nearest


@pytest.mark.parametrize("act,scheme,std", [
    ("relu", "kaiming-normal", math.sqrt(2 / IN)),
    ("leaky_relu:0.2", "kaiming-normal", nn.init.calculate_gain("leaky_relu", 0.2) / math.sqrt(IN)),
    ("tanh", "xavier-uniform", 5 / 3 * math.sqrt(2 / (IN + OUT))),
    ("sigmoid", "xavier-uniform", math.sqrt(2 / (IN + OUT))),
    ("selu", "lecun-normal", math.sqrt(1 / IN)),
    ("identity", "lecun-normal", math.sqrt(1 / IN)),
])
def test_recommendation_follows_the_selection_guide(act, scheme, std):
    from initaudit.flow.activations import parse

    rec = schemes.recommend(parse(act), IN, OUT)
    assert rec.scheme == scheme and rec.std == pytest.approx(std)
    assert schemes.recommend(parse("unknown"), IN, OUT) is None


# ---------------------------------------------------------------- the cases of issue 11


def fp_of(w: torch.Tensor, kind: str = "linear", **kw) -> schemes.Fingerprint:
    from initaudit.flow.layers import fans

    fan_in, fan_out, axis = fans(kind, tuple(w.shape))
    return schemes.fingerprint(stats.compute(w, axis), fan_in, fan_out, kind, weight=w, **kw)


def test_std_tolerance_follows_the_sampling_error():
    """262k values know the std to 0.14 %: fan_out LeCun is not Xavier at tanh's gain (2.3 % off, 38 errors)."""
    torch.manual_seed(0)
    w = nn.init.kaiming_normal_(torch.empty(256, 1024), mode="fan_out", nonlinearity="linear")
    fp = fp_of(w, activation=Activation("relu"))
    assert fp.scheme == "lecun-normal-fan-out" and abs(fp.evidence["std_z"]) < 4
    assert abs(fp.evidence["runner_up_std_z"]) > 20


def test_a_uniform_no_scheme_draws_is_unknown():
    torch.manual_seed(0)
    w = nn.init.uniform_(torch.empty(64, 64, 3, 3), -0.085, 0.085)  # kaiming_uniform_'s bound is 0.102, at slope 0.5 0.091
    fp = fp_of(w, "conv2d", activation=Activation("tanh"))
    assert fp.scheme == "unknown" and fp.nearest == "kaiming-uniform"
    # ±0.1 is kaiming_uniform_(a=0.2) on fan_in 576 (0.102 at ReLU's gain, 2 % off): the slope is fitted
    w = nn.init.uniform_(torch.empty(64, 64, 3, 3), -0.1, 0.1)
    assert fp_of(w, "conv2d", activation=Activation("tanh")).scheme == "kaiming-uniform(a=0.2)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,kind", [((64, 64), "linear"), ((4096, 256), "linear"), ((256, 4096), "linear"),
                                        ((1000, 64), "embedding"), ((32, 16, 3, 3), "conv2d"), ((2, 8), "linear")])
def test_orthogonal_at_any_size_on_embeddings_and_in_half_precision(shape, kind, dtype):
    for gain in (1.0, math.sqrt(2)):
        torch.manual_seed(0)
        w = nn.init.orthogonal_(torch.empty(shape), gain=gain).to(dtype)
        fp = fp_of(w, kind)
        assert fp.scheme == "orthogonal" and fp.evidence["gain"] == pytest.approx(gain, rel=1e-2)
        iid = nn.init.normal_(torch.empty(shape), std=fp.implied_std).to(dtype)
        assert fp_of(iid, kind).scheme != "orthogonal"


def test_small_uniform_tensors_are_named_uniform():
    """Every |w| of a uniform draw is within √3·std: 160 values are plenty."""
    for seed in range(8):
        torch.manual_seed(seed)
        assert fp_of(nn.Linear(16, 10).weight.detach().clone()).scheme == "torch-default"
        w = nn.init.kaiming_uniform_(torch.empty(10, 16), nonlinearity="relu")
        assert fp_of(w).scheme == "kaiming-uniform"
        w = nn.init.xavier_uniform_(torch.empty(8, 3, 3, 3))  # SELU-gain Kaiming's std is 1.5 % off: may tie
        fp = fp_of(w, "conv2d")
        assert "xavier-uniform" in fp.scheme.split("|") and fp.shape == "uniform", fp.scheme


def test_near_tie_is_reported_as_such():
    """The stem Conv2d(3, 64, 7): Xavier's std is 2.3 % from fan_out Kaiming's, about 3 standard errors."""
    named = Counter()
    for seed in range(10):
        torch.manual_seed(seed)
        fp = fp_of(nn.init.xavier_normal_(torch.empty(64, 3, 7, 7)), "conv2d", activation=Activation("relu"))
        assert "xavier-normal" in fp.scheme.split("|"), fp.scheme
        named[fp.scheme] += 1
        if fp.ambiguous:
            assert {a.scheme for a in fp.alternatives} == set(fp.scheme.split("|")) and "tie" in fp.evidence
    # ... a tie with fan_out Kaiming (at ReLU's gain, or at the leaky slope 0.2 whose std is Xavier's here)
    assert any("xavier-normal" in n.split("|") and any(s.startswith("kaiming-normal-fan-out") for s in n.split("|"))
               for n in named), named


@pytest.mark.parametrize("nonlinearity,name", [("selu", "kaiming-normal-selu-gain"), ("tanh", "kaiming-normal-tanh-gain"),
                                               ("linear", "lecun-normal"), ("relu", "kaiming-normal")])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_every_gain_and_fan_mode_is_named(nonlinearity, name, mode):
    torch.manual_seed(0)
    w = nn.init.kaiming_normal_(torch.empty(192, 640), mode=mode, nonlinearity=nonlinearity)  # no two schemes alias
    expected = name.replace("-normal", "-normal-fan-out") if mode == "fan_out" else name
    fp = fp_of(w)
    assert fp.scheme == expected and fp.fan == mode


def test_depthwise_fan_out_kaiming_is_named_and_not_an_error():
    """torch counts a depthwise conv's fan_out as channels·k² (1152) against fan_in k² (9)."""
    import initaudit

    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.ReLU()]
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    report = initaudit.audit(model)
    # Xavier's std, sqrt(2/(9 + 1152)), is 0.4 % from it: 1,152 values cannot tell them apart
    assert {r.scheme for r in report.layers} <= {"kaiming-normal-fan-out", "kaiming-normal-fan-out|xavier-normal",
                                                 "xavier-normal|kaiming-normal-fan-out"}
    assert {(r.fan_in, r.fan_out) for r in report.layers} == {(9, 1152)}
    scheme_verdicts = [f for f in report.findings if f.rule in ("init-activation-mismatch", "variance-out-of-range")]
    assert scheme_verdicts and all(f.severity == "info" for f in scheme_verdicts), report.findings
    # Stacked without the norms MobileNets put after them, these convs do lose the signal (gain 9·2/1152/2 = 1/128
    # per layer): the depth analysis, not the per-layer scheme verdict, says so.
    assert {f.rule for f in report.findings if f.severity != "info"} == {"signal-vanishing"}


def test_a_rule_judges_every_name_of_a_near_tie():
    from initaudit.judge import rules

    mismatch = next(r for r in rules.builtin_rules() if r.name == "init-activation-mismatch")
    base = {"role": "weight", "kind": "linear", "activation_family": "relu", "run_depth": 12, "norm_after": False,
            "state": "fresh", "order_known": True, "std_ratio": 0.7}
    xavier = {"scheme": "xavier-normal", "scheme_family": "xavier", "scheme_gain": "linear", "scheme_fan": "both"}
    lecun = {"scheme": "lecun-normal", "scheme_family": "lecun", "scheme_gain": "linear", "scheme_fan": "fan_in"}
    kaiming = {"scheme": "kaiming-normal-fan-out", "scheme_family": "kaiming", "scheme_gain": "relu", "scheme_fan": "fan_out"}
    assert mismatch.verdict({**base, **xavier}) == "error"
    assert mismatch.verdict({**base, **xavier, rules.ALTERNATIVES: [xavier, lecun]}) == "error"  # holds for both
    assert mismatch.verdict({**base, **xavier, rules.ALTERNATIVES: [xavier, kaiming]}) == "info"   # depends on the pick
    assert mismatch.verdict({**base, **kaiming, rules.ALTERNATIVES: [kaiming, kaiming]}) is None


def test_json_layer_rows_carry_the_fit_evidence():
    import json

    import initaudit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    nn.init.xavier_normal_(model[0].weight)
    row = json.loads(json.dumps(initaudit.audit(model).to_dict()))["layers"][0]
    assert row["scheme"] == "xavier-normal"
    fit = row["fit"]
    assert fit["shape"] == "normal" and abs(fit["std_z"]) < 4 and fit["values"] == 65536
    assert fit["runner_up"] and abs(fit["runner_up_std_z"]) > abs(fit["std_z"])


def test_fan_out_lecun_above_kaiming_std_is_no_mismatch():
    """Issue 11's [256, 1024] kaiming_normal_(mode='fan_out', nonlinearity='linear') feeding ReLU: 1.41× Kaiming's std."""
    import initaudit

    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1024), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    for m in model[::2]:
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="linear")
        nn.init.zeros_(m.bias)
    report = initaudit.audit(model)
    assert report.layers[0].scheme == "lecun-normal-fan-out"
    assert report.layers[0].std / report.layers[0].expected_std == pytest.approx(math.sqrt(2), rel=0.01)
    assert not [f for f in report.findings if f.layer == "0"], report.findings
