"""safetensors files, read lazily one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError
from . import Loaded, TensorSource, check_count, natural_key

_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's size


def _count(path: Path, shown: Path) -> int:
    """The tensors in a safetensors header, counted in its bytes (one "data_offsets" per tensor) so that a
    header of a million entries is refused before it is parsed (which takes seconds and gigabytes)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(min(size, _MAX_HEADER))
    except OSError as exc:
        raise InputError(f"{shown}: cannot be read ({exc.strerror or exc})") from None
    return header.count(b'"data_offsets"')


def _open(path: Path, shown: Path | None = None):
    """safe_open `path` (already passed by the file policy) once its tensor count is within MAX_TENSORS;
    errors name `shown`, the path the user knows."""
    check_count(_count(path, shown or path), shown or path)
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
