"""Models whose forward pass multiplies a weight, a pre-activation or an activation by a constant (SIREN's ω0,
StyleGAN's equalized learning rate and ·√2 gain, a scale held in a buffer), learnable scalars (ReZero, LayerScale),
and an elementwise function initaudit does not model; each recipe beside its bug twin."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OMEGA = 30.0
WIDTH = 256


class SineLayer(nn.Module):
    """SIREN's layer: sin(ω0·(Wx+b))."""

    def __init__(self, n_in: int, n_out: int, first: bool, omega: float = OMEGA, recipe: bool = True):
        super().__init__()
        self.omega = omega
        self.linear = nn.Linear(n_in, n_out)
        bound = 1 / n_in if first else math.sqrt(6 / n_in) / omega
        if recipe:
            with torch.no_grad():
                self.linear.weight.uniform_(-bound, bound)

    def forward(self, x):
        return torch.sin(self.omega * self.linear(x))


def siren(hidden: int = 6, recipe: bool = True, torch_seed: int = 0) -> nn.Sequential:
    """SIREN (Sitzmann et al. 2020): 2-d coordinates in, sine layers of WIDTH, a linear readout. The bug twin
    (`recipe=False`) leaves the layers at torch's default init (ω0 left out of the hidden layers' bound)."""
    torch.manual_seed(torch_seed)
    layers = [SineLayer(2, WIDTH, True, recipe=recipe)]
    layers += [SineLayer(WIDTH, WIDTH, False, recipe=recipe) for _ in range(hidden)]
    readout = nn.Linear(WIDTH, 3)
    with torch.no_grad():
        bound = math.sqrt(6 / WIDTH) / OMEGA
        readout.weight.uniform_(-bound, bound)
    return nn.Sequential(*layers, readout)


def siren_bug() -> nn.Sequential:
    return siren(recipe=False)


class EqualLinear(nn.Module):
    """StyleGAN's equalized learning rate: W ~ N(0, 1/lr_mul²), applied as W·(lr_mul/√fan_in)."""

    def __init__(self, n_in: int, n_out: int, lr_mul: float = 0.01, equalized: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.scale = lr_mul / math.sqrt(n_in)
        self.lr_mul = lr_mul
        self.equalized = equalized

    def forward(self, x):
        if self.equalized:
            x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        else:
            x = F.linear(x, self.weight, self.bias)
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


def mapping(depth: int = 8, width: int = 512, equalized: bool = True, torch_seed: int = 0) -> nn.Sequential:
    """StyleGAN's mapping network: 8 equalized-LR linear layers with leaky_relu(0.2)·√2; the bug twin drops the
    runtime scale (a plain F.linear on the N(0, 1/lr_mul²) weights)."""
    torch.manual_seed(torch_seed)
    return nn.Sequential(*(EqualLinear(width, width, equalized=equalized) for _ in range(depth)))


def mapping_bug() -> nn.Sequential:
    return mapping(equalized=False)


class BufferScaled(nn.Module):
    """A linear layer whose weight, drawn N(0, 1), is scaled at run time by a constant held in a buffer."""

    def __init__(self, n: int, scaled: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))
        self.register_buffer("scale", torch.tensor(math.sqrt(2 / n) if scaled else 1.0))

    def forward(self, x):
        return torch.relu(F.linear(x, self.weight * self.scale))


def buffer_scaled(depth: int = 8, width: int = 256, scaled: bool = True, torch_seed: int = 0) -> nn.Sequential:
    """A ReLU stack whose weights are N(0, 1) times a buffer holding √(2/n) (He's std); the bug twin's buffer is 1."""
    torch.manual_seed(torch_seed)
    return nn.Sequential(*(BufferScaled(width, scaled) for _ in range(depth)))


def buffer_scaled_bug() -> nn.Sequential:
    return buffer_scaled(scaled=False)


class LeakyGain(nn.Module):
    """Linear → leaky_relu(0.2)·√2, the weight drawn at std 1/√fan_in: the gain after the activation is the recipe."""

    def __init__(self, n: int, gained: bool = True):
        super().__init__()
        self.linear = nn.Linear(n, n)
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(n))
        nn.init.zeros_(self.linear.bias)
        self.gain = math.sqrt(2) if gained else 1.0

    def forward(self, x):
        return F.leaky_relu(self.linear(x), 0.2) * self.gain


def leaky_gain(depth: int = 12, width: int = 256, gained: bool = True, torch_seed: int = 0) -> nn.Sequential:
    torch.manual_seed(torch_seed)
    return nn.Sequential(*(LeakyGain(width, gained) for _ in range(depth)))


def leaky_gain_bug() -> nn.Sequential:
    """The gain dropped: each layer's variance halves (×0.52), 12 times over."""
    return leaky_gain(gained=False)


class ReZeroBlock(nn.Module):
    """x + α·F(x), α a learnable scalar initialised 0 (Bachlechner et al. 2020)."""

    def __init__(self, n: int, alpha: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n, 4 * n), nn.Linear(4 * n, n)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x):
        return x + self.alpha * self.fc2(torch.relu(self.fc1(x)))


def rezero(depth: int = 12, width: int = 128, torch_seed: int = 0) -> nn.Sequential:
    torch.manual_seed(torch_seed)
    return nn.Sequential(nn.Linear(16, width), *(ReZeroBlock(width) for _ in range(depth)), nn.Linear(width, 10))


class LayerScaleBlock(nn.Module):
    """A pre-norm MLP block whose branch ends in γ·F(x), γ a learnable vector initialised 1e-5 (CaiT/ConvNeXt)."""

    def __init__(self, n: int, init: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.fc1, self.fc2 = nn.Linear(n, 4 * n), nn.Linear(4 * n, n)
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        self.gamma = nn.Parameter(init * torch.ones(n))

    def forward(self, x):
        return x + self.gamma * self.fc2(F.gelu(self.fc1(self.norm(x))))


def layerscale(depth: int = 12, width: int = 128, torch_seed: int = 0) -> nn.Sequential:
    torch.manual_seed(torch_seed)
    return nn.Sequential(nn.Linear(16, width), *(LayerScaleBlock(width) for _ in range(depth)), nn.LayerNorm(width),
                         nn.Linear(width, 10))


class ErfLayer(nn.Module):
    """A linear layer followed by an elementwise function initaudit does not model (erf)."""

    def __init__(self, n: int):
        super().__init__()
        self.linear = nn.Linear(n, n)

    def forward(self, x):
        return torch.erf(self.linear(x))


def erf_net(depth: int = 3, width: int = 64, torch_seed: int = 0) -> nn.Sequential:
    torch.manual_seed(torch_seed)
    return nn.Sequential(*(ErfLayer(width) for _ in range(depth)), nn.Linear(width, 10))
