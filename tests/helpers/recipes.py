"""Published init recipes, built small from the papers and repositories that define them, and their bug twins.

Each `build_<id>` draws a model the way its source does (the docstring names the source and the recipe);
each `build_<id>_twin` draws the same model broken the way users break it (the docstring names the bug).
Every builder seeds torch itself, so `--model helpers.recipes:build_<id>`, the saved state_dict and the ONNX
export hold the same numbers. Sizes are tiny (width 16-64) but deep where the recipe is about depth.
The table the tests hold them to is tests/e2e/recipes.yaml.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0


def seeded(build):
    """Seed torch before `build`, so every format of one recipe holds the same draw."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        torch.manual_seed(SEED)
        return build(*args, **kwargs).eval()
    return wrapper


def zero_bias(module: nn.Module) -> None:
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------ plain deep stacks (the selection guide)

def mlp(depth: int, width: int, act: type[nn.Module], init, inputs: int = 32, outputs: int = 10) -> nn.Sequential:
    """`depth` Linear layers with `act` between them, each weight drawn by `init(weight)`, biases zero."""
    sizes = [inputs] + [width] * (depth - 1) + [outputs]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        init(linear.weight)
        zero_bias(linear)
        layers += [linear, act()] if i < depth - 1 else [linear]
    return nn.Sequential(*layers)


@seeded
def build_kaiming_relu():
    """He et al. 2015 (arXiv:1502.01852): a 12-layer ReLU MLP, kaiming_normal_(fan_in, relu), zero biases."""
    return mlp(12, 64, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))


@seeded
def build_kaiming_relu_twin():
    """Bug: Xavier (the tanh recipe) into 12 ReLU layers, no norm or residual: the guide's headline mismatch."""
    return mlp(12, 64, nn.ReLU, nn.init.xavier_normal_)


@seeded
def build_xavier_tanh():
    """Glorot & Bengio 2010: a 12-layer tanh MLP, xavier_normal_ (gain 1), zero biases."""
    return mlp(12, 64, nn.Tanh, nn.init.xavier_normal_)


@seeded
def build_xavier_tanh_twin():
    """Bug: Kaiming (the ReLU recipe) into 12 tanh layers."""
    return mlp(12, 64, nn.Tanh, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))


@seeded
def build_orthogonal_tanh():
    """Saxe et al. 2014 (arXiv:1312.6120): a 12-layer tanh MLP, orthogonal_ at gain 5/3 (calculate_gain('tanh'))."""
    return mlp(12, 64, nn.Tanh, lambda w: nn.init.orthogonal_(w, gain=nn.init.calculate_gain("tanh")))


@seeded
def build_orthogonal_tanh_twin():
    """Bug: the activation switched to sigmoid, the tanh recipe (orthogonal, gain 5/3) left in place: sigmoid's
    slope is 1/4, so 12 layers shrink the signal and its gradient ~0.17x per layer."""
    return mlp(12, 64, nn.Sigmoid, lambda w: nn.init.orthogonal_(w, gain=nn.init.calculate_gain("tanh")))


