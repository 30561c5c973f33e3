"""Loaders: one module per format, each returning a `Loaded` (tensors + what is known of the graph)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import files as file_policy
from ..activations import Activation
from ..errors import InputError
from ..flow import Flow
from ..graph import ModuleInfo


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

    @property
    def name(self) -> str:
        """The model as the user named it: its URL, path, or <module>."""
        return self.source or (str(self.path) if self.path is not None else "<module>")


def is_remote(path: object) -> bool:
    """A `scheme://…` string (s3://, gs://, hf://, https://…): read through fsspec, not the local file system."""
    return isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


_LOCAL_URL = re.compile(r"(?:file|local)://", re.IGNORECASE)


def local_path(url: str) -> Path | None:
    """The local path a `file://` (or fsspec's `local://`) URL names, as fsspec reads it (the rest of the URL,
    verbatim); None for other URLs."""
    named = _LOCAL_URL.match(url)
    return Path(url[named.end():]) if named else None


def load(path: str | Path | None, *, trust_pickle: bool = False, factory: str | None = None,
         module: torch.nn.Module | None = None, optimizer_state: bool = False) -> Loaded:
    """Load a model file, folder or URL (or a module built by `factory`, or a live `module`) for auditing.

    A `file://` URL is a local path, read under the local file policy (FIFOs and devices refused, links
    leaving a folder refused) like any other.
    `optimizer_state`: audit a distributed checkpoint's optimizer tensors too, for NaN/Inf (skipped by default;
    their presence is evidence that the weights are trained either way).
    """
    if is_remote(path):
        path = local_path(path) or path
    if is_remote(path) and module is None and not factory:
        from . import remote
        loaded = remote.load(path)
        check_count(len(loaded.tensors), path)
        return loaded
    loaded = _load(path, trust_pickle=trust_pickle, factory=factory, module=module, optimizer_state=optimizer_state)
    check_count(len(loaded.tensors), loaded.path or "the model")
    if loaded.path is not None and not loaded.files:
        loaded.files = [loaded.path.resolve()]
    return loaded


def check_count(n: int, where: Path | str) -> None:
    """Refuse a model of more than MAX_TENSORS tensors (before its tensors are read, where the format allows)."""
    if n > MAX_TENSORS:
        raise InputError(f"{where}: {n:,} tensors, more than the {MAX_TENSORS:,} initaudit audits in one run "
                         "(initaudit.loaders.MAX_TENSORS)")


def _load(path: str | Path | None, *, trust_pickle: bool = False, factory: str | None = None,
          module: torch.nn.Module | None = None, optimizer_state: bool = False) -> Loaded:
    """The loader for the format at hand."""
    from . import modules as module_loader
    from . import dcp, hf_folder, safetensors_file, torch_files

    if is_remote(path):
        raise InputError(f"{path}: --model takes local weights; check a remote checkpoint on its own")
    if module is None and factory:
        module = module_loader.build(factory)
    p = Path(path) if path is not None else None
    where = file_policy.model_kind(p) if p is not None else None  # before any open: a FIFO would block it
    kind = sniff(p) if where == "file" else None
    if module is not None:
        if kind == "onnx":
            raise InputError(f"{p}: --model takes PyTorch weights; check an ONNX model on its own")
        if p is not None:
            state = safetensors_file.read_all(p) if kind == "safetensors" else torch_files.state_dict_of(p, trust_pickle)
            module_loader.load_weights(module, state, p)
        return module_loader.from_module(module, p)
    if p is None:
        raise InputError("give a model file, or --model package.module:factory")
    if where == "folder" and dcp.is_dcp_folder(p):
        return dcp.load(p, optimizer_state)
    if where == "folder" and hf_folder.is_hf_folder(p):
        return hf_folder.load(p)
    if where == "folder":
        index = hf_folder.index_of(p)
        also = f", or its shard index ({p / index}) without one" if index else ""
        raise InputError(f"{p}: a folder without config.json (nor a distributed checkpoint's .metadata); give a model "
                         f"file (.pt, .pth, .bin, .ckpt, .safetensors, .onnx), a Hugging Face model folder{also}")
    if p.name.endswith(".index.json"):
        return hf_folder.load(p.parent, index=p.name)
    if kind == "safetensors":
        return safetensors_file.load(p)
    if kind == "onnx":
        from . import onnx_file  # onnx (and protobuf) are imported only for an ONNX model

        return onnx_file.load(p)
    return torch_files.load(p, trust_pickle)


def sniff(path: Path) -> str:
    """torch | safetensors | onnx, from the first bytes where they tell (a zip or a pickle is torch's,
    an 8-byte length then '{' is safetensors', a protobuf opening with ir_version is ONNX's), else
    from the suffix."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"  # before the pickle test: a header length's low byte can be 0x80
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x08":  # field 1 (ir_version), a varint: how every ONNX ModelProto starts
        return "onnx"
    return {".safetensors": "safetensors", ".onnx": "onnx"}.get(path.suffix, "torch")
