"""Activations: names, families and init gains (as torch.nn.init.calculate_gain defines them)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from initaudit.common.errors import InputError

# ReLU-like: zero (or nearly) for negative inputs, so they halve the forward variance.
RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "prelu", "gelu", "silu", "mish", "elu", "celu", "hardswish", "softplus"})
SATURATING = frozenset({"tanh", "sigmoid", "hardtanh", "hardsigmoid", "softsign"})
PERIODIC = frozenset({"sin", "cos"})  # SIREN's activations
KNOWN = RELU_FAMILY | SATURATING | PERIODIC | {"selu", "identity", "unknown"}
# Value-changing elementwise functions whose effect on a signal's scale is not modelled: where one follows a
# layer, the layer's activation is unknown (never identity). Normalization ingredients (pow, sqrt, rsqrt,
# reciprocal, div) and the shape-keeping pass-throughs (reshape, dropout, pooling, indexing, cat) are not here.
UNMODELLED = frozenset({
    "erf", "erfc", "erfinv", "exp", "exp2", "expm1", "tan", "sinh", "cosh", "asin", "acos", "atan", "arcsin",
    "arccos", "arctan", "asinh", "acosh", "atanh", "arcsinh", "arccosh", "arctanh", "sinc", "sign", "sgn", "abs",
    "logsigmoid", "log_sigmoid", "tanhshrink", "softshrink", "hardshrink", "threshold", "logit",
})

# Lower-cased spellings used by torch modules, functionals, TorchScript/ONNX ops and HF configs.
_ALIASES = {
    "relu": "relu", "relu_": "relu", "relu6": "relu6", "leakyrelu": "leaky_relu", "leaky_relu": "leaky_relu",
    "leaky_relu_": "leaky_relu", "prelu": "prelu", "rrelu": "leaky_relu", "gelu": "gelu", "gelu_new": "gelu",
    "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu", "quick_gelu": "gelu", "newgelu": "gelu", "fastgelu": "gelu",
    "quickgelu": "gelu", "gelutanh": "gelu", "silu": "silu", "silu_": "silu", "swish": "silu", "mish": "mish",
    "elu": "elu", "elu_": "elu", "celu": "celu", "selu": "selu", "hardswish": "hardswish", "hard_swish": "hardswish",
    "softplus": "softplus", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "hardtanh": "hardtanh", "hardtanh_": "hardtanh", "hardsigmoid": "hardsigmoid", "hard_sigmoid": "hardsigmoid",
    "softsign": "softsign", "sin": "sin", "sin_": "sin", "cos": "cos", "cos_": "cos", "identity": "identity", "linear": "identity", "none": "identity", "unknown": "unknown",
}


@dataclass(frozen=True)
class Activation:
    """The non-linearity that follows a layer; `param` is the negative slope of leaky_relu/prelu; `scale` a
    constant its output is multiplied by (StyleGAN's leaky_relu(x, 0.2)·√2)."""

    name: str = "unknown"
    param: float | None = None
    scale: float = 1.0

    @property
    def family(self) -> str:
        if self.name in RELU_FAMILY:
            return "relu"
        if self.name in SATURATING:
            return "saturating"
        if self.name in PERIODIC:
            return "periodic"
        return self.name  # selu, identity, unknown

    @property
    def known(self) -> bool:
        return self.name != "unknown"

    @property
    def gain(self) -> float:
        """The gain torch.nn.init uses for this activation (ReLU-like ones take ReLU's), over the constant its
        output is multiplied by (leaky_relu(0.2)·√2 needs √2 less from its weights); sin and cos take SIREN's √2
        (hidden weights U(±√(6/n)) once ω0 is folded in: std √(2/n))."""
        return self._unscaled_gain / self.scale

    @property
    def _unscaled_gain(self) -> float:
        import torch.nn.init as init  # here, not at the top: parsing a flag or config must not import torch

        if self.family == "periodic":
            return math.sqrt(2)
        if self.name in ("leaky_relu", "prelu"):
            return init.calculate_gain("leaky_relu", 0.01 if self.param is None else self.param)
        if self.family == "relu":
            return init.calculate_gain("relu")
        if self.name in ("tanh", "hardtanh", "softsign"):
            return init.calculate_gain("tanh")
        if self.name in ("sigmoid", "hardsigmoid"):
            return init.calculate_gain("sigmoid")
        if self.name == "selu":
            return init.calculate_gain("selu")
        return 1.0

    @property
    def torch_nonlinearity(self) -> str:
        """The `nonlinearity` argument of torch.nn.init.kaiming_* for this activation."""
        return "leaky_relu" if self.name in ("leaky_relu", "prelu") else "relu"

    def __str__(self) -> str:
        text = self.name if self.param is None else f"{self.name}({self.param:g})"
        return text if self.scale == 1 else f"{text}·{self.scale:.4g}"


IDENTITY = Activation("identity")
UNKNOWN = Activation("unknown")


# Substrings that name an activation inside a class name (HF's NewGELUActivation, PytorchGELUTanh...),
# most specific first.
_NAME_PARTS = ("leakyrelu", "gelu", "silu", "swish", "mish", "selu", "celu", "elu", "relu6", "relu",
               "hardswish", "hardsigmoid", "hardtanh", "tanh", "sigmoid", "softplus")


def canonical(name: str, loose: bool = False) -> str | None:
    """Map a spelling ('LeakyReLU', 'aten::relu_', 'gelu_new', 'Swish') to a canonical name, or None.

    `loose` also accepts class names that merely contain one (for activation module classes).
    """
    key = re.sub(r"^(aten::|torch\.|f\.|nn\.)", "", name.strip().lower())
    found = _ALIASES.get(key) or _ALIASES.get(key.replace("_", ""))
    if found or not loose:
        return found
    flat = key.replace("_", "")
    return next((_ALIASES[part] for part in _NAME_PARTS if part in flat), None)


def unmodelled(name: str) -> bool:
    """A value-changing elementwise function ('erf', 'aten::exp', 'Tanhshrink') whose effect is not modelled."""
    key = re.sub(r"^(aten::|torch\.|f\.|nn\.|special_)", "", name.strip().lower()).rstrip("_")
    return key in UNMODELLED or key.replace("_", "") in UNMODELLED


def parse(spec: str) -> Activation:
    """Parse a user's activation spec: 'relu', 'tanh', 'leaky_relu:0.2', 'leaky_relu(0.2)'."""
    m = re.fullmatch(r"\s*([A-Za-z_0-9]+)\s*(?:[:(]\s*([-+0-9.eE]+)\s*\)?)?\s*", spec)
    name = canonical(m.group(1)) if m else None
    if name is None:
        raise InputError(f"unknown activation {spec!r}; use one of: {', '.join(sorted(KNOWN))} (e.g. leaky_relu:0.2)")
    param = float(m.group(2)) if m.group(2) else (0.01 if name == "leaky_relu" else None)
    if param is not None and not math.isfinite(param):
        raise InputError(f"activation {spec!r}: the slope must be a finite number")
    return Activation(name, param)