@seeded
def build_snn_selu():
    """Klambauer et al. 2017 (SNN, arXiv:1706.02515): a 16-layer SELU MLP, LeCun normal N(0, 1/fan_in), zero biases
    (torch's docs: kaiming_normal_(nonlinearity='linear') for SELU)."""
    return mlp(16, 64, nn.SELU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"))


@seeded
def build_snn_selu_twin():
    """Bug: SELU left at nn.Linear's default init (std 1/√(3·fan_in), a third of LeCun's variance): the
    self-normalizing fixed point is lost and the signal shrinks through 16 layers."""
    return mlp(16, 64, nn.SELU, lambda w: None)


@seeded
def build_leaky_discriminator():
    """A GAN discriminator MLP (DCGAN/PGGAN style) of 10 layers with leaky_relu(0.2), kaiming_normal_(a=0.2,
    nonlinearity='leaky_relu'), zero biases."""
    return mlp(10, 64, lambda: nn.LeakyReLU(0.2),
               lambda w: nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu"), outputs=1)


@seeded
def build_leaky_discriminator_twin():
    """Bug: xavier_uniform_ into 10 leaky_relu(0.2) layers (variance halved per layer)."""
    return mlp(10, 64, lambda: nn.LeakyReLU(0.2), nn.init.xavier_uniform_, outputs=1)


def zero_head_classifier(zeroed: int) -> nn.Sequential:
    model = mlp(3, 64, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    nn.init.zeros_(model[zeroed].weight)
    return model


@seeded
def build_zero_head():
    """Zero-initialized classifier head (Goyal et al. 2017; timm's head_init_scale=0; muP readout): a 3-layer
    Kaiming ReLU MLP whose last Linear is zero."""
    return zero_head_classifier(-1)


@seeded
def build_zero_head_twin():
    """Bug: `nn.init.zeros_(model[0].weight)` — the zero meant for the head lands on the first layer."""
    return zero_head_classifier(0)


# ------------------------------------------------------------------ SIREN

class SineLayer(nn.Module):
    """sin(ω0·(Wx + b)), as in SIREN's reference code."""

    def __init__(self, n_in: int, n_out: int, omega_0: float, first: bool, hidden_bound: float):
        super().__init__()
        self.omega_0, self.linear = omega_0, nn.Linear(n_in, n_out)
        bound = 1 / n_in if first else hidden_bound
        nn.init.uniform_(self.linear.weight, -bound, bound)

    def forward(self, x):
        return torch.sin(self.omega_0 * self.linear(x))


def siren(hidden_bound) -> nn.Sequential:
    width, omega = 32, 30.0
    layers = [SineLayer(2, width, omega, True, 0.0)]
    layers += [SineLayer(width, width, omega, False, hidden_bound(width, omega)) for _ in range(4)]
    head = nn.Linear(width, 1)
    nn.init.uniform_(head.weight, -hidden_bound(width, omega), hidden_bound(width, omega))
    return nn.Sequential(*layers, head)


@seeded
def build_siren():
    """Sitzmann et al. 2020 (SIREN, arXiv:2006.09661, vsitzmann/siren): sin(ω0·Wx) with ω0=30, first layer
    U(±1/n), hidden and last layers U(±√(6/n)/ω0); 5 sine layers, width 32."""
    return siren(lambda n, omega: math.sqrt(6 / n) / omega)


@seeded
def build_siren_twin():
    """Bug: hidden weights U(±√(6/n)) — the division by ω0 forgotten, so every pre-activation is 30x too wide."""
    return siren(lambda n, omega: math.sqrt(6 / n))


# ------------------------------------------------------------------ residual MLPs: ReZero, SkipInit-like, ResMLP

class ScaledResidualBlock(nn.Module):
    """x + α·W2 relu(W1 x), α a learnable scalar (ReZero) — no normalization."""

    def __init__(self, width: int, alpha: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        for linear in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            zero_bias(linear)
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x):
        return x + self.alpha * self.fc2(torch.relu(self.fc1(x)))


def rezero_mlp(alpha: float) -> nn.Sequential:
    stem, head = nn.Linear(32, 64), nn.Linear(64, 10)
    return nn.Sequential(stem, *[ScaledResidualBlock(64, alpha) for _ in range(24)], head)


@seeded
def build_rezero():
    """Bachlechner et al. 2020 (ReZero, arXiv:2003.04887): x + α·F(x) with α=0, no normalization; 24 blocks of
    Kaiming ReLU MLP branches."""
    return rezero_mlp(0.0)


@seeded
def build_rezero_twin():
    """Bug: α initialized to 1 (the README's "try α=1"): 24 Kaiming branches added with no normalization, the
    residual stream grows ~2x in variance per block."""
    return rezero_mlp(1.0)


class Affine(nn.Module):
    """ResMLP's Aff: α·x + β, α ones, β zeros."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.alpha * x + self.beta


class ResMLPBlock(nn.Module):
    """ResMLP (Touvron et al. 2021): token-mixing Linear and channel MLP, each Aff-normalized and LayerScaled."""

    def __init__(self, dim: int, patches: int, init_values: float):
        super().__init__()
        self.norm1, self.norm2 = Affine(dim), Affine(dim)
        self.attn = nn.Linear(patches, patches)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.gamma_2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ResMLP(nn.Module):
    def __init__(self, init_values: float, depth: int = 12, dim: int = 32, patches: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*[ResMLPBlock(dim, patches, init_values) for _ in range(depth)])
        self.norm, self.head = Affine(dim), nn.Linear(dim, 10)
        for m in self.modules():  # deit's resmlp_models.py: trunc_normal_(std=.02) on Linear, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                zero_bias(m)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


@seeded
def build_resmlp_layerscale():
    """Touvron et al. 2021 (ResMLP, arXiv:2105.03404; CaiT's LayerScale, arXiv:2103.17239): no normalization, only
    Aff; each branch times LayerScale γ = 0.1 (depth ≤ 18); Linear trunc_normal(0.02), zero biases; 12 blocks."""
    return ResMLP(0.1)


@seeded
def build_resmlp_layerscale_twin():
    """Bug: CaiT's `init_values=1e-5` copied as `1e5`: every branch is multiplied by 10⁵ in a stack with no
    normalization (Aff is not a norm), so the residual stream explodes block after block."""
    return ResMLP(1e5)


# ------------------------------------------------------------------ muP

class MuPMLP(nn.Module):
    """muP MLP (Yang et al. 2022, microsoft/mup's MuReadout): input and hidden layers N(0, 1/fan_in)·√2 (Kaiming),
    readout zero-initialized with output multiplier 1/width_mult."""

    def __init__(self, width: int = 64, base_width: int = 16, zero_all: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, width), nn.Linear(width, width), nn.Linear(width, width)
        self.readout = nn.Linear(width, 10)
        self.output_mult = base_width / width
        for linear in (self.fc1, self.fc2, self.fc3):
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            zero_bias(linear)
        for linear in (self.fc1, self.fc2, self.fc3, self.readout) if zero_all else (self.readout,):
            nn.init.zeros_(linear.weight)
            zero_bias(linear)

    def forward(self, x):
        x = torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))))
        return self.readout(x) * self.output_mult


@seeded
def build_mup():
    """muP (Tensor Programs V, arXiv:2203.03466): zero readout, output multiplier base_width/width."""
    return MuPMLP()


@seeded
def build_mup_twin():
    """Bug: the readout's zero init written as a loop over every nn.Linear: all hidden layers zero too."""
    return MuPMLP(zero_all=True)


# ------------------------------------------------------------------ StyleGAN mapping network (equalized LR)

class EqualLinear(nn.Module):
    """StyleGAN's equalized-LR linear (rosinality/stylegan2-pytorch): w ~ N(0,1)/lr_mul stored, scaled at run time
    by c = lr_mul/√fan_in (an attribute, not a buffer); bias times lr_mul; fused leaky_relu(0.2)·√2."""

    def __init__(self, n_in: int, n_out: int, lr_mul: float, scaled: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.scale = lr_mul / math.sqrt(n_in) if scaled else 1.0
        self.lr_mul = lr_mul

    def forward(self, x):
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * math.sqrt(2)


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


def mapping_network(scaled: bool) -> nn.Sequential:
    return nn.Sequential(PixelNorm(), *[EqualLinear(32, 32, 0.01, scaled) for _ in range(8)])


@seeded
def build_stylegan_mapping():
    """Karras et al. 2019/2020 (StyleGAN mapping network): PixelNorm then 8 EqualLinear layers, lr_mul 0.01."""
    return mapping_network(True)


@seeded
def build_stylegan_mapping_twin():
    """Bug: the equalized-LR runtime scale dropped (`F.linear(x, self.weight, ...)`), the weights still drawn
    N(0,1)/lr_mul: every layer 100·√32x too wide."""
    return mapping_network(False)


# ------------------------------------------------------------------ DCGAN

class DCGANGenerator(nn.Module):
    """DCGAN's generator (pytorch/examples dcgan), shrunk: nz=16, ngf=8, 16x16 output."""

    def __init__(self, nz: int = 16, ngf: int = 8):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 3, 1, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


def dcgan_weights_init(m: nn.Module, bn_mean: float) -> None:
    """pytorch/examples dcgan `weights_init`: Conv N(0, 0.02); BatchNorm gain N(bn_mean, 0.02), bias 0."""
    if "Conv" in type(m).__name__:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in type(m).__name__:
        nn.init.normal_(m.weight, bn_mean, 0.02)
        nn.init.zeros_(m.bias)


@seeded
def build_dcgan():
    """Radford et al. 2015 (DCGAN, arXiv:1511.06434; pytorch/examples dcgan/main.py weights_init): conv weights
    N(0, 0.02), BatchNorm gains N(1, 0.02), BN biases 0."""
    return DCGANGenerator().apply(lambda m: dcgan_weights_init(m, 1.0))


@seeded
def build_dcgan_twin():
    """Bug: the conv line copied for BatchNorm too — BN gains N(0, 0.02), so every BN scales its output by ~0.02."""
    return DCGANGenerator().apply(lambda m: dcgan_weights_init(m, 0.0))


# ------------------------------------------------------------------ LSTM forget bias

class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, dim), nn.LSTM(dim, dim, 2, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


@seeded
def build_lstm_forget_bias():
    """Jozefowicz et al. 2015 / Gers et al. 2000: an LSTM LM at torch's default weights, biases zero except the
    forget gate's slice of bias_ih set to 1 (torch gate order i, f, g, o)."""
    model = LSTMLM()
    hidden = model.rnn.hidden_size
    for name, p in model.rnn.named_parameters():
        if name.startswith("bias"):
            nn.init.zeros_(p)
            if name.startswith("bias_ih"):
                nn.init.ones_(p[hidden:2 * hidden])
    return model


@seeded
def build_lstm_forget_bias_twin():
    """Bug: `nn.init.normal_(p)` on every LSTM weight (std 1 instead of 1/√hidden): every gate saturated."""
    model = build_lstm_forget_bias.__wrapped__()
    for name, p in model.rnn.named_parameters():
        if name.startswith("weight"):
            nn.init.normal_(p)
    return model


# ------------------------------------------------------------------ convolutional nets

def conv_bn_relu(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True)]


def kaiming_fan_out(model: nn.Module) -> nn.Module:
    """torchvision's conv init: kaiming_normal_(fan_out, relu), BN gains 1, biases 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            zero_bias(m)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def zero_every_norm_gain(model: nn.Module) -> nn.Module:
    """The user's own `zero_init_residual`: a loop that zeroes every BatchNorm gain, residual or not."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.weight)
    return model


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), two levels: DoubleConv (conv-BN-ReLU x2), max-pool, ConvTranspose up,
    concatenated skips, 1x1 output conv."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.inc = nn.Sequential(*conv_bn_relu(3, c), *conv_bn_relu(c, c))
        self.down1 = nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(c, 2 * c), *conv_bn_relu(2 * c, 2 * c))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(2 * c, 4 * c), *conv_bn_relu(4 * c, 4 * c))
        self.up1 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2)
        self.conv1 = nn.Sequential(*conv_bn_relu(4 * c, 2 * c), *conv_bn_relu(2 * c, 2 * c))
        self.up2 = nn.ConvTranspose2d(2 * c, c, 2, 2)
        self.conv2 = nn.Sequential(*conv_bn_relu(2 * c, c), *conv_bn_relu(c, c))
        self.outc = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.conv1(torch.cat([x2, self.up1(x3)], 1))
        return self.outc(self.conv2(torch.cat([x1, self.up2(y)], 1)))


@seeded
def build_unet():
    """U-Net (arXiv:1505.04597) with the common PyTorch init: Kaiming normal (fan_out, relu) convs, BN ones/zeros."""
    return kaiming_fan_out(UNet())


@seeded
def build_unet_twin():
    """Bug: an init loop zeroes every BatchNorm gain (zero_init_residual copied into a net with no residual sums):
    every DoubleConv outputs zeros."""
    return zero_every_norm_gain(kaiming_fan_out(UNet()))


class PlainConvNet(nn.Module):
    """A VGG-style plain conv net: 10 convs with ReLU, no BatchNorm, global pool, Linear head."""

    def __init__(self, depth: int = 10, c: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(3 if i == 0 else c, c, 3, padding=1), nn.ReLU()]
        self.features, self.head = nn.Sequential(*layers), nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@seeded
def build_vgg_kaiming():
    """Simonyan & Zisserman 2014 with He et al. 2015's init (torchvision VGG: kaiming_normal_(fan_out, relu), zero
    biases): 10 convs, no BatchNorm."""
    return kaiming_fan_out(PlainConvNet())


@seeded
def build_vgg_kaiming_twin():
    """Bug: the same 10-conv plain ReLU net left at nn.Conv2d's default init (variance 1/6 of Kaiming per layer)."""
    return PlainConvNet()


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) in its common PyTorch form, at torch's defaults."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@seeded
def build_lenet():
    """LeNet-5 at torch's default init: shallow (5 layers), where the guide says plain random is enough."""
    return LeNet5()


