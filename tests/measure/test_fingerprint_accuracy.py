"""How often the fingerprint names the scheme torch.nn.init drew: every scheme × gain × fan mode (and torch's
module defaults) on shapes from 10×16 to 4096×4096, depthwise and grouped convs, embeddings and LSTM weights,
in fp32, fp16 and bf16, over several seeds. A near-tie that includes the truth counts as right; "unknown"
and other near-ties are allowed below the thresholds; a wrong single name never changes a rule's verdict.
Then deep stacks: no mismatch on a correctly paired init, a warning on every Xavier→ReLU and Kaiming→tanh."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import initaudit
from initaudit.judge import rules
from initaudit.measure import schemes, stats
from initaudit.flow.layers import fans
from initaudit.flow.layer import UNIT_KINDS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MISMATCH = "init-activation-mismatch"


@dataclass(frozen=True)
class Shape:
    label: str
    kind: str
    shape: tuple[int, ...]
    hidden: int | None = None  # LSTM hidden size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


SHAPES = [
    Shape("linear 16→10", "linear", (10, 16)),
    Shape("conv 3→8 3×3", "conv2d", (8, 3, 3, 3)),
    Shape("linear 16→16", "linear", (16, 16)),
    Shape("lstm ih 8→16", "recurrent", (64, 8), 16),
    Shape("depthwise 32 5×5", "conv2d", (32, 1, 5, 5)),
    Shape("embedding 50×16", "embedding", (50, 16)),
    Shape("depthwise 128 3×3", "conv2d", (128, 1, 3, 3)),
    Shape("linear 64→32", "linear", (32, 64)),
    Shape("conv_t 16→8 4×4", "conv_transpose2d", (16, 8, 4, 4)),
    Shape("grouped 64/8 3×3", "conv2d", (64, 8, 3, 3)),
    Shape("stem 3→64 7×7", "conv2d", (64, 3, 7, 7)),
    Shape("lstm hh 64", "recurrent", (256, 64), 64),
    Shape("conv 64→64 3×3", "conv2d", (64, 64, 3, 3)),
    Shape("embedding 1000×64", "embedding", (1000, 64)),
    Shape("linear 1024→256", "linear", (256, 1024)),
    Shape("linear 512→512", "linear", (512, 512)),
    Shape("linear 4096→4096", "linear", (4096, 4096)),
]

# calculate_gain's nonlinearities -> the gain a scheme's name states (sigmoid and conv are 1, leaky_relu's
# default slope 0.01 is ReLU's gain to 0.005 %)
NONLINEARITIES = {"relu": "relu", "leaky_relu": "relu", "linear": "linear", "sigmoid": "linear", "conv2d": "linear",
                  "tanh": "tanh", "selu": "selu"}
TAG = {"linear": "", "relu": "-relu-gain", "tanh": "-tanh-gain", "selu": "-selu-gain"}


def kaiming_name(gain: str, dist: str, mode: str) -> tuple[str, str]:
    family = "lecun" if gain == "linear" else "kaiming"
    return f"{family}-{dist}{'-fan-out' if mode == 'fan_out' else ''}{'' if gain in ('linear', 'relu') else TAG[gain]}", gain


def torch_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """torch.nn.init's fans: dim 1 and dim 0 times the receptive field (depthwise: fan_out = channels·k²)."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def draws(spec: Shape) -> dict[str, tuple]:
    """name -> (expected scheme, the gain it states, the distribution it draws (shape, std) by torch's
    formulas, a function filling a tensor of the spec's shape)."""
    out = {}
    fan_in, fan_out = torch_fans(spec.shape)
    for dist in ("normal", "uniform"):
        for nl, gain in NONLINEARITIES.items():
            for mode in ("fan_in", "fan_out"):
                fn = getattr(nn.init, f"kaiming_{dist}_")
                std = nn.init.calculate_gain(nl) / math.sqrt(fan_in if mode == "fan_in" else fan_out)
                out[f"kaiming_{dist}_({mode}, {nl})"] = (*kaiming_name(gain, dist, mode), (dist, std),
                                                        lambda w, fn=fn, m=mode, n=nl: fn(w, mode=m, nonlinearity=n))
        for nl in ("linear", "relu", "tanh", "selu"):
            fn = getattr(nn.init, f"xavier_{dist}_")
            std = nn.init.calculate_gain(nl) * math.sqrt(2 / (fan_in + fan_out))
            out[f"xavier_{dist}_(gain {nl})"] = (f"xavier-{dist}{TAG[nl]}", nl, (dist, std),
                                                  lambda w, fn=fn, n=nl: fn(w, gain=nn.init.calculate_gain(n)))
    for g in (1.0, math.sqrt(2)):
        out[f"orthogonal_(gain {g:.3g})"] = ("orthogonal", "", ("orthogonal", 1.0),
                                             lambda w, g=g: nn.init.orthogonal_(w, gain=g))
    out["normal_(std 0.02)"] = ("normal-0.02", "", ("normal", 0.02), lambda w: nn.init.normal_(w, std=0.02))
    out["normal_(std 0.01)"] = ("normal-0.01", "", ("normal", 0.01), lambda w: nn.init.normal_(w, std=0.01))
    out["trunc_normal_(std 0.02, ±2σ)"] = ("trunc-normal-0.02", "", ("trunc-normal", 0.02),
                                            lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04))
    if spec.kind == "embedding":  # nn.Embedding's own init
        out["torch default"] = ("torch-default", "", ("normal", 1.0), lambda w: nn.init.normal_(w))
    elif spec.kind == "recurrent":  # nn.LSTM's own init: uniform ±1/sqrt(hidden)
        out["torch default"] = ("torch-default", "", ("uniform", 1 / math.sqrt(3 * spec.hidden)),
                                lambda w: nn.init.uniform_(w, -spec.hidden ** -0.5, spec.hidden ** -0.5))
    else:  # nn.Linear / nn.Conv*'s own init
        out["torch default"] = ("torch-default", "", ("uniform", 1 / math.sqrt(3 * fan_in)),
                                lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
    return out


def same_distribution(a: tuple[str, float], b: tuple[str, float]) -> bool:
    """Two schemes that draw one distribution on this shape (Xavier and LeCun on a square layer; leaky_relu's default
    slope and ReLU, 0.005 % apart): no name is wrong."""
    return a[0] == b[0] and abs(math.log(a[1] / b[1])) < 1e-4


IA201 = next(r for r in rules.builtin_rules() if r.name == MISMATCH)


def mismatch_verdicts(family: str, gain: str) -> tuple:
    """IA201's verdict on a deep, unnormalized layer with this scheme, feeding ReLU and feeding tanh."""
    base = {"role": "weight", "kind": "linear", "run_depth": 12, "norm_after": False, "state": "fresh",
            "order_known": True, "std_ratio": 0.7, "scheme_family": family, "scheme_gain": gain}
    return tuple(IA201.verdict({**base, "activation_family": act}) for act in ("relu", "saturating"))


def family_of(scheme: str) -> str:
    return scheme.split("-")[0] if scheme.split("-")[0] in ("kaiming", "lecun", "xavier", "orthogonal") else \
        "torch-default" if scheme == "torch-default" else "fixed"


def tier(numel: int) -> str:
    return "≥ 1024" if numel >= 1024 else "160–1023" if numel >= 160 else "< 160"


def measure(specs: list[Shape], dtypes: list[str], seeds: list[int], big_seeds: list[int]) -> list[dict]:
    results = []
    for spec in specs:
        fan_in, fan_out, unit_axis = fans(spec.kind, spec.shape)
        drawn_by = draws(spec)
        distribution = {truth: dist for truth, _, dist, _ in drawn_by.values()}
        for name, (truth, gain, dist, fill) in drawn_by.items():
            aliases = {n for n, d in distribution.items() if same_distribution(d, dist)}
            for seed in (big_seeds if spec.numel > 1 << 20 else seeds):
                torch.manual_seed(seed)
                drawn = fill(torch.empty(spec.shape))
                for dt in dtypes:
                    w = drawn.to(DTYPES[dt])
                    st = stats.compute(w, unit_axis, units=spec.kind in UNIT_KINDS)
                    fp = schemes.fingerprint(st, fan_in, fan_out, spec.kind, weight=w,
                                             hidden=spec.hidden)
                    names = fp.scheme.split("|")
                    outcome = ("right" if len(names) == 1 and names[0] in aliases else
                               "tie incl. truth" if aliases & set(names) else
                               "unknown" if fp.scheme == "unknown" else "wrong tie" if len(names) > 1 else "wrong")
                    results.append(dict(shape=spec.label, numel=spec.numel, draw=name, truth=truth, gain=gain,
                                        dtype=dt, seed=seed, scheme=fp.scheme, family=fp.family, scheme_gain=fp.gain,
                                        outcome=outcome))
    return results


def table(results: list[dict]) -> str:
    outcomes = ["right", "tie incl. truth", "unknown", "wrong tie", "wrong"]
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for r in results:
        counts[(tier(r["numel"]), r["dtype"])][r["outcome"]] += 1
        counts[(tier(r["numel"]), "all")][r["outcome"]] += 1
    lines = [f"{'values':<9} {'dtype':<5} {'draws':>6} " + " ".join(f"{o:>15}" for o in outcomes) + f" {'named right':>12}"]
    for key in sorted(counts):
        c = counts[key]
        n = sum(c.values())
        lines.append(f"{key[0]:<9} {key[1]:<5} {n:>6} " + " ".join(f"{c[o]:>15}" for o in outcomes)
                     + f" {100 * (c['right'] + c['tie incl. truth']) / n:>11.2f}%")
    misses = Counter((r["shape"], r["draw"], r["outcome"], r["scheme"]) for r in results
                     if r["outcome"] not in ("right", "tie incl. truth"))
    lines += ["misses (shape, draw, outcome, named):"] + [f"  {k} × {v}" for k, v in misses.most_common(25)]
    return "\n".join(lines)


def check(results: list[dict]) -> None:
    print("\n" + table(results))
    for name, low in (("≥ 1024", 0.995), ("160–1023", 0.90)):
        tiered = [r for r in results if tier(r["numel"]) == name]
        right = sum(r["outcome"] in ("right", "tie incl. truth") for r in tiered)
        assert right >= low * len(tiered), f"{name} values: {right}/{len(tiered)} named right"
    for r in results:  # a wrong single name never changes what the mismatch rule says
        if r["outcome"] == "wrong" and r["numel"] >= 160:
            assert mismatch_verdicts(r["family"], r["scheme_gain"]) == mismatch_verdicts(family_of(r["truth"]), r["gain"]), r


def test_accuracy_on_a_representative_grid():
    """The default suite's share of the grid: every scheme on every shape but the largest, each dtype, one seed."""
    check(measure([s for s in SHAPES if s.numel <= 1 << 16], list(DTYPES), [0], []))


@pytest.mark.slow
def test_accuracy_on_the_full_grid():
    check(measure(SHAPES, list(DTYPES), [0, 1, 2], [0]))


# ---------------------------------------------------------------- deep stacks


def mlp(width: int, act: type[nn.Module], depth: int = 12, inp: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth - 1):
        layers += [nn.Linear(inp or width if i == 0 else width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn(channels: int, act: type[nn.Module], depth: int = 12) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth - 1):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), act()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, 10))


