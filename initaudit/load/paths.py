"""What a MODEL argument is: a URL, a local path a `file://` URL names, and a file's format from its first bytes."""

from __future__ import annotations

import re
from pathlib import Path

from initaudit.common.errors import InputError


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