@seeded
def build_lenet_twin():
    """Bug: `nn.init.constant_(conv.weight, 0.01)` ("small init") on both convs: every filter identical."""
    model = LeNet5()
    for conv in (model.conv1, model.conv2):
        nn.init.constant_(conv.weight, 0.01)
    return model


class FixupBlock(nn.Module):
    """Fixup's basic block (hongyi-zhang/Fixup, fixup_resnet_cifar.py): scalar biases and a scalar multiplier,
    no normalization."""

    def __init__(self, c: int, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = (nn.Parameter(torch.zeros(1)) for _ in range(4))
        self.scale = nn.Parameter(torch.ones(1))
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = torch.relu(self.conv1(x + self.bias1a) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        return torch.relu(out + x) if self.residual else torch.relu(out)


class FixupResNet(nn.Module):
    def __init__(self, blocks: int = 6, c: int = 16, residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.Sequential(*[FixupBlock(c, residual) for _ in range(blocks)])
        self.bias2, self.fc = nn.Parameter(torch.zeros(1)), nn.Linear(c, 10)
        for block in self.layers:  # std = √(2/(out·k²)) · L^(-1/(2m-2)), m = 2: L^-0.5
            fan_out = block.conv1.weight.shape[0] * block.conv1.weight[0, 0].numel()
            nn.init.normal_(block.conv1.weight, 0, math.sqrt(2 / fan_out) * blocks ** -0.5)
            nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.layers(torch.relu(self.conv1(x)))
        return self.fc(x.mean((2, 3)) + self.bias2)


@seeded
def build_fixup():
    """Zhang et al. 2019 (Fixup, arXiv:1901.09321): no BatchNorm; each branch's last conv zero, the other conv
    N(0, 2/(out·k²))·L^(-1/(2m-2)) with m=2, fc weight and bias zero, scalar biases 0, scalar multipliers 1."""
    return FixupResNet()


@seeded
def build_fixup_twin():
    """Bug: Fixup's init kept while the skip connection is left out (`relu(out)` for `relu(out + x)`): the zero
    conv now sits on the only path."""
    return FixupResNet(residual=False)


class SkipInitBlock(nn.Module):
    """SkipInit (De & Smith 2020, arXiv:2002.10444): x + α·F(x), α a scalar initialized to 0, no normalization."""

    def __init__(self, c: int, alpha: float):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x):
        return x + self.alpha * self.conv2(torch.relu(self.conv1(x)))


def skipinit_net(alpha: float) -> nn.Module:
    c = 16
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[SkipInitBlock(c, alpha) for _ in range(16)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    return kaiming_fan_out(model)


@seeded
def build_skipinit():
    """SkipInit: 16 residual conv blocks without BatchNorm, Kaiming (fan_out) convs, α = 0."""
    return skipinit_net(0.0)


@seeded
def build_skipinit_twin():
    """Bug: α initialized to 1 — 16 Kaiming branches summed without normalization."""
    return skipinit_net(1.0)


def small_resnet(**kwargs) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, **kwargs)


@seeded
def build_resnet_zero_init_residual():
    """Goyal et al. 2017 / torchvision ResNet(zero_init_residual=True): each block's last BN gain zero; convs
    kaiming_normal_(fan_out, relu); fc at torch's default."""
    return small_resnet(zero_init_residual=True)


@seeded
def build_resnet_zero_init_residual_twin():
    """Bug: zero_init_residual written by hand as a loop over every BatchNorm2d — the stem's bn1 and each
    block's bn1 zeroed too; the stem's zero gain kills the whole net."""
    return zero_every_norm_gain(small_resnet())


class SEBottleneck(nn.Module):
    """An SE-ResNet basic block (Hu et al. 2018, arXiv:1709.01507): conv-BN-ReLU-conv-BN, squeeze (avg pool),
    excitation fc-ReLU-fc-sigmoid, channel scale, residual add."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Linear(c, c // reduction), nn.Linear(c // reduction, c)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(out.mean((2, 3))))))
        return torch.relu(x + out * gate[:, :, None, None])


def se_resnet() -> nn.Module:
    c = 32
    stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    return kaiming_fan_out(nn.Sequential(stem, *[SEBottleneck(c) for _ in range(4)], nn.AdaptiveAvgPool2d(1),
                                         nn.Flatten(), nn.Linear(c, 10)))


@seeded
def build_se_resnet():
    """SE-ResNet (hujie-frank/SENet; moskomule/senet.pytorch): Kaiming fan_out convs, BN ones/zeros, SE fcs at
    torch's Linear default; 4 blocks, width 32."""
    return se_resnet()


@seeded
def build_se_resnet_twin():
    """Bug: the SE reduction fc zeroed (`nn.init.zeros_(fc1.weight)`, meant as 'start the gate neutral'): every
    excitation unit computes the same constant."""
    model = se_resnet()
    for block in model[1:5]:
        nn.init.zeros_(block.fc1.weight)
    return model


class MBConv(nn.Module):
    """EfficientNet's MBConv (Tan & Le 2019): 1x1 expand-BN-SiLU, depthwise 3x3-BN-SiLU, SE, 1x1 project-BN,
    residual add when shapes match."""

    def __init__(self, n_in: int, n_out: int, stride: int, expand: int = 4):
        super().__init__()
        mid = n_in * expand
        self.expand = nn.Sequential(nn.Conv2d(n_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        depthwise = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.dw = nn.Sequential(depthwise, nn.BatchNorm2d(mid), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(mid, max(1, n_in // 4), 1), nn.Conv2d(max(1, n_in // 4), mid, 1)
        self.project = nn.Sequential(nn.Conv2d(mid, n_out, 1, bias=False), nn.BatchNorm2d(n_out))
        self.residual = stride == 1 and n_in == n_out

    def forward(self, x):
        out = self.dw(self.expand(x))
        out = out * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(out.mean((2, 3), keepdim=True)))))
        out = self.project(out)
        return x + out if self.residual else out


def efficientnet() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
    blocks = [MBConv(16, 24, 2), MBConv(24, 24, 1), MBConv(24, 32, 2), MBConv(32, 32, 1)]
    model = nn.Sequential(stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for m in model.modules():  # torchvision efficientnet.py
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            zero_bias(m)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return model


@seeded
def build_efficientnet():
    """EfficientNet (arXiv:1905.11946; torchvision efficientnet.py init): convs kaiming_normal_(fan_out), BN ones,
    Linear U(±1/√out), zero biases; SiLU; 4 MBConv blocks."""
    return efficientnet()


@seeded
def build_efficientnet_twin():
    """Bug: an init loop zeroes every BatchNorm gain (a copied zero_init_residual): the stem's BN and the
    stride-2 blocks' BNs, which have no residual around them, zero the whole signal."""
    return zero_every_norm_gain(efficientnet())


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (facebookresearch/ConvNeXt): dwconv 7x7, LayerNorm, pwconv 4x, GELU, pwconv, LayerScale γ,
    residual add."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, init):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), ChannelsFirstLayerNorm(16, eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.down = nn.Sequential(ChannelsFirstLayerNorm(16, eps=1e-6), nn.Conv2d(16, 32, 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.norm, self.head = nn.LayerNorm(32, eps=1e-6), nn.Linear(32, 10)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                init(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean((2, 3))))


@seeded
def build_convnext():
    """Liu et al. 2022 (ConvNeXt, arXiv:2201.03545, convnext.py `_init_weights`): Conv2d and Linear
    trunc_normal_(std=.02), zero biases, LayerNorm ones, LayerScale 1e-6."""
    return ConvNeXt(lambda w: nn.init.trunc_normal_(w, std=0.02))


@seeded
def build_convnext_twin():
    """Bug: `nn.init.normal_(m.weight, 0.02)` — 0.02 passed positionally is the mean: N(0.02, 1)."""
    return ConvNeXt(lambda w: nn.init.normal_(w, 0.02))


class WaveNetLayer(nn.Module):
    """WaveNet's residual layer (van den Oord et al. 2016): dilated causal conv to 2C, tanh(filter)·σ(gate),
    1x1 residual and 1x1 skip convs."""

    def __init__(self, c: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(c, 2 * c, 2, dilation=dilation)
        self.res, self.skip = nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1)

    def forward(self, x):
        filt, gate = self.conv(F.pad(x, (self.dilation, 0))).chunk(2, 1)
        h = torch.tanh(filt) * torch.sigmoid(gate)
        return x + self.res(h), self.skip(h)


class WaveNet(nn.Module):
    def __init__(self, c: int = 16, dilations=(1, 2, 4, 8, 1, 2, 4, 8)):
        super().__init__()
        self.inp = nn.Conv1d(1, c, 1)
        self.layers = nn.ModuleList(WaveNetLayer(c, d) for d in dilations)
        self.out1, self.out2 = nn.Conv1d(c, c, 1), nn.Conv1d(c, 16, 1)

    def forward(self, x):
        x, skips = self.inp(x), 0
        for layer in self.layers:
            x, s = layer(x)
            skips = skips + s
        return self.out2(torch.relu(self.out1(torch.relu(skips))))


@seeded
def build_wavenet():
    """WaveNet (arXiv:1609.03499; r9y9/wavenet_vocoder, at torch's default conv init): 8 dilated causal layers
    (1..8, twice), gated tanh·sigmoid, residual and skip 1x1 convs, ReLU-1x1-ReLU-1x1 output."""
    return WaveNet()


@seeded
def build_wavenet_twin():
    """Bug: `nn.init.normal_(layer.conv.weight)` (std 1) on the dilated convs: the tanh and sigmoid gates saturate."""
    model = WaveNet()
    for layer in model.layers:
        nn.init.normal_(layer.conv.weight)
    return model


# ------------------------------------------------------------------ transformers

class RMSNorm(nn.Module):
    """RMSNorm: x/rms(x)·w (LLaMA, T5), or x/rms(x)·(1+w) when `offset` (Gemma), w initialized to `init`."""

    def __init__(self, dim: int, init: float = 1.0, offset: bool = False):
        super().__init__()
        self.weight, self.offset = nn.Parameter(torch.full((dim,), init)), offset

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1 + self.weight) if self.offset else x * self.weight


def causal_attention(q, k, v, heads: int, scale: float | None = None):
    b, t, d = q.shape
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(d // heads))
    att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(b, t, d)


class GPTBlock(nn.Module):
    """nanoGPT's Block: pre-LN, causal self-attention (c_attn, c_proj), MLP (c_fc, GELU, c_proj)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(d, 3 * d), c_proj=nn.Linear(d, d)))
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d), c_proj=nn.Linear(4 * d, d)))

    def forward(self, x):
        q, k, v = self.attn.c_attn(self.ln_1(x)).chunk(3, -1)
        x = x + self.attn.c_proj(causal_attention(q, k, v, self.heads))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT (karpathy/nanoGPT model.py): wte, wpe, blocks, ln_f, lm_head tied to wte."""

    def __init__(self, vocab: int = 64, block: int = 16, d: int = 32, layers: int = 4, heads: int = 2):
        super().__init__()
        self.n_layer = layers
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d),
            h=nn.ModuleList(GPTBlock(d, heads) for _ in range(layers)), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def init_weights(self, embeddings: bool = True) -> GPT:
        """nanoGPT's `_init_weights` and the c_proj pass after it; `embeddings=False`: Linear layers only."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                zero_bias(m)
            elif isinstance(m, nn.Embedding) and embeddings:
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.n_layer))
        return self

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@seeded
def build_nanogpt():
    """nanoGPT (karpathy/nanoGPT): Linear and Embedding normal(0, 0.02), zero biases, every c_proj
    normal(0, 0.02/√(2·n_layer)), LayerNorm ones, lm_head tied to wte; 4 layers, d 32."""
    return GPT().init_weights()


@seeded
def build_nanogpt_twin():
    """Bug: the head tied to the token embedding, but `_init_weights` handles nn.Linear only and the tie is made
    after it, so wte's nn.Embedding default N(0, 1) wins: the head is 50x too wide."""
    model = GPT()
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))
    model.init_weights(embeddings=False)
    nn.init.normal_(model.transformer.wte.weight)
    model.lm_head.weight = model.transformer.wte.weight
    return model


class Conv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils): a Linear with weight [in, out], normal(0, 0.02) init."""

    def __init__(self, n_out: int, n_in: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(0, 0.02))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)
        for proj in (self.attn_c_proj, self.mlp_c_proj):  # GPT2PreTrainedModel._init_weights
            nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, -1)
        x = x + self.attn_c_proj(causal_attention(q, k, v, self.heads))
        return x + self.mlp_c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab: int = 64, block: int = 16, d: int = 32, layers: int = 4, heads: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, 0.0, 0.02)
        self.h = nn.ModuleList(GPT2Block(d, heads, layers) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()


@seeded
def build_gpt2():
    """GPT-2 (Radford et al. 2019; transformers GPT2PreTrainedModel._init_weights): Conv1D weights [in, out]
    normal(0, 0.02), c_proj normal(0, 0.02/√(2·n_layer)), LayerNorm ones, head = wte (tied)."""
    return GPT2()


@seeded
def build_gpt2_twin():
    """Bug: the "zero every bias" loop written as `if p.dim() == 1: zeros_(p)`: it zeroes every LayerNorm gain too,
    ln_f included, which sits on the only path to the head."""
    model = GPT2()
    for p in model.parameters():
        if p.dim() == 1:
            nn.init.zeros_(p)
    return model


class BertLayer(nn.Module):
    """BERT's encoder layer: post-LN, self-attention (query, key, value, output), GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.intermediate, self.output = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z(x).view(b, t, self.heads, -1).transpose(1, 2) for z in (self.query, self.key, self.value))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)).softmax(-1)
        x = self.ln1(x + self.attn_out((att @ v).transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.output(F.gelu(self.intermediate(x))))


class Bert(nn.Module):
    def __init__(self, std: float, vocab: int = 64, d: int = 32, layers: int = 4):
        super().__init__()
        self.word, self.position = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.emb_ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, 2) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        for m in self.modules():  # BertPreTrainedModel._init_weights, initializer_range = std
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                zero_bias(m)

    def forward(self, idx):
        x = self.emb_ln(self.word(idx) + self.position(torch.arange(idx.shape[1])))
        for layer in self.layers:
            x = layer(x)
        return torch.tanh(self.pooler(x[:, 0]))


@seeded
def build_bert():
    """BERT (Devlin et al. 2018; transformers BertPreTrainedModel._init_weights): Linear and Embedding
    normal(0, initializer_range=0.02), zero biases, LayerNorm ones; post-LN, tanh pooler."""
    return Bert(0.02)


@seeded
def build_bert_twin():
    """Bug: initializer_range=1.0 in the config (a std of 1 for a width-32 model): attention logits and the
    tanh pooler saturate."""
    return Bert(1.0)


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT (Dosovitskiy et al. 2020), small: 16x16 images, patch 4, d 32, 4 blocks, cls token, zero head."""

    def __init__(self, init, d: int = 32, depth: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, 4)
        self.cls_token, self.pos_embed = nn.Parameter(torch.zeros(1, 1, d)), nn.Parameter(torch.zeros(1, 17, d))
        self.blocks = nn.Sequential(*[ViTBlock(d, 2) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 10)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                init(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@seeded
def build_vit():
    """ViT with timm's init_weights_vit_timm (Linear trunc_normal_(std=.02), zero biases, pos_embed trunc_normal
    .02, cls_token normal 1e-6, patch conv at torch's default) and big_vision's zero head."""
    return ViT(lambda w: nn.init.trunc_normal_(w, std=0.02))


@seeded
def build_vit_twin():
    """Bug: `nn.init.trunc_normal_(m.weight, .02)` — positional .02 is the mean: N(0.02, 1) cut at ±2."""
    return ViT(lambda w: nn.init.trunc_normal_(w, 0.02))


class MixerBlock(nn.Module):
    """MLP-Mixer block (Tolstikhin et al. 2021): token-mixing MLP across patches, channel-mixing MLP, pre-LN."""

    def __init__(self, d: int, patches: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.mlp_tokens = nn.Sequential(nn.Linear(patches, 2 * patches), nn.GELU(), nn.Linear(2 * patches, patches))
        self.mlp_channels = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, d: int = 32, patches: int = 16, depth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.Sequential(*[MixerBlock(d, patches) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 10)
        for name, m in self.named_modules():  # timm mlp_mixer `_init_weights` (flax=False)
            if isinstance(m, nn.Linear):
                if name.startswith("head"):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6)
            elif isinstance(m, nn.Conv2d):  # timm's lecun_normal_: truncated at ±2σ, σ rescaled for the cut
                std = math.sqrt(1 / m.weight[0].numel()) / 0.87962566103423978
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


@seeded
def build_mlp_mixer():
    """MLP-Mixer (arXiv:2105.01601; timm mlp_mixer.py `_init_weights`): Linear xavier_uniform_, MLP biases
    normal(std=1e-6), stem conv lecun_normal, zero head, LayerNorm ones; 4 blocks, d 32."""
    return Mixer()


@seeded
def build_mlp_mixer_twin():
    """Bug: token-mixing fc1 set to `constant_(w, 1/num_patches)` ("start as mean pooling"): every hidden token
    unit computes the same average."""
    model = Mixer()
    for block in model.blocks:
        nn.init.constant_(block.mlp_tokens[0].weight, 1 / 16)
    return model


class DecoderLayer(nn.Module):
    """A LLaMA/Gemma decoder layer: pre-RMSNorm attention (q, k, v, o) and gated MLP (gate, up, down)."""

    def __init__(self, d: int, heads: int, norm, act):
        super().__init__()
        self.heads, self.act = heads, act
        self.input_layernorm, self.post_attention_layernorm = norm(d), norm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        h = self.input_layernorm(x)
        x = x + self.o_proj(causal_attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), self.heads))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    """A LLaMA/Gemma-style decoder LM: embed_tokens, layers, final norm, lm_head; Linear and Embedding
    normal(0, std) as transformers' `_init_weights` (initializer_range)."""

    def __init__(self, norm, act, std=0.02, mean: float = 0.0, tied: bool = False, embed_scale: float = 1.0,
                 vocab: int = 64, d: int = 32, layers: int = 4):
        super().__init__()
        self.embed_scale = embed_scale
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DecoderLayer(d, 2, norm, act) for _ in range(layers))
        self.norm, self.lm_head = norm(d), nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean, std)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx):
        x = self.embed_tokens(idx) * self.embed_scale
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


