"""safetensors files, read lazily one tensor at a time, without copying.

safetensors' own reader checks the file (header, dtypes, offsets); the tensors are then views of
one private memory map of the file, and `release` hands back each tensor's pages once it is
audited, so a file far larger than memory is read in the memory of its largest tensor.
"""

from __future__ import annotations

import math
import mmap
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from initaudit.load.bounded import loads_json
from initaudit.common.errors import InputError, NoWeights
from initaudit.load.containers import PACKED_REASON, packed_quantized
from initaudit.load.source import Loaded, TensorSource, check_count, natural_key
from initaudit.load.pages import MappedFile

MAX_HEADER = 100_000_000  # safetensors' own limit on the header's size
# The header's dtype names; others (sub-byte, new ones) are read through safetensors itself.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


def _count(path: Path, shown: Path) -> int:
    """The tensors in a safetensors header, counted in its bytes (one "data_offsets" per tensor) so that a
    header of a million entries is refused before it is parsed (which takes seconds and gigabytes)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(min(size, MAX_HEADER))
    except OSError as exc:
        raise InputError(f"{shown}: cannot be read ({exc.strerror or exc})") from None
    return header.count(b'"data_offsets"')


def open_file(path: Path, shown: Path | None = None):
    """safe_open `path` (already passed by the file policy) once its tensor count is within MAX_TENSORS;
    errors name `shown`, the path the user knows."""
    check_count(_count(path, shown or path), shown or path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{shown or path}: not a readable safetensors file ({exc})") from None


def parse_header(raw: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (name -> dtype, shape, data_offsets) and the metadata of a header's JSON (its size and
    nesting bounded); ValueError where it is not a JSON object, or its metadata not strings by name."""
    header = loads_json(raw)
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map names to strings")
    return header, metadata


def view(buffer, base: int, entry: dict) -> torch.Tensor | None:
    """The tensor an entry describes, as a view of `buffer` (None where a view cannot be made: an unknown
    dtype, or data not aligned to its element size)."""
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        return None
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    size = torch.empty(0, dtype=dtype).element_size()
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    if (base + begin) % size:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: nothing writes to audited tensors
        return torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // size, offset=base + begin).reshape(shape)


class HeaderEntries:
    """What a safetensors header tells of its tensors (`entries`: name -> dtype, shape, data_offsets)."""

    entries: dict[str, dict]

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self.entries[key]["data_offsets"]
        return end - begin


class SafetensorsFile(HeaderEntries):
    """One safetensors file: checked by safetensors, its tensors views of a private memory map."""

    def __init__(self, path: Path, shown: Path | None = None):
        self.path, self.shown = path, shown or path
        self.handle = open_file(path, shown)
        self.metadata = self.handle.metadata() or {}
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.entries, _ = parse_header(f.read(n))
            self.base = 8 + n
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.pages = MappedFile(path)
        self.address = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()

    def get(self, key: str) -> torch.Tensor:
        tensor = view(self.map, self.base, self.entries[key])
        return tensor if tensor is not None else self.handle.get_tensor(key)

    def release(self, key: str) -> None:
        begin, end = self.entries[key]["data_offsets"]
        self.pages.release_range(self.address + self.base + begin, self.address + self.base + end)

    def in_file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_file(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load(path: Path) -> Loaded:
    file = SafetensorsFile(path)
    if not file.entries:
        raise NoWeights(f"{path}: a safetensors file holding no tensors: nothing to audit")
    keys = sorted(file.keys(), key=natural_key)
    packed = packed_quantized(keys)
    left_out = set(packed)
    keys = [k for k in keys if k not in left_out]
    note = ("activations are unknown in a bare safetensors file: pass --activation (or --model"
            " package.module:factory) to check scales against them")
    return Loaded(path, "safetensors", TensorSource({k: file.shape(k) for k in keys}, file.get, release=file.release,
                                                    nbytes={k: file.nbytes(k) for k in keys}),
                  container={"metadata": file.metadata, "file": file}, notes=[note],
                  unread={PACKED_REASON: packed} if packed else {})
