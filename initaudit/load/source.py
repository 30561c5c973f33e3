"""What every loader returns: a `Loaded` model (its tensors behind a `TensorSource`, and what is known of its
graph), and the bound on how many tensors one run audits."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from initaudit.common.errors import InputError
from initaudit.flow.activations import Activation
from initaudit.flow.dataflow import Flow
from initaudit.flow.layers import ModuleInfo


# The most tensors one run audits: each costs about half a millisecond and a few kB, whatever its size, so a
# file of a million tiny tensors (10 minutes, gigabytes) is refused with a clear message instead. The largest
# public checkpoints (mixture-of-experts models) hold under 100,000.
MAX_TENSORS = 200_000


def natural_key(name: str) -> list:
    """Sort key that puts 'layers.2' before 'layers.10' (safetensors stores names sorted as text)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class TensorSource:
    """Named tensors in file order, read on demand (so mmap'ed or lazily opened files stay on disk).

    `release(key)` hands back the memory a tensor read from a mapped file holds once it is audited
    (its pages stay in the page cache); `nbytes` sizes each tensor for progress and scheduling.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor], resident: bool = False,
                 release: Callable[[str], None] | None = None, nbytes: dict[str, int] | None = None):
        self.shapes = shapes
        self._get = get
        self.resident = resident  # all tensors are held (so storages identify tied weights)
        self._release = release
        self._nbytes = nbytes or {}

    def release(self, key: str) -> None:
        if self._release is not None:
            self._release(key)

    def nbytes(self, key: str) -> int:
        """The tensor's size in bytes (4 bytes a value where the loader did not say)."""
        return self._nbytes.get(key, 4 * math.prod(self.shapes[key]))

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], release: Callable[[torch.Tensor], None] | None = None) -> "TensorSource":
        """Tensors held in a dict (`release(tensor)`: for a dict of views into a mapped file)."""
        sizes = {k: _nbytes(v) for k, v in tensors.items()}
        drop = (lambda key: release(tensors[key])) if release is not None else None
        return cls({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__, resident=True,
                   release=drop, nbytes=sizes)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _nbytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.numel() * tensor.element_size()
    except (RuntimeError, NotImplementedError):
        return 4 * tensor.numel()


@dataclass
class Loaded:
    path: Path | None
    format: str                      # torch-state-dict | torch-module | torchscript | safetensors | onnx | hf-folder
    tensors: TensorSource
    module: torch.nn.Module | None = None
    flow: Flow | None = None         # the data flow, where the format or module shows it
    modules: dict[str, ModuleInfo] = field(default_factory=dict)  # layer name -> kind, where known
    activations: dict[str, Activation] = field(default_factory=dict)  # layer name -> the activation its name
    # suggests, where no flow shows it (a Hugging Face folder whose architecture could not be built)
    container: Any = None            # what the writer needs to write the same format back
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. how activations were found)
    files: list[Path] = field(default_factory=list)  # every file the model's bytes come from (weights, external
    # data, shards, index, config): no output may land on one of them (or, for a folder model, inside its folder)
    source: str | None = None        # the URL of a remote model (path is then None)
    declared_init: dict[str, str] = field(default_factory=dict)  # tensor -> the recipe the model family's own init
    # declares for it (a transformers model's initialize_weights, recorded on a meta-device copy)
    ties: list[tuple[str, str]] = field(default_factory=list)  # tensor names the module or config ties together
    unread: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (kind, reason) -> names of tensors
    # the loader found but hands on to no layer (an ONNX graph's initializers of ops not audited yet)

    @property
    def name(self) -> str:
        """The model as the user named it: its URL, path, or <module>."""
        return self.source or (str(self.path) if self.path is not None else "<module>")


def check_count(n: int, where: Path | str) -> None:
    """Refuse a model of more than MAX_TENSORS tensors (before its tensors are read, where the format allows)."""
    if n > MAX_TENSORS:
        raise InputError(f"{where}: {n:,} tensors, more than the {MAX_TENSORS:,} initaudit audits in one run "
                         "(initaudit.load.source.MAX_TENSORS)")