@seeded
def build_llama_swiglu():
    """LLaMA (Touvron et al. 2023; transformers LlamaPreTrainedModel): RMSNorm x·w with w ones, SwiGLU MLP
    (silu(gate)·up → down), no biases, normal(0, 0.02), untied head; 4 layers, d 32."""
    return Decoder(lambda d: RMSNorm(d, 1.0), F.silu)


@seeded
def build_llama_swiglu_twin():
    """Bug: `nn.init.normal_(module.weight, 0.02)` — positional 0.02 is the mean: N(0.02, 1)."""
    return Decoder(lambda d: RMSNorm(d, 1.0), F.silu, std=1.0, mean=0.02)


@seeded
def build_gemma_norm():
    """Gemma (Gemma Team 2024; transformers GemmaRMSNorm): RMSNorm computes x·(1+w), w initialized to zeros;
    GeGLU MLP (gelu-tanh), normal(0, 0.02), head tied to the embedding, embeddings scaled by √d."""
    return Decoder(lambda d: RMSNorm(d, 0.0, offset=True), lambda x: F.gelu(x, approximate="tanh"),
                   tied=True, embed_scale=math.sqrt(32))


@seeded
def build_gemma_norm_twin():
    """Bug: Gemma's zeros copied into a standard x·w RMSNorm (LLaMA's): every norm outputs zero, the final norm
    on the only path to the head. Same keys and values as the recipe's state_dict."""
    return Decoder(lambda d: RMSNorm(d, 0.0), lambda x: F.gelu(x, approximate="tanh"),
                   tied=True, embed_scale=math.sqrt(32))


