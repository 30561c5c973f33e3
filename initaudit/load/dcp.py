"""torch distributed checkpoints (DCP): a folder of `.metadata` and `__<rank>_<n>.distcp` files, as
`torch.distributed.checkpoint.save` writes them, read without a process group.

`.metadata` is a pickle: it is read with an allowlist of DCP's own metadata classes (no code from the
file runs), and every claim it makes (dtypes, shapes, pieces, where each piece is stored and how many
bytes) is checked before anything is allocated or read. Tensors are then read on demand through DCP's
`FileSystemReader` (`dcp.load`, `no_dist=True`), their shards (one per rank that held a piece)
assembled by DCP itself, in batches: one load reads up to BATCH_TENSORS small tensors, given metadata cut
down to them (DCP plans each load over the whole metadata it is given: one load per tensor of the whole
metadata took time quadratic in the number of tensors, minutes for 20,000).
Optimizer state (`optim.state.…`) is left out unless asked for, and is evidence the weights are trained.
"""

from __future__ import annotations

import io
import math
import pickle
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch

from initaudit.load.bounded import MAX_DIMS, fits_in_memory, read_regular
from initaudit.common.errors import InputError
from initaudit.load.files import inside
from initaudit.flow.layers import OPTIMIZER_STATE, ModuleInfo, split_key
from initaudit.load.containers import OPTIMIZER_KEYS
from initaudit.load.source import Loaded, TensorSource, check_count
from initaudit.load.containers import STRIPPED_PREFIXES, WRAPPER_KEYS
from initaudit.load.torch_files import load_error_reason

METADATA = ".metadata"
_MAX_METADATA = 256 << 20
BATCH_TENSORS = 1024  # the most tensors one dcp.load reads
BATCH_BYTES = 4 << 20  # tensors read ahead with the one asked for: at most this many bytes in a load...
READ_AHEAD_BYTES = 8 << 20  # ...and in all, read but not yet asked for (memory stays at about 2x the largest tensor)
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


@dataclass
class DcpContainer:
    """What containers.file_signs reads (`root`) and the reader of the tensors."""

    root: dict
    reader: BatchReader


def read_metadata(folder: Path):
    """The metadata of a DCP folder, unpickled with the allowlist (its claims not checked yet: `check`)."""
    path = folder / METADATA
    data = read_regular(inside(folder, METADATA, folder), _MAX_METADATA, "a checkpoint's metadata", path)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - a crafted pickle can raise anything
        raise InputError(f"{path}: not a distributed checkpoint's metadata ({load_error_reason(exc)})") from None
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise InputError(f"{path}: not a distributed checkpoint's metadata")
    return metadata


def _sizes(value: Any, ndim: int | None = None) -> bool:
    """Whether `value` is a shape: a tuple or list of at most MAX_DIMS non-negative ints (`ndim` of them)."""
    return (isinstance(value, (tuple, list)) and len(value) <= MAX_DIMS and (ndim is None or len(value) == ndim)
            and all(type(d) is int and d >= 0 for d in value))


