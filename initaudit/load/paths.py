"""What a MODEL argument is, decided here only: a URL (or the local path a `file://` URL names), a folder that is
one model (and which kind), or a file (its format from its first bytes)."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from initaudit.common.errors import InputError


# torch.save's legacy (non-zip) format opens with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# ModelProto fields that may follow ir_version: producer name/version, domain, model_version, doc, graph...
_ONNX_NEXT_TAGS = {0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42, 0x72, 0x7a, 0x8a}


def is_remote(path: object) -> bool:
    """A `scheme://…` string (s3://, gs://, hf://, https://…): read through fsspec, not the local file system."""
    return isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


_LOCAL_URL = re.compile(r"(?:file|local)://", re.IGNORECASE)


def local_path(url: str) -> Path | None:
    """The local path a `file://` (or fsspec's `local://`) URL names, as fsspec reads it (the rest of the URL,
    verbatim); None for other URLs."""
    named = _LOCAL_URL.match(url)
    return Path(url[named.end():]) if named else None


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


INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # the shard indexes, in preference


def index_of(folder: Path) -> str | None:
    """The shard index of a folder: safetensors' or torch's (.bin), else any `*.index.json`."""
    for name in INDEXES:
        if os.path.lexists(folder / name):
            return name
    found = sorted(p.name for p in folder.glob("*.index.json"))
    return found[0] if found else None


def folder_kind(folder: Path) -> str | None:
    """What model a folder is, the one rule for walking and loading alike: 'dcp' (torch.distributed: `.metadata`
    and `*.distcp` shards), 'hf' (Hugging Face / timm: `config.json` in any form, the loader refusing a link or a
    FIFO there), 'shards' (a shard index without config.json: its shards are parts of one model), else None."""
    if os.path.lexists(folder / ".metadata") and any(folder.glob("*.distcp")):
        return "dcp"
    if os.path.lexists(folder / "config.json"):
        return "hf"
    return "shards" if index_of(folder) else None


def looks_like_model(path: Path) -> bool:
    """Whether a file's first bytes are those of a model initaudit reads (its name does not matter)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return True  # safetensors: an 8-byte header length, then the JSON header
    if head.startswith(_LEGACY_TORCH):
        return True
    if head.startswith(b"PK\x03\x04"):
        return _torch_zip(path)
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _ONNX_NEXT_TAGS


def _torch_zip(path: Path) -> bool:
    """A zip written by torch.save or torch.jit.save (not any zip: a data archive is no model)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(("/data.pkl", "/constants.pkl")) for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