class T5LayerNorm(RMSNorm):
    pass


class T5Block(nn.Module):
    """A T5 encoder block: pre-RMSNorm self-attention (q, k, v, o, no biases, no 1/√d scaling) and ReLU FF
    (wi, wo)."""

    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.layer_norm, self.ff_layer_norm = T5LayerNorm(d), T5LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.wi, self.wo = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.layer_norm(x)
        q, k, v = (z(h).view(b, t, self.heads, -1).transpose(1, 2) for z in (self.q, self.k, self.v))
        x = x + self.o(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.wo(torch.relu(self.wi(self.ff_layer_norm(x))))


class T5Encoder(nn.Module):
    def __init__(self, factor: float = 1.0, vocab: int = 64, d: int = 32, heads: int = 2, d_ff: int = 64,
                 layers: int = 4, linear_std: float | None = None):
        super().__init__()
        self.shared = nn.Embedding(vocab, d)
        self.block = nn.ModuleList(T5Block(d, heads, d_ff) for _ in range(layers))
        self.final_layer_norm = T5LayerNorm(d)
        d_kv = d // heads
        nn.init.normal_(self.shared.weight, 0.0, factor * 1.0)
        for blk in self.block:  # T5PreTrainedModel._init_weights
            stds = {blk.q: (d * d_kv) ** -0.5, blk.k: d ** -0.5, blk.v: d ** -0.5, blk.o: (heads * d_kv) ** -0.5,
                    blk.wi: d ** -0.5, blk.wo: d_ff ** -0.5}
            for linear, std in stds.items():
                nn.init.normal_(linear.weight, 0.0, linear_std if linear_std is not None else factor * std)

    def forward(self, idx):
        x = self.shared(idx)
        for blk in self.block:
            x = blk(x)
        return self.final_layer_norm(x)


@seeded
def build_t5():
    """T5 (Raffel et al. 2020; transformers T5PreTrainedModel._init_weights, factor 1): no biases, q
    normal((d·d_kv)^-0.5) (T5 folds attention's 1/√d_kv into q), k, v, wi normal(d^-0.5), o normal((h·d_kv)^-0.5),
    wo normal(d_ff^-0.5), shared embedding normal(1), RMSNorm ones; ReLU FF; 4 encoder blocks."""
    return T5Encoder()


@seeded
def build_t5_twin():
    """Bug: the attention and FF weights drawn N(0, 1) (the embedding's std applied everywhere): T5 has no
    1/√d_kv in attention, so the logits are √(d·d_kv)x too wide and the softmax is one-hot."""
    return T5Encoder(linear_std=1.0)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero (facebookresearch/DiT models.py): LN without affine, modulated by shift/scale/gate
    from c through SiLU-Linear (zero-initialized)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, t, d = x.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)).softmax(-1)
        x = x + gate1 * self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class FinalLayer(nn.Module):
    """DiT's final layer (models.py `FinalLayer`): LN without affine, modulated by shift/scale from c, then the
    linear that puts out the patches."""

    def __init__(self, d: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, -1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiT(nn.Module):
    """A DiT (Peebles & Xie 2023), unconditional, at a fixed timestep so the forward takes the latent only; DiT's
    256-dimensional sinusoidal timestep embedding."""

    FREQUENCIES = 128

    def __init__(self, d: int = 32, depth: int = 4):
        super().__init__()
        self.x_embedder = nn.Conv2d(4, d, 2, 2)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, d) * 0.02, requires_grad=False)
        self.t_embedder = nn.Sequential(nn.Linear(2 * self.FREQUENCIES, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(d, 2) for _ in range(depth))
        self.final_layer = FinalLayer(d, 2 * 2 * 4)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's `initialize_weights`: xavier_uniform_ Linear, zero biases; patch conv xavier on its flattened view;
        timestep MLP normal(0.02); adaLN modulation and the final linear zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.data.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for linear in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x):
        half = self.FREQUENCIES
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        t = torch.full((x.shape[0], 1), 500.0) * freqs
        c = self.t_embedder(torch.cat([torch.cos(t), torch.sin(t)], -1))
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)


