"""What one layer's output looks like over a batch: mup's `l1` (mean |x|), the RMS, the channel mean, and the
mean cosine between different samples' representations (1: every input mapped to one direction)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Representation:
    """One layer's output over a batch of samples."""

    l1: float      # mean |x| (mup's coord-check `l1`)
    rms: float     # √E[x²]
    mean: float    # √(mean over channels of each channel's mean²): the signal's shift, in the RMS's units
    cosine: float  # mean cosine between the representations of two different samples (nan if one is all zero)


def channel_dim(out: torch.Tensor, conv: bool) -> int:
    """The channel axis: 1 for a conv's output (N, C, L...), the last axis for features, sequences and heads."""
    return 1 if conv and out.dim() > 2 else out.dim() - 1


def describe(out: torch.Tensor, conv: bool = False) -> Representation:
    """`out` (samples first; from a conv layer if `conv`) described; float64, so a big batch's sums stay exact
    enough."""
    x = out.detach().to(torch.float64)
    if x.dim() < 2 or x.shape[0] < 2 or x.numel() == 0:
        raise ValueError(f"a batch of at least 2 samples is needed, got shape {tuple(out.shape)}")
    dim = channel_dim(x, conv)
    channels = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    return Representation(l1=x.abs().mean().item(), rms=x.pow(2).mean().sqrt().item(),
                          mean=channels.mean(0).pow(2).mean().sqrt().item(), cosine=mean_cosine(x.flatten(1)))


def mean_cosine(samples: torch.Tensor) -> float:
    """The mean cosine over pairs of different rows (nan where a row is all zero)."""
    norms = samples.norm(dim=1)
    if bool((norms == 0).any()) or not bool(torch.isfinite(norms).all()):
        return math.nan
    unit = samples / norms[:, None]
    n = unit.shape[0]
    gram = unit @ unit.T
    return ((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item()
