"""Non-zero biases that are published recipes are named as such (info), not "the guide initializes biases to
zero": an LSTM's forget-gate bias of 1 in the ways people write it, and a constant bias (StyleGAN's style
affines start at 1); a random non-zero bias keeps the guide's word. Bug/fix twins, as a module and as a .pt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import initaudit
from helpers.verdicts import serious

HIDDEN = 32
GUIDE = "the guide initializes biases to zero"
FORGET = "the LSTM forget-gate bias 1 (Jozefowicz et al. 2015)"


class Tagger(nn.Module):
    """A two-layer LSTM tagger."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def tagger(bias: str) -> Tagger:
    """The tagger with its LSTM biases set one way (the head's bias zeroed)."""
    torch.manual_seed(0)
    model = Tagger()
    h = HIDDEN
    with torch.no_grad():
        nn.init.zeros_(model.head.bias)
        for name, b in model.lstm.named_parameters():
            if not name.startswith("bias"):
                continue
            if bias == "forget":  # bias_ih[h:2h] = 1, all else 0 (Jozefowicz et al.)
                b.zero_()
                if "_ih_" in name:
                    b[h:2 * h] = 1.0
            elif bias == "forget-both":  # the quarter set on both biases
                b.zero_()
                b[h:2 * h] = 1.0
            elif bias == "forget-slice":  # only the slice set: the other gates keep torch's default draw
                b[h:2 * h] = 1.0
            elif bias == "random":  # the bug twin: a random bias of a recipe's size
                nn.init.uniform_(b, -1.0, 1.0)
    return model


def bias_findings(report) -> dict[str, tuple[str, str]]:
    return {f.tensor: (f.severity, f.message) for f in report.findings if f.rule == "nonzero-bias"}


def audited(model: nn.Module, fmt: str, tmp_path):
    if fmt == "module":
        return initaudit.audit(model)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return initaudit.audit(str(path))


@pytest.mark.parametrize("fmt", ["module", "state_dict"])
@pytest.mark.parametrize("bias", ["forget", "forget-both", "forget-slice"])
def test_lstm_forget_gate_bias_is_named_a_recipe(bias, fmt, tmp_path):
    report = audited(tagger(bias), fmt, tmp_path)
    found = bias_findings(report)
    set_ = [t for t in found if t.startswith("lstm.bias")]
    assert set_, found
    assert all(FORGET in found[t][1] and GUIDE not in found[t][1] and found[t][0] == "info" for t in set_), found
    assert not serious(report)


@pytest.mark.parametrize("fmt", ["module", "state_dict"])
def test_a_random_lstm_bias_keeps_the_guides_word(fmt, tmp_path):
    found = bias_findings(audited(tagger("random"), fmt, tmp_path))
    assert {t for t in found if t.startswith("lstm.bias")} == {f"lstm.bias_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)}
    assert all(severity == "info" and GUIDE in message and "recipe" not in message for severity, message in found.values())


def test_a_gate_set_apart_from_the_forget_gate_is_named_per_gate():
    model = tagger("forget")
    with torch.no_grad():
        model.lstm.bias_ih_l0.zero_()
        model.lstm.bias_ih_l0[3 * HIDDEN:] = 0.5  # the output gate
    message = bias_findings(initaudit.audit(model))["lstm.bias_ih_l0"][1]
    assert "LSTM biases set gate by gate (0, 0, 0, 0.5)" in message and FORGET not in message


def style_mlp(bias: float | None) -> nn.Sequential:
    """A StyleGAN-like mapping MLP whose last (affine) layer's bias starts at `bias` (None: drawn at random)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 32))
    for layer in model[::2]:
        nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
        nn.init.zeros_(layer.bias)
    if bias is None:
        nn.init.normal_(model[4].bias, std=0.5)
    else:
        nn.init.constant_(model[4].bias, bias)
    return model


def test_a_constant_bias_is_named_a_recipe_and_a_random_one_is_not():
    recipe = bias_findings(initaudit.audit(style_mlp(1.0)))
    assert list(recipe) == ["4.bias"] and "a constant bias of 1, set on purpose" in recipe["4.bias"][1]
    assert GUIDE not in recipe["4.bias"][1]
    drawn = bias_findings(initaudit.audit(style_mlp(None)))
    assert list(drawn) == ["4.bias"] and GUIDE in drawn["4.bias"][1]