@seeded
def build_dit_adaln_zero():
    """DiT (arXiv:2212.09748, facebookresearch/DiT models.py `initialize_weights`): adaLN-Zero — every block's
    modulation Linear zero (gates zero: each block starts as the identity), final layer zero, others xavier."""
    return DiT()


@seeded
def build_dit_adaln_zero_twin():
    """Bug: the zero-init written as a loop over every nn.Linear in the model (meant for adaLN only): the
    timestep embedder's MLP, which sits on the only path to every modulation, is zero too — and the qkv,
    proj and MLP weights of every block."""
    model = DiT()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
    return model


class MambaBlock(nn.Module):
    """A Mamba mixer (state-spaces/mamba, mamba_simple.py) with the pure-PyTorch reference selective scan."""

    def __init__(self, d: int, n_layer: int, d_state: int = 8, d_conv: int = 4, expand: int = 2):
        super().__init__()
        inner, self.d_state = expand * d, d_state
        self.dt_rank = math.ceil(d / 16)
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.out_proj = nn.Linear(inner, d, bias=False)
        dt_init_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)))
        self.D = nn.Parameter(torch.ones(inner))
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))  # rescale_prenorm_residual: / √n_layer
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(n_layer)

    def forward(self, x):
        t = x.shape[1]
        xz = self.in_proj(x)
        u, z = xz.chunk(2, -1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :t].transpose(1, 2))
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        state, ys = torch.zeros(x.shape[0], u.shape[-1], self.d_state), []
        for i in range(t):
            state = torch.exp(dt[:, i, :, None] * A) * state + dt[:, i, :, None] * B[:, i, None, :] * u[:, i, :, None]
            ys.append((state * C[:, i, None, :]).sum(-1))
        y = torch.stack(ys, 1) + u * self.D
        return self.out_proj(y * F.silu(z))