STACKS = {"mlp 256": lambda act: mlp(256, act), "mlp 64→96": lambda act: mlp(96, act, inp=64),
          "cnn 32": lambda act: cnn(32, act)}
PAIRED = {  # correctly paired: activation -> inits of its hidden layers
    nn.ReLU: [lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
              lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
              lambda w: nn.init.kaiming_normal_(w, nonlinearity="leaky_relu")],
    nn.Tanh: [lambda w: nn.init.xavier_normal_(w, gain=nn.init.calculate_gain("tanh")),
              lambda w: nn.init.xavier_uniform_(w), lambda w: nn.init.kaiming_normal_(w, nonlinearity="tanh")],
    nn.SELU: [lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
              lambda w: nn.init.kaiming_normal_(w, nonlinearity="selu")],
}
MISPAIRED = {
    nn.ReLU: [nn.init.xavier_normal_, nn.init.xavier_uniform_],
    nn.Tanh: [lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
              lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu")],
    nn.Sigmoid: [lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")],
}


def stack(name: str, act: type[nn.Module], init, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    model = STACKS[name](act)
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            init(m.weight)
            nn.init.zeros_(m.bias)
    return model.to(dtype)


def hidden_layers(model: nn.Module) -> set[str]:
    """The layers that feed the activation (all weighted layers but the output)."""
    return {n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))} - {str(len(model) - 1)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(STACKS))
def test_deep_stacks_warn_every_mismatch_and_no_pairing(name, dtype):
    for act, inits in PAIRED.items():
        for k, init in enumerate(inits):
            for seed in (0, 1):
                report = initaudit.audit(stack(name, act, init, seed, DTYPES[dtype]))
                assert not [f for f in report.findings if f.rule == MISMATCH], (act, k, seed, report.findings)
    for act, inits in MISPAIRED.items():
        for k, init in enumerate(inits):
            for seed in (0, 1):
                model = stack(name, act, init, seed, DTYPES[dtype])
                report = initaudit.audit(model)
                # at warning or, in runs of 10 or more (the selection guide's "deep"), error
                warned = {f.layer for f in report.findings if f.rule == MISMATCH and f.severity in ("warning", "error")}
                assert warned == hidden_layers(model), (act, k, seed, [(r.name, r.scheme) for r in report.layers])


# ---------------------------------------------------------------- Kaiming at any leaky slope

SLOPES = [0.0, 0.01, 0.1, 0.2, 0.3, 1 / math.sqrt(5), 0.5]  # 1/√5: the slope whose square torch's default √5 inverts


def leaky_named(fp: schemes.Fingerprint, st: stats.TensorStats, dtype: torch.dtype, dist: str, std: float) -> bool:
    """The fingerprint names Kaiming (alone or in a near-tie) of the drawn shape at a std within sampling error
    (Z_STD standard errors, the dtype's rounding too) of the drawn one: the slope it states fits the draw. A named
    scheme drawing the very same distribution (Xavier on 1024→256 is Kaiming fan_in at slope 0.5) is right too."""
    names = fp.alternatives or (schemes.Alternative(fp.scheme, fp.family, fp.gain, fp.fan, fp.implied_std),)
    half_ulp = torch.finfo(dtype).eps / 4
    se = math.sqrt((schemes.EXCESS_KURTOSIS[dist] + 2) / (4 * st.finite) + half_ulp ** 2)
    return any(a.family == "kaiming" and a.scheme.startswith(f"kaiming-{dist}")
               and abs(math.log(a.implied_std / std)) <= schemes.Z_STD * se
               or fp.shape == dist and same_distribution((dist, a.implied_std), (dist, std)) for a in names)


def leaky_grid(specs: list[Shape], dtypes: list[str], seeds: list[int]) -> list[tuple[str, str, bool]]:
    """(shape, draw, named right) for kaiming_{normal,uniform}_(a, mode, 'leaky_relu') at every slope."""
    out = []
    for spec in specs:
        fan_in, fan_out, unit_axis = fans(spec.kind, spec.shape)
        torch_in, torch_out = torch_fans(spec.shape)
        for dist in ("normal", "uniform"):
            fill = getattr(nn.init, f"kaiming_{dist}_")
            for mode, fan in (("fan_in", torch_in), ("fan_out", torch_out)):
                for a in SLOPES:
                    std = nn.init.calculate_gain("leaky_relu", a) / math.sqrt(fan)
                    for seed in seeds:
                        torch.manual_seed(seed)
                        drawn = fill(torch.empty(spec.shape), a=a, mode=mode, nonlinearity="leaky_relu")
                        for dt in dtypes:
                            w = drawn.to(DTYPES[dt])
                            st = stats.compute(w, unit_axis, units=spec.kind in UNIT_KINDS)
                            fp = schemes.fingerprint(st, fan_in, fan_out, spec.kind, weight=w)
                            out.append((spec.label, f"kaiming_{dist}_(a={a:.3g}, {mode}) {dt} seed {seed}: {fp.scheme}",
                                        leaky_named(fp, st, w.dtype, dist, std)))
    return out


# linear and conv shapes of 1024 values or more (transposed convs read torch's dim-1 fan: the grid above pins them)
LEAKY_SHAPES = [s for s in SHAPES if s.kind in ("linear", "conv2d") and 1024 <= s.numel <= 1 << 18]


def check_leaky(results: list[tuple[str, str, bool]]) -> None:
    missed = [(shape, draw) for shape, draw, right in results if not right]
    assert len(missed) <= 0.01 * len(results), missed


def test_kaiming_at_any_leaky_slope_is_named():
    """kaiming uniform/normal × fan_in/fan_out × 7 slopes × 7 shapes × fp32/bf16: ≥ 99 % named Kaiming at a gain
    that fits (before the slope was fitted, slopes 0.2-0.5 were `unknown` or another family on large layers)."""
    check_leaky(leaky_grid(LEAKY_SHAPES, ["fp32", "bf16"], [0]))


@pytest.mark.slow
def test_kaiming_at_any_leaky_slope_is_named_over_seeds():
    check_leaky(leaky_grid(LEAKY_SHAPES, ["fp32", "bf16"], [0, 1, 2]))


def test_the_gan_default_slope_is_fitted_and_shown():
    """kaiming_normal_(a=0.2, nonlinearity='leaky_relu'), the GAN default, on a 512×512 layer: named with its slope."""
    torch.manual_seed(0)
    w = nn.init.kaiming_normal_(torch.empty(512, 512), a=0.2, nonlinearity="leaky_relu")
    fp = schemes.fingerprint(stats.compute(w), 512, 512, "linear", weight=w)
    assert fp.scheme == "kaiming-normal(a=0.2)" and fp.family == "kaiming" and fp.gain == "leaky_relu", fp
    assert abs(fp.slope - 0.2) < 0.02 and fp.evidence["slope"] == pytest.approx(fp.slope, rel=1e-3)
    relu = nn.init.kaiming_normal_(torch.empty(512, 512), nonlinearity="relu")  # the twin: ReLU's gain stays plain
    assert schemes.fingerprint(stats.compute(relu), 512, 512, "linear", weight=relu).scheme == "kaiming-normal"


def test_xavier_and_a_slope_drawing_one_std_are_a_near_tie_on_a_small_layer():
    """On a 64→16 layer Xavier's std is Kaiming fan_in's at slope 0.5: 1024 values cannot tell them apart, and the
    fitted slope's ½·ln n nats are within the near-tie; on 1024→256 (262144 values) the named scheme keeps its name."""
    torch.manual_seed(0)
    w = nn.init.xavier_normal_(torch.empty(16, 64))
    fp = schemes.fingerprint(stats.compute(w), 64, 16, "linear", weight=w)
    assert fp.ambiguous and "xavier-normal" in fp.scheme.split("|"), fp
    assert any(a.gain == "leaky_relu" and a.scheme.startswith("kaiming-normal(a=") for a in fp.alternatives), fp
    w = nn.init.xavier_normal_(torch.empty(256, 1024))
    assert schemes.fingerprint(stats.compute(w), 1024, 256, "linear", weight=w).scheme == "xavier-normal"
