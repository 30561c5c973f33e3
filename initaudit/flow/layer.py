"""One layer of the format-neutral graph: its tensors (`Param`, with the fans of their format's convention), its
kind and its context (activation, normalization, residual, run); and the runs that layers form between norms."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from initaudit.flow.activations import UNKNOWN, Activation

WEIGHTED_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                            "conv_transpose3d", "recurrent", "attention"})
# The weight of these kinds is a set of output units (rows), each a neuron or filter.
UNIT_KINDS = WEIGHTED_KINDS


@dataclass
class Param:
    """One tensor of a layer, with the fan convention of its format."""

    key: str                 # the tensor's name in the file
    role: str                # weight | bias | norm_weight | norm_bias | buffer | parameter | optimizer_state
    shape: tuple[int, ...]
    fan_in: int = 0
    fan_out: int = 0
    unit_axis: int = 0       # the axis that indexes output units/filters
    hidden: int | None = None  # recurrent hidden size (torch's RNN default is uniform ±1/sqrt(hidden))
    shared_with: str | None = None  # another key holding the very same tensor (tied weights)
    parametrization: str | None = None  # weight_norm | spectral_norm: the weight is computed from stored tensors
    parts: tuple[str, ...] = ()  # the stored tensors a parametrized weight is computed from (its key is not stored)
    flow_fans: tuple[int, int] | None = None  # (forward, backward) fans the signal sees, where not torch's (a transposed conv)

    @property
    def signal_fans(self) -> tuple[int, int]:
        """The (forward, backward) fans the data flow sees: the depth model's and the expected std's."""
        return self.flow_fans or (self.fan_in, self.fan_out)

    @property
    def is_weight(self) -> bool:
        return self.role == "weight"


@dataclass
class Layer:
    name: str
    kind: str
    params: list[Param] = field(default_factory=list)
    module_type: str | None = None
    activation: Activation = UNKNOWN
    norm_after: bool = False
    norm: str | None = None  # the normalization right after it (norm_after), where the flow names it
    residual_after: bool = False  # the layer's output joins a residual sum before the next layer
    gate_after: bool = False  # the layer feeds a gate (sigmoid/tanh scaling another signal: squeeze-excite, GLU)
    residual_branch: bool = False  # the output joins a residual sum as its branch, through any layers, before a norm
    position: int = -1       # index among weighted layers, in order
    run_depth: int = 0       # weighted layers in this layer's run between normalizations
    is_output: bool = False
    order_known: bool = True  # False where a bare file's names and shapes leave the layer's place ambiguous
    norm_folded: bool = False  # an exporter folded a BatchNorm into the weights (its scale, zero-init too, is in them)
    folded_norm: str | None = None  # that BatchNorm's module path, where the exporter recorded it
    weight_scale: float = 1.0  # the constant the forward pass multiplies the weight (or the pre-activation) by
    gain_offset: bool | None = None  # a norm that scales by (1 + weight): zero is its identity (None: not known)
    in_flow: bool = False  # a norm the flow names: its residual context (residual_branch) is known

    @property
    def weighted(self) -> bool:
        return self.kind in WEIGHTED_KINDS

    def param(self, role: str) -> Param | None:
        return next((p for p in self.params if p.role == role), None)


@dataclass
class LayerGraph:
    layers: list[Layer]

    @cached_property
    def depth(self) -> int:
        """Weighted layers in the whole model (counted once: every tensor's facts ask)."""
        return sum(layer.weighted for layer in self.layers)

    @cached_property
    def weighted_at(self) -> dict[int, Layer]:
        """The weighted layers by forward position (built once: every tensor's facts ask for its predecessor)."""
        return {layer.position: layer for layer in reversed(self.layers) if layer.weighted}

    def __iter__(self):
        return iter(self.layers)


def run_lengths(ends: list[bool]) -> list[int]:
    """For layers in order, each one's run length, runs ending after every layer where `ends` holds (a
    normalization follows it) and at the last layer."""
    lengths, start = [], 0
    for i, end in enumerate(ends):
        if end or i == len(ends) - 1:
            lengths += [i + 1 - start] * (i + 1 - start)
            start = i + 1
    return lengths