class Mamba(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norms = nn.ModuleList(RMSNorm(d) for _ in range(layers))
        self.mixers = nn.ModuleList(MambaBlock(d, layers) for _ in range(layers))
        self.norm_f, self.lm_head = RMSNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, idx):
        x = self.embedding(idx)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.lm_head(self.norm_f(x))


@seeded
def build_mamba():
    """Mamba (Gu & Dao 2023, arXiv:2312.00752; mamba_simple.py and MambaLMHeadModel `_init_weights`): A_log =
    log(1..N) per channel, D ones, dt_proj weight U(±dt_rank^-0.5), dt_bias = softplus⁻¹(dt) with dt log-uniform
    in [1e-3, 0.1], out_proj at torch's default / √n_layer, embedding normal(0.02) tied to the head, RMSNorm ones."""
    return Mamba()


@seeded
def build_mamba_twin():
    """Bug: `nn.init.normal_(mixer.out_proj.weight)` (std 1, the std forgotten) on every mixer's output
    projection: each residual branch adds a signal ~30x the stream's."""
    model = Mamba()
    for mixer in model.mixers:
        nn.init.normal_(mixer.out_proj.weight)
    return model


# ------------------------------------------------------------------ recipes added after the first run

class NeRF(nn.Module):
    """NeRF's MLP (Mildenhall et al. 2020, bmild/nerf run_nerf_helpers.py init_nerf_model): 8 ReLU Dense layers,
    the encoded input concatenated back in after the 5th, a linear output (RGB + density)."""

    def __init__(self, init, inputs: int = 63, width: int = 64, skip: int = 4):
        super().__init__()
        self.skip = skip
        sizes = [inputs] + [width + (inputs if i == skip + 1 else 0) for i in range(1, 8)]
        self.pts_linears = nn.ModuleList(nn.Linear(n, width) for n in sizes)
        self.output_linear = nn.Linear(width, 4)
        for linear in [*self.pts_linears, self.output_linear]:
            init(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x):
        h = x
        for i, linear in enumerate(self.pts_linears):
            h = torch.relu(linear(h))
            if i == self.skip:
                h = torch.cat([x, h], -1)
        return self.output_linear(h)


