"""safetensors files, read lazily one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError
from . import Loaded, TensorSource, natural_key


def _open(path: Path, shown: Path | None = None):
    """safe_open `path` (already passed by the file policy); errors name `shown`, the path the user knows."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{shown or path}: not a readable safetensors file ({exc})") from None


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with _open(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load(path: Path) -> Loaded:
    handle = _open(path)
    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in sorted(handle.keys(), key=natural_key)}
    note = ("activations are unknown in a bare safetensors file: pass --activation (or --model"
            " package.module:factory) to check scales against them")
    return Loaded(path, "safetensors", TensorSource(shapes, handle.get_tensor),
                  container={"metadata": handle.metadata() or {}}, notes=[note])
