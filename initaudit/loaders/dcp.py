"""torch distributed checkpoints (DCP): a folder of `.metadata` and `__<rank>_<n>.distcp` files, as
`torch.distributed.checkpoint.save` writes them, read without a process group.

`.metadata` is a pickle: it is read with an allowlist of DCP's own metadata classes (no code from the
file runs). Each tensor is then read on demand through DCP's `FileSystemReader` (`dcp.load` of that
one tensor, `no_dist=True`), its shards (one per rank that held a piece) assembled by DCP itself.
Optimizer state (`optim.state.…`) is left out unless asked for, and is evidence the weights are trained.
"""

from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..files import inside, regular
from ..graph import OPTIMIZER_STATE, ModuleInfo, split_key
from ..weight_state import _OPTIMIZER_KEYS
from . import Loaded, TensorSource, check_count
from .torch_files import STRIPPED_PREFIXES, WRAPPER_KEYS

METADATA = ".metadata"
_MAX_METADATA = 256 << 20
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and torch dtypes, nothing else."""

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def is_dcp_folder(path: Path) -> bool:
    return (path / METADATA).exists() and any(path.glob("*.distcp"))


@dataclass
class DcpContainer:
    """What weight_state.file_signs reads (`root`) and the reader."""

    root: dict
    metadata: Any


def read_metadata(folder: Path):
    path = folder / METADATA
    st = regular(inside(folder, METADATA, folder), path)
    if st.st_size > _MAX_METADATA:
        raise InputError(f"{path}: {st.st_size >> 20} MB of metadata, more than initaudit reads ({_MAX_METADATA >> 20} MB)")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as exc:  # noqa: BLE001 - a crafted pickle can raise anything
        raise InputError(f"{path}: not a distributed checkpoint's metadata ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise InputError(f"{path}: not a distributed checkpoint's metadata")
    return metadata


def _reader(folder: Path, metadata):
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # the checked copy, never DCP's own unrestricted pickle.load
            return metadata

    return Reader(str(folder))


def _strip(keys: list[str]) -> dict[str, str]:
    """Model keys without the wrapper ('model.', 'state_dict.') and prefixes (DDP's 'module.') all share."""
    prefix = ""
    for candidate in (*(w + "." for w in WRAPPER_KEYS), *STRIPPED_PREFIXES):
        if keys and all(k.startswith(prefix + candidate) for k in keys):
            prefix += candidate
    return {k[len(prefix):]: k for k in keys}


def _optimizer_at(key: str) -> int | None:
    """Where an optimizer's name sits in a tensor's key: first (optim.state.…), or under a wrapper of the
    training loop's own (app.optim.state.…, named so by its state or param_groups); None for model tensors."""
    parts = key.split(".")
    if parts[0] in _OPTIMIZER_KEYS:
        return 0
    return next((i for i in range(1, len(parts) - 1)
                 if parts[i] in _OPTIMIZER_KEYS and parts[i + 1] in ("state", "param_groups")), None)


def load(folder: Path, optimizer_state: bool = False) -> Loaded:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(folder)
    entries = metadata.state_dict_metadata
    check_count(len(entries), folder)
    files = {inside(folder, str(info.relative_path), folder / METADATA)
             for info in (metadata.storage_data or {}).values()}
    tensors = {k: v for k, v in entries.items() if isinstance(v, TensorStorageMetadata)}
    optim = {k: i for k in tensors if (i := _optimizer_at(k)) is not None}  # key -> where the optimizer's name sits
    model = _strip([k for k in tensors if k not in optim])
    if optimizer_state:
        model.update({k: k for k in optim})
    if not model:
        raise InputError(f"{folder}: a distributed checkpoint without model tensors"
                         + (" (only optimizer state: --optimizer-state audits it)" if optim else ""))
    reader = _reader(folder, metadata)

    def get(key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        fqn = model[key]
        md = tensors[fqn]
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled…: assuming a single process"
            try:
                dcp.load({fqn: out}, storage_reader=reader, no_dist=True)
            except Exception as exc:  # noqa: BLE001 - a damaged shard file can make DCP raise anything
                raise InputError(f"{folder}: {fqn} cannot be read ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})") from None
        return out

    shapes = {k: tuple(tensors[fqn].size) for k, fqn in model.items()}
    nbytes = {k: math.prod(tensors[fqn].size) * tensors[fqn].properties.dtype.itemsize for k, fqn in model.items()}
    params = {".".join(parts[i + 2:-1]) for k, i in optim.items()
              if len(parts := k.split(".")) >= i + 4 and parts[i + 1] == "state"}
    first = next(iter(optim), None)
    root = {first.split(".")[optim[first]]: {"state": {p: {} for p in sorted(params)} or {"?": {}}}} if optim else {}
    notes = ["activations are unknown in a distributed checkpoint: pass --activation (or --model "
             "package.module:factory) to check scales against them"]
    if optim:
        notes.append(f"optimizer state ({len(optim)} tensors) audited for NaN/Inf only; it is evidence that the weights "
                     "are trained" if optimizer_state else f"optimizer state ({len(optim)} tensors) not audited "
                     "(--optimizer-state audits it): evidence that the weights are trained")
    kinds = {split_key(k)[0]: ModuleInfo(OPTIMIZER_STATE, "optimizer state") for k in optim if k in model}
    return Loaded(folder, "torch-dcp", TensorSource(shapes, get, nbytes=nbytes), container=DcpContainer(root, metadata),
                  modules=kinds, notes=notes, files=[folder.resolve(), (folder / METADATA).resolve(), *sorted(files)])