@seeded
def build_nerf():
    """NeRF as published (TF Keras Dense: glorot_uniform weights, zero biases), 63 encoded inputs (L=10), width 64."""
    return NeRF(nn.init.xavier_uniform_)


@seeded
def build_nerf_twin():
    """Bug: `nn.init.uniform_(m.weight)` with the bounds left out: U(0, 1), every weight positive, so each layer
    multiplies the signal's mean by ~fan_in/2."""
    return NeRF(nn.init.uniform_)


class HighwayLayer(nn.Module):
    """y = H(x)·T(x) + x·(1 − T(x)), H = relu(W_h x + b_h), T = sigmoid(W_t x + b_t)."""

    def __init__(self, width: int, gate_bias: float, bias_on_weight: bool = False):
        super().__init__()
        self.h, self.t = nn.Linear(width, width), nn.Linear(width, width)
        nn.init.kaiming_normal_(self.h.weight, nonlinearity="relu")
        nn.init.zeros_(self.h.bias)
        nn.init.xavier_uniform_(self.t.weight)
        nn.init.constant_(self.t.weight if bias_on_weight else self.t.bias, gate_bias)
        if bias_on_weight:
            nn.init.zeros_(self.t.bias)

    def forward(self, x):
        t = torch.sigmoid(self.t(x))
        return torch.relu(self.h(x)) * t + x * (1 - t)


def highway(bias_on_weight: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 64), *[HighwayLayer(64, -2.0, bias_on_weight) for _ in range(10)],
                         nn.Linear(64, 10))


@seeded
def build_highway():
    """Highway networks (Srivastava et al. 2015, arXiv:1505.00387): transform-gate bias initialized negative (-2;
    the paper: -1 to -3) so every layer starts by carrying its input; H Kaiming (ReLU), gate weights Xavier."""
    return highway(False)


@seeded
def build_highway_twin():
    """Bug: `nn.init.constant_(layer.t.weight, -2.0)` — the gate's bias value written into its weight: every gate
    unit identical."""
    return highway(True)


def vaswani_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


@seeded
def build_transformer_vaswani():
    """The Transformer (Vaswani et al. 2017) as torch's nn.Transformer inits it (`_reset_parameters`):
    xavier_uniform_ on every parameter with more than one dimension; post-LN, ReLU FF; 4 layers, d 32."""
    model = vaswani_encoder()
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return model


@seeded
def build_transformer_vaswani_twin():
    """Bug: the same loop with `else: nn.init.zeros_(p)` for "the biases": it zeroes every LayerNorm gain too, and
    in a post-LN stack each norm sits on the only path."""
    model = vaswani_encoder()
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
        else:
            nn.init.zeros_(p)
    return model


class SpatialGatingUnit(nn.Module):
    """gMLP's spatial gating unit (lucidrains/g-mlp-pytorch): half the channels, normalized, mixed across tokens by a
    1x1 conv over the sequence, gate the other half."""

    def __init__(self, d_ffn: int, seq_len: int, eps: float = 1e-3):
        super().__init__()
        self.norm = nn.LayerNorm(d_ffn // 2)
        self.proj = nn.Conv1d(seq_len, seq_len, 1)
        nn.init.uniform_(self.proj.weight, -eps / seq_len, eps / seq_len)
        nn.init.constant_(self.proj.bias, 1.0)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        return u * self.proj(self.norm(v))


class GMLPBlock(nn.Module):
    def __init__(self, d: int, d_ffn: int, seq_len: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj_in = nn.Linear(d, d_ffn)
        self.sgu = SpatialGatingUnit(d_ffn, seq_len)
        self.proj_out = nn.Linear(d_ffn // 2, d)

    def forward(self, x):
        return x + self.proj_out(self.sgu(F.gelu(self.proj_in(self.norm(x)))))


class GMLP(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 64, d_ffn: int = 256, seq_len: int = 64, depth: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[GMLPBlock(d, d_ffn, seq_len) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens))).mean(1))


@seeded
def build_gmlp():
    """gMLP (Liu et al. 2021, arXiv:2105.08050; lucidrains/g-mlp-pytorch): the spatial projection near zero
    (uniform ±1e-3/n) with bias one, so each block starts as a plain FFN; channel projections at torch's default."""
    return GMLP()


@seeded
def build_gmlp_twin():
    """Bug: the spatial projection drawn with `normal_(w)`, the std forgotten (bias still one): each gate starts as a
    random token mix 8x LeCun's scale."""
    model = GMLP()
    for block in model.blocks:
        nn.init.normal_(block.sgu.proj.weight)
    return model


class TFixupBlock(nn.Module):
    """A post-LN-free encoder block (attention and ReLU FFN, each a plain residual branch)."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(x)))


class TFixupEncoder(nn.Module):
    def __init__(self, scaled: bool, vocab: int = 100, d: int = 64, layers: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(TFixupBlock(d, 4, 4 * d) for _ in range(layers))
        self.head = nn.Linear(d, 5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, 0, d ** -0.5)
        if scaled:
            s = 0.67 * layers ** -0.25
            with torch.no_grad():
                self.embed.weight.mul_(s)
                for blk in self.blocks:
                    for p in (blk.v, blk.o, blk.fc1, blk.fc2):
                        p.weight.mul_(s)

    def forward(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


@seeded
def build_t_fixup():
    """T-Fixup (Huang et al., ICML 2020, "Improving Transformer Optimization Through Better Initialization"): no
    LayerNorm; Xavier but the embedding, N(0, d^-1/2); v, o, both FFN weights and the embedding scaled by
    0.67·N^(-1/4) (N = 12 layers): the residual stream stays at its input's scale (measured 1.05x)."""
    return TFixupEncoder(scaled=True)


@seeded
def build_t_fixup_twin():
    """Bug: LayerNorm removed as T-Fixup says, the scaling forgotten: plain Xavier branches compound (105x)."""
    return TFixupEncoder(scaled=False)