def _is_record(index, info) -> bool:
    """Whether a storage record is one: a tensor's name, a file, an offset and a length."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return (isinstance(index, MetadataIndex) and isinstance(getattr(index, "fqn", None), str)
            and isinstance(info, _StorageInfo) and isinstance(getattr(info, "relative_path", None), (str, PurePath))
            and type(getattr(info, "offset", None)) is int and type(getattr(info, "length", None)) is int
            and info.offset >= 0 and info.length >= 0)


def _check_storage(folder: Path, storage: Any) -> dict[str, Path]:
    """Each distinct shard file's real path (inside the folder), once every storage record is checked: a
    tensor's name, a file, an offset and a length within that file, stored as torch.save wrote it (a
    compressed record could hold a decompression bomb)."""
    where = folder / METADATA
    if not isinstance(storage, dict) or not all(_is_record(k, v) for k, v in storage.items()):
        raise InputError(f"{where}: not a distributed checkpoint's metadata (malformed storage records)")
    files = {name: inside(folder, name, where) for name in {str(v.relative_path) for v in storage.values()}}
    sizes = {name: file.stat().st_size for name, file in files.items()}
    for index, info in storage.items():
        if info.offset + info.length > sizes[str(info.relative_path)]:
            raise InputError(f"{where}: {index.fqn} is stored past the end of {info.relative_path} "
                             f"({info.offset + info.length:,} > {sizes[str(info.relative_path)]:,} bytes)")
        if getattr(info, "transform_descriptors", None):
            raise InputError(f"{where}: {index.fqn} is stored compressed or transformed; initaudit reads the "
                             "shards torch.distributed.checkpoint.save writes by default")
    return files


def _check_tensor(key: str, md, storage: dict, records: int, where: Path) -> int:
    """A tensor's bytes, once its claims are checked (before anything is allocated): a torch dtype, a shape, a
    size this machine can hold, and pieces inside the tensor (no more than its `records` in storage), each
    stored somewhere with at least its bytes."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"{where}: {key}: its dtype is of type {type(dtype).__name__!r}, not a torch dtype")
    shape, chunks = getattr(md, "size", None), getattr(md, "chunks", None)
    if not _sizes(shape):
        raise InputError(f"{where}: {key}: its shape is not a list of at most {MAX_DIMS} non-negative sizes")
    nbytes = math.prod(shape) * dtype.itemsize
    if not fits_in_memory(nbytes):
        raise InputError(f"{where}: {key} claims {nbytes:,} bytes, more than this machine's memory")
    if not isinstance(chunks, (list, tuple)) or len(chunks) > records:
        raise InputError(f"{where}: {key}: its pieces are not a list of at most its {records:,} storage records")
    for chunk in chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (isinstance(chunk, ChunkStorageMetadata) and _sizes(offsets, len(shape)) and _sizes(sizes, len(shape))
                and all(o + n <= d for o, n, d in zip(offsets, sizes, shape))):
            raise InputError(f"{where}: {key}: a piece of it lies outside its shape {tuple(shape)}")
        info = storage.get(MetadataIndex(key, offsets))
        if info is None:
            raise InputError(f"{where}: {key}: a piece of it is stored nowhere")
        if math.prod(sizes) * dtype.itemsize > info.length:
            raise InputError(f"{where}: {key}: a piece of it claims more bytes than its {info.length:,} stored")
    return nbytes


