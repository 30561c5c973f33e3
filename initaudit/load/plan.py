"""A checkpoint's work units, listed from what its format already says (safetensors headers, DCP's `.metadata`)
without reading a tensor's bytes: each unit is a tensor's piece (a range of its dim-0 rows) with the file and the
byte range that hold it, small enough to spread a large checkpoint over workers, and read on its own
(`read_unit`: a local file through the paths the loader checked, or a remote one by byte range).

safetensors stores each tensor's values raw and row-major: a tensor is cut into row ranges of about
UNIT_BYTES, each starting on a multiple of the rows its measuring chunk holds (`rows_multiple(width)`), so that
the pieces are measured exactly as the whole tensor is. A DCP checkpoint stores each piece a rank saved as one
`torch.save` record: that piece is the unit (it cannot be read in part)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from initaudit.common.errors import InputError
from initaudit.load.source import Loaded

UNIT_BYTES = 64 << 20  # a safetensors tensor is cut into row ranges of about this many bytes


@dataclass(frozen=True)
class Unit:
    """One piece of one tensor and where its bytes are."""

    key: str                       # the tensor's name, as the loaded model names it
    shape: tuple[int, ...]         # the whole tensor's
    offset: tuple[int, ...]        # the piece's place in it
    size: tuple[int, ...]          # the piece's shape
    dtype: torch.dtype
    file: str                      # a local path (checked by the loader) or a URL
    start: int                     # the piece's bytes [start, end) in the file
    end: int
    encoding: str = "raw"          # raw (row-major values) or torch-save (a DCP record)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def rows(self) -> tuple[int, int]:
        return (self.offset[0], self.offset[0] + self.size[0]) if self.shape else (0, 1)


def plan(loaded: Loaded, keys: list[str], rows_multiple: Callable[[int], int], unit_bytes: int | None = None,
         whole: frozenset[str] = frozenset()) -> list[Unit]:
    """The work units of the tensors `keys` of a loaded safetensors file or Hugging Face folder of safetensors
    shards (local or remote), or DCP folder (pieces of about `unit_bytes`, UNIT_BYTES by default; the tensors in
    `whole`, whose units are not on dim 0, in one piece); InputError for other formats (their bytes are not laid out
    by tensor)."""
    unit_bytes = unit_bytes or UNIT_BYTES
    if loaded.format == "torch-dcp":
        return _dcp_units(loaded, keys)
    files = _safetensors_files(loaded)
    return [unit for key in keys for unit in _row_units(key, files[key], rows_multiple, unit_bytes, key in whole)]


def _safetensors_files(loaded: Loaded) -> dict[str, object]:
    """Each tensor's safetensors file (a local SafetensorsFile or a RemoteSafetensors): what the loader opened."""
    container = loaded.container if isinstance(loaded.container, dict) else {}
    if loaded.format == "safetensors" and "file" in container:
        file = container["file"]
        return {key: file for key in loaded.tensors.shapes}
    handles = container.get("handles")
    if loaded.format == "hf-folder" and handles and all(hasattr(h, "entries") for h in handles.values()):
        return {key: handles[container["shards"][key]] for key in loaded.tensors.shapes}
    raise InputError(f"{loaded.name}: --distributed reads safetensors files, sharded safetensors folders (local or "
                     f"remote) and DCP checkpoints, not a {loaded.format} model")


def _location(file) -> str:
    """A safetensors file's local path or URL."""
    remote = getattr(file, "remote", None)
    return str(file.path) if remote is None else remote.fs.unstrip_protocol(file.path)


def _row_units(key: str, file, rows_multiple: Callable[[int], int], unit_bytes: int, whole: bool) -> list[Unit]:
    """A safetensors tensor's row ranges of about `unit_bytes`, each starting on a multiple of its chunk's rows
    (`whole`: one range)."""
    from initaudit.load.safetensors_file import DTYPES

    entry = file.entries[key]
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise InputError(f"{key}: {entry['dtype']} values are not read by --distributed")
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    base = file.base + begin
    location = _location(file)
    if len(shape) == 0 or shape[0] == 0:
        return [Unit(key, shape, (0,) * len(shape), shape, dtype, location, base, file.base + end)]
    width = math.prod(shape[1:])
    row_bytes = width * dtype.itemsize
    step = rows_multiple(width if len(shape) > 1 else 1)
    rows = shape[0] if whole else max(step, unit_bytes // max(row_bytes, 1) // step * step)
    rest = (0,) * (len(shape) - 1)
    return [Unit(key, shape, (a, *rest), (min(a + rows, shape[0]) - a, *shape[1:]), dtype, location,
                 base + a * row_bytes, base + min(a + rows, shape[0]) * row_bytes)
            for a in range(0, shape[0], rows)]


def _dcp_units(loaded: Loaded, keys: list[str]) -> list[Unit]:
    """Each stored piece of a DCP checkpoint's tensors: one torch.save record in a shard file."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    reader = loaded.container.reader
    fqns = dict(zip(loaded.tensors.shapes, reader.order))
    out = []
    for key in keys:
        fqn = fqns[key]
        md = reader.tensors[fqn]
        shape = tuple(md.size)
        for chunk in md.chunks:
            info = reader.stored[fqn][MetadataIndex(fqn, chunk.offsets)]
            file = (reader.folder / info.relative_path).resolve()
            out.append(Unit(key, shape, tuple(chunk.offsets), tuple(chunk.sizes), md.properties.dtype, str(file),
                            info.offset, info.offset + info.length, "torch-save"))
    return out


def read_unit(unit: Unit) -> torch.Tensor:
    """A unit's piece of its tensor, from its bytes alone."""
    data = _read_bytes(unit.file, unit.start, unit.end)
    if data.numel() != unit.nbytes:
        raise InputError(f"{unit.file}: {unit.key} ends early ({len(data):,} of {unit.nbytes:,} bytes)")
    if unit.encoding == "torch-save":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                piece = torch.load(io.BytesIO(data.numpy()), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a damaged record makes torch raise anything
                raise InputError(f"{unit.file}: {unit.key} cannot be read ({type(exc).__name__})") from None
        if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != unit.size or piece.dtype != unit.dtype:
            raise InputError(f"{unit.file}: {unit.key}: the stored piece is not the {unit.size} {unit.dtype} its "
                             "metadata claims")
        return piece
    return data.view(unit.dtype).reshape(unit.size)


def _read_bytes(file: str, start: int, end: int) -> torch.Tensor:
    """Bytes [start, end) of a local file (read into memory that is not zeroed first) or a URL (fsspec's byte
    range, bounded as every remote read is), as uint8."""
    if "://" in file:
        from initaudit.load.remote import Remote

        remote = Remote(file)
        raw = remote.read(remote.root, start, end)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    data = torch.empty(end - start, dtype=torch.uint8)
    with open(Path(file), "rb") as f:
        f.seek(start)
        got = f.readinto(data.numpy()) if data.numel() else 0
    return data[:got]
