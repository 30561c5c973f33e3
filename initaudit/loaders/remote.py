"""Remote checkpoints (s3://, gs://, hf://, https://…) read through fsspec (the optional `remote` extra)
by byte ranges: a safetensors file's 8-byte length and header first, then each tensor's bytes when it
is audited; nothing is downloaded whole. A URL names a `.safetensors` file, a shard index
(`*.index.json`, its shards beside it) or a folder holding either (with its config.json, if any).
Other formats need the whole file (a zip's directory, a pickle) and are refused: download them first.
"""

from __future__ import annotations

import json
import math
import posixpath

import torch

from ..errors import InputError
from . import Loaded, TensorSource, check_count, natural_key
from .safetensors_file import MAX_HEADER, DTYPES, HeaderEntries, parse_header, view

INDEX = "model.safetensors.index.json"
LOCAL_ONLY = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".jit", ".onnx", ".distcp", ".json", ".gguf", ".h5", ".npz"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class Remote:
    """One fsspec file system and the URL the user gave; every call's failure is one InputError line."""

    def __init__(self, url: str):
        self.url = url
        self.scheme = url.split("://", 1)[0]
        try:
            import fsspec
        except ImportError:
            raise InputError(f"{url}: reading a remote checkpoint needs fsspec: pip install 'initaudit[remote]'") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except ImportError as exc:  # e.g. "Install s3fs to access S3"
            raise InputError(f"{url}: {self.scheme}:// needs a package fsspec lacks ({_first_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - an unknown protocol, a malformed URL
            raise InputError(f"{url}: not a URL fsspec can open ({_first_line(exc)})") from None

    def shown(self, path: str) -> str:
        return f"{self.scheme}://{path}" if "://" not in path else path

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of `path` (a range request), or the whole of a small file."""
        try:
            return self.fs.cat_file(path, start=start, end=end)
        except FileNotFoundError:
            raise InputError(f"{self.shown(path)}: no such file") from None
        except Exception as exc:  # noqa: BLE001 - credentials, network, permissions: all one line
            raise InputError(f"{self.shown(path)}: cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
                             f"check the address and your credentials for {self.scheme}://") from None

    def exists(self, path: str) -> bool:
        try:
            return bool(self.fs.exists(path))
        except Exception:  # noqa: BLE001 - no permission to look is not a missing file: reading it says why
            return True


class RemoteSafetensors(HeaderEntries):
    """A remote safetensors file: the header read once, each tensor fetched by its byte range."""

    def __init__(self, remote: Remote, path: str):
        self.remote, self.path = remote, path
        shown = remote.shown(path)
        head = remote.read(path, 0, 8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= MAX_HEADER:
            raise InputError(f"{shown}: not a safetensors file (no header length in its first 8 bytes)")
        raw = remote.read(path, 8, 8 + n)
        check_count(raw.count(b'"data_offsets"'), shown)
        try:
            self.entries, self.metadata = parse_header(raw)
            _check(self.entries)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(f"{shown}: not a readable safetensors header ({_first_line(exc)})") from None
        self.base = 8 + n

    def get(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        data = bytearray(self.remote.read(self.path, self.base + begin, self.base + end)) if end > begin else bytearray()
        if len(data) != end - begin:
            raise InputError(f"{self.remote.shown(self.path)}: {key} ends early ({len(data)} of {end - begin} bytes)")
        tensor = view(data, 0, {**entry, "data_offsets": [0, end - begin]})
        if tensor is None:
            raise InputError(f"{self.remote.shown(self.path)}: {key} holds {entry['dtype']} values, which initaudit "
                             "reads only from local files")
        return tensor

    def release(self, key: str) -> None:
        """Nothing to hand back: each tensor is fetched into memory of its own."""

    def in_file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])


def _check(entries: dict) -> None:
    """Every entry names a dtype, a shape and data offsets that agree (bytes = values × element size)."""
    for key, entry in entries.items():
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{key}: bad shape or offsets")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is not None and math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"{key}: {end - begin} bytes for {math.prod(shape)} {entry['dtype']} values")


def _shard_path(remote: Remote, folder: str, name: str, index: str) -> str:
    """A shard named by an index, beside it: a name leaving the index's folder is refused."""
    if not name or name.startswith("/") or ".." in name.split("/") or "://" in name:
        raise InputError(f"{remote.shown(index)}: refers to {name!r}, outside the index's folder")
    return posixpath.join(folder, name)


def load(url: str) -> Loaded:
    remote = Remote(url)
    root = remote.root.rstrip("/")
    if root.endswith(".safetensors"):
        file = RemoteSafetensors(remote, root)
        keys = sorted(file.keys(), key=natural_key)
        note = ("activations are unknown in a bare safetensors file: pass --activation (or --model"
                " package.module:factory) to check scales against them")
        return Loaded(None, "safetensors", TensorSource({k: file.shape(k) for k in keys}, file.get,
                                                        nbytes={k: file.nbytes(k) for k in keys}),
                      container={"metadata": file.metadata, "file": file}, notes=[note], source=url)
    if root.endswith(".index.json"):
        folder, index = posixpath.dirname(root), root
    elif posixpath.splitext(root)[1] in LOCAL_ONLY:
        raise InputError(f"{url}: a {posixpath.splitext(root)[1]} file; other formats are read from local files "
                         "(they need the whole file): download it first")
    elif remote.exists(posixpath.join(root, INDEX)):
        folder, index = root, posixpath.join(root, INDEX)
    elif remote.exists(posixpath.join(root, "model.safetensors")):
        folder, index = root, None
    else:
        raise InputError(f"{url}: neither a .safetensors file nor a shard index (*.index.json), nor a folder holding "
                         "model.safetensors or model.safetensors.index.json; other formats are read from local files "
                         "(they need the whole file)")
    return _sharded(remote, url, folder, index)


def _sharded(remote: Remote, url: str, folder: str, index: str | None) -> Loaded:
    from .hf_folder import _context

    if index is None:
        shards = None
        files = {"model.safetensors": RemoteSafetensors(remote, posixpath.join(folder, "model.safetensors"))}
    else:
        try:
            weight_map = json.loads(remote.read(index)).get("weight_map")
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise InputError(f"{remote.shown(index)}: not a shard index (its \"weight_map\" must map tensor names "
                             "to file names)")
        check_count(len(weight_map), url)
        shards = weight_map
        files = {name: RemoteSafetensors(remote, _shard_path(remote, folder, name, index))
                 for name in sorted(set(weight_map.values()))}
    if shards is None:
        shards = {k: "model.safetensors" for k in files["model.safetensors"].keys()}
    for key, name in shards.items():
        if key not in files[name].entries:
            raise InputError(f"{url}: the index puts {key!r} in {name}, which does not hold it")
    shapes = {k: files[shards[k]].shape(k) for k in sorted(shards, key=natural_key)}
    config_path = posixpath.join(folder, "config.json")
    config = {}
    if remote.exists(config_path):
        try:
            config = json.loads(remote.read(config_path))
        except ValueError:
            raise InputError(f"{remote.shown(config_path)}: not readable JSON") from None
    if isinstance(config, dict) and config:
        flow, modules, notes = _context(config, shapes)
    else:
        flow, modules, notes = None, {}, ["no config.json beside the weights: activations are unknown; pass "
                                          "--activation (or --model package.module:factory) to check scales against them"]
    source = TensorSource(shapes, lambda k: files[shards[k]].get(k), nbytes={k: files[shards[k]].nbytes(k) for k in shapes})
    return Loaded(None, "hf-folder", source, flow=flow, modules=modules,
                  container={"shards": shards, "metadata": {n: f.metadata for n, f in files.items()}},
                  notes=notes, source=url)
