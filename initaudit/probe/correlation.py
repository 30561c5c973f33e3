"""Correlation and mean through depth: per layer, the mean cosine between different inputs' representations and
the channel mean, summed over every call of the layer (and every run of an ONNX model whose batch is fixed), and
the facts `signal-collapse` judges.

The cosine is taken between samples of one batch (representation.mean_cosine): the synthetic batch's samples
are independent draws (N(0, 1) floats, token ids uniform over the vocabulary), so at the input it is about 0.
An ONNX model whose batch is fixed runs several times; consecutive runs are then compared too (`chained`), so a
batch of one still gives pairs. The representation the head reads is the last hidden layer's: the last layer,
in forward order, of the deep plain runs the signal rules judge (measure.depth.judged_layers) that is not the
output. Residual nets and transformers (no such run) are shown, not judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from initaudit.flow.layer import Layer
from initaudit.measure.depth import judged_layers
from initaudit.probe.representation import channel_dim, mean_cosine


@dataclass
class CosineSum:
    """The mean cosine between different samples' representations, summed over the batches seen."""

    total: float = 0.0
    pairs: int = 0
    undefined: bool = False  # a sample's representation was all zero or not finite: it has no direction
    previous: torch.Tensor | None = field(default=None, repr=False)  # the last batch's rows, where chained

    def add(self, out: torch.Tensor, chained: bool = False) -> None:
        """`out`: samples first. `chained`: also pair these samples with the previous batch's."""
        if out.dim() == 0 or out.shape[0] == 0:
            return
        rows = out.detach().to(torch.float64).reshape(out.shape[0], -1)
        if chained:
            rows, self.previous = (rows if self.previous is None else torch.cat([self.previous, rows])), rows
        n = rows.shape[0]
        if n < 2:
            return
        value = mean_cosine(rows)
        if math.isnan(value):
            self.undefined = True
            return
        self.total += value * n * (n - 1)
        self.pairs += n * (n - 1)

    @property
    def value(self) -> float | None:
        """The mean cosine (None: no pair seen, or a sample with no direction)."""
        return None if self.undefined or not self.pairs else self.total / self.pairs

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "pairs": self.pairs, "undefined": self.undefined}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CosineSum":
        return cls(float(data["total"]), int(data["pairs"]), bool(data["undefined"]))


@dataclass
class ChannelSums:
    """Each channel's sum over the samples (and positions) seen: the channel mean, exact over several batches."""

    sums: torch.Tensor | None = None
    count: int = 0  # values summed per channel

    def add(self, out: torch.Tensor, axis: int) -> None:
        """`out`'s values per channel (`axis`); a call with another number of channels is left out."""
        x = out.detach().to(torch.float64).movedim(axis, -1)
        sums = x.reshape(-1, x.shape[-1]).sum(0)
        if self.sums is None:
            self.sums = sums
        elif self.sums.shape == sums.shape:
            self.sums = self.sums + sums
        else:
            return
        self.count += x.numel() // x.shape[-1]

    def rms(self) -> float | None:
        """√(mean over channels of each channel's mean²), as representation.describe's `mean`."""
        if self.sums is None or not self.count:
            return None
        return float((self.sums / self.count).pow(2).mean().sqrt())

    def to_json(self) -> dict[str, Any]:
        return {"sums": None if self.sums is None else self.sums.tolist(), "count": self.count}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChannelSums":
        sums = data["sums"]
        return cls(None if sums is None else torch.tensor([float(s) for s in sums], dtype=torch.float64),
                   int(data["count"]))


def channel_axis(layer: Layer, out: torch.Tensor) -> int:
    """A conv's channels are axis 1; a linear layer's features the last axis (sequences, heads)."""
    return channel_dim(out, layer.kind.startswith("conv"))


def input_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The floating inputs of one batch, each sample's values side by side (None: no floating input, e.g. token
    ids, whose draws are independent by construction)."""
    floats = [t for t in tensors if t.is_floating_point() and t.dim() >= 1]
    if not floats or len({t.shape[0] for t in floats}) != 1:
        return None
    return torch.cat([t.detach().to(torch.float64).reshape(t.shape[0], -1) for t in floats], dim=1)


def last_hidden(layers: list[Layer]) -> str | None:
    """The layer whose representation the head reads: the last judged layer (forward order) not the output."""
    hidden = [layer for layer in judged_layers(layers) if not layer.is_output]
    return max(hidden, key=lambda layer: layer.position).name if hidden else None