def check(folder: Path, metadata) -> tuple[dict[str, Any], list[Path]]:
    """The tensor entries of `metadata` and the shard files they are in, once every claim is checked (one
    InputError line naming the first that does not hold); all the tensors together hold no more bytes than
    the shard files, so that what is allocated is bounded by what is on disk."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = folder / METADATA
    files = sorted(set(_check_storage(folder, metadata.storage_data).values()))
    records = Counter(index.fqn for index in metadata.storage_data)
    tensors, claimed = {}, 0
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            raise InputError(f"{where}: not a distributed checkpoint's metadata (an entry's name is of type "
                             f"{type(key).__name__!r})")
        if isinstance(md, TensorStorageMetadata):
            claimed += _check_tensor(key, md, metadata.storage_data, records[key], where)
            tensors[key] = md
    stored = sum(file.stat().st_size for file in files)
    if claimed > stored:
        raise InputError(f"{where}: its tensors claim {claimed:,} bytes, more than its shard files hold ({stored:,})")
    return tensors, files


class BatchReader:
    """Tensors of a checked DCP folder by name, read in batches: the one asked for and the next not yet read
    (in `order`), up to BATCH_TENSORS and BATCH_BYTES, with metadata cut down to them; those read ahead wait
    (at most READ_AHEAD_BYTES of them) until asked for."""

    def __init__(self, folder: Path, metadata, tensors: dict[str, Any], order: list[str]):
        self.folder, self.tensors, self.order = folder, tensors, order
        self.stored: dict[str, dict] = {}  # name -> its storage records
        for index, info in metadata.storage_data.items():
            self.stored.setdefault(index.fqn, {})[index] = info
        self.ready: dict[str, torch.Tensor] = {}  # read, not yet asked for
        self.waiting = 0  # their bytes
        self.read: set[str] = set()
        self.next = 0  # where in `order` reading ahead goes on
        self.lock = threading.Lock()

    def nbytes(self, name: str) -> int:
        md = self.tensors[name]
        return math.prod(md.size) * md.properties.dtype.itemsize

    def __call__(self, name: str) -> torch.Tensor:
        """The tensor `name`: read ahead already, or read now with the next ones."""
        with self.lock:
            if name not in self.ready:
                self._load(self._batch(name))
            self.waiting -= self.nbytes(name)
            return self.ready.pop(name)

    def _batch(self, name: str) -> list[str]:
        """`name` and the next tensors not yet read, within the batch's and the read-ahead's bounds."""
        batch, size = [name], self.nbytes(name)
        while self.next < len(self.order) and len(batch) < BATCH_TENSORS:
            candidate = self.order[self.next]
            more = self.nbytes(candidate)
            if candidate not in self.read and candidate != name:
                if size + more > BATCH_BYTES or self.waiting + size + more > READ_AHEAD_BYTES:
                    break
                batch.append(candidate)
                size += more
            self.next += 1
        return batch

    def _load(self, batch: list[str]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import Metadata

        out = {k: torch.zeros(tuple(self.tensors[k].size), dtype=self.tensors[k].properties.dtype) for k in batch}
        part = Metadata({k: self.tensors[k] for k in batch},
                        storage_data={i: info for k in batch for i, info in self.stored.get(k, {}).items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled…: assuming a single process"
            try:
                dcp.load(out, storage_reader=checked_reader(self.folder, part), no_dist=True)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a damaged shard makes DCP raise
                cause = _unwrapped(exc)  # anything, wrapped in its CheckpointException (a BaseException)
                if isinstance(cause, (KeyboardInterrupt, SystemExit)):
                    raise cause from None
                raise InputError(f"{self.folder}: {batch[0]} cannot be read ({type(cause).__name__}: "
                                 f"{load_error_reason(cause)})") from None
        self.ready.update(out)
        self.waiting += sum(map(self.nbytes, batch))
        self.read.update(batch)


def _unwrapped(exc: BaseException) -> BaseException:
    """The error DCP wrapped in a CheckpointException (the first rank's), else `exc` itself."""
    failures = getattr(exc, "failures", None)
    return next(iter(failures.values()))[0] if isinstance(failures, dict) and failures else exc


def checked_reader(folder: Path, metadata):
    """DCP's FileSystemReader of `folder`, handed `metadata` (checked) instead of unpickling the file itself."""
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
    if parts[0] in OPTIMIZER_KEYS:
        return 0
    return next((i for i in range(1, len(parts) - 1)
                 if parts[i] in OPTIMIZER_KEYS and parts[i + 1] in ("state", "param_groups")), None)


def load(folder: Path, optimizer_state: bool = False) -> Loaded:
    metadata = read_metadata(folder)
    check_count(len(metadata.state_dict_metadata), folder)
    tensors, files = check(folder, metadata)
    optim = {k: i for k in tensors if (i := _optimizer_at(k)) is not None}  # key -> where the optimizer's name sits
    model = _strip([k for k in tensors if k not in optim])
    if optimizer_state:
        model.update({k: k for k in optim})
    if not model:
        raise InputError(f"{folder}: a distributed checkpoint without model tensors"
                         + (" (only optimizer state: --optimizer-state audits it)" if optim else ""))
    reader = BatchReader(folder, metadata, tensors, list(model.values()))
    shapes = {k: tuple(tensors[fqn].size) for k, fqn in model.items()}
    nbytes = {k: reader.nbytes(fqn) for k, fqn in model.items()}
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
    return Loaded(folder, "torch-dcp", TensorSource(shapes, lambda k: reader(model[k]), nbytes=nbytes),
                  container=DcpContainer(root, reader), modules=kinds, notes=notes,
                  files=[folder.resolve(), (folder / METADATA).resolve(), *files],
                  unread={} if optimizer_state or not optim else {
                      ("optimizer tensor", "an optimizer's state, --optimizer-state audits it"): list(optim)})
