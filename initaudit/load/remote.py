"""Remote checkpoints (s3://, gs://, hf://, https://…) read through fsspec (the optional `remote` extra)
by byte ranges: a safetensors file's 8-byte length and header first, then each tensor's bytes when it
is audited; nothing is downloaded whole. A URL names a `.safetensors` file, a shard index
(`*.index.json`, its shards beside it) or a folder holding either (with its config.json, if any).
Other formats need the whole file (a zip's directory, a pickle) and are refused: download them first.

Every read is bounded (`bounded.REMOTE`, `--remote-timeout`): a connection and each piece of an answer
within the timeout, a whole read of n bytes within timeout + n / min_rate seconds (async file systems:
http(s), s3fs, gcsfs; the others keep their own timeouts), and no more bytes than were asked for, whatever
the server sends. `file://` URLs never come here: they are local paths, read under the local file policy.
"""

from __future__ import annotations

import math
import posixpath

import torch

from initaudit.load.bounded import MAX_DIMS, MAX_JSON_BYTES, REMOTE, Unreadable, fits_in_memory, loads_json
from initaudit.common.errors import InputError, NoWeights, first_line
from initaudit.load.source import Loaded, TensorSource, check_count, natural_key
from initaudit.load.safetensors_file import DTYPES, MAX_HEADER, HeaderEntries, parse_header, view

INDEX = "model.safetensors.index.json"
LOCAL_ONLY = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".jit", ".onnx", ".distcp", ".json", ".gguf", ".h5", ".npz"}


class TimedOut(InputError):
    """A remote read that took longer than `bounded.REMOTE` allows."""


async def _ranged_get(fs, url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an http(s) URL through fsspec's aiohttp session, never more: fsspec's own cat_file
    reads whatever body the server sends (an endless one included)."""
    headers = {**fs.kwargs.get("headers", {}), "Range": f"bytes={start}-{end - 1}"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **{**fs.kwargs, "headers": headers}) as response:
        if response.status == 404:
            raise FileNotFoundError(url)
        if response.status == 416:  # the range starts at or past the end: nothing there
            return b""
        response.raise_for_status()
        if response.status != 206 and start:
            raise ValueError("the server ignores byte ranges (it answered the whole file)")
        body = bytearray()
        async for chunk in response.content.iter_chunked(1 << 20):
            body += chunk[:end - start - len(body)]
            if len(body) == end - start:
                break
        return bytes(body)


class Remote:
    """One fsspec file system and the URL the user gave; every call's failure is one InputError line, every
    call bounded in time (`bounded.REMOTE`) and every read in size."""

    def __init__(self, url: str):
        self.url = url
        self.scheme = url.split("://", 1)[0]
        if "::" in url:
            raise InputError(f"{url}: a chained fsspec URL; give the file's own URL (or download it first)")
        try:
            import fsspec
        except ImportError:
            raise InputError(f"{url}: reading a remote checkpoint needs fsspec: pip install 'initaudit[remote]'") from None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **self._options())
        except ImportError as exc:  # e.g. "Install s3fs to access S3"
            raise InputError(f"{url}: {self.scheme}:// needs a package fsspec lacks ({first_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - an unknown protocol, a malformed URL
            raise InputError(f"{url}: not a URL fsspec can open ({first_line(exc)})") from None
        from fsspec.asyn import AsyncFileSystem

        self.bounded = isinstance(self.fs, AsyncFileSystem)

    def _options(self) -> dict:
        """fsspec's options for the URL's protocol: aiohttp's connect and read timeouts for http(s)."""
        if self.scheme not in ("http", "https"):
            return {}
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=REMOTE.timeout, sock_read=REMOTE.timeout)
        return {"client_kwargs": {"timeout": timeout}}

    def shown(self, path: str) -> str:
        return f"{self.scheme}://{path}" if "://" not in path else path

    def _call(self, name: str, path: str, nbytes: int = 0, **kwargs):
        """`fs.<name>(path, **kwargs)` within REMOTE's deadline for `nbytes`, every failure one InputError line."""
        from fsspec.asyn import sync

        try:
            if not self.bounded:
                return getattr(self.fs, name)(path, **kwargs)
            call = _ranged_get if name == "cat_file" and self.scheme in ("http", "https") else None
            args = (self.fs, path) if call else (path,)
            return sync(self.fs.loop, call or getattr(self.fs, "_" + name), *args, timeout=REMOTE.deadline(nbytes),
                        **kwargs)
        except FileNotFoundError:
            raise InputError(f"{self.shown(path)}: no such file") from None
        except TimeoutError:  # fsspec's FSTimeoutError and aiohttp's timeouts are TimeoutErrors
            allowed = f"{REMOTE.deadline(nbytes):.3g} s" + (f" for {nbytes:,} bytes" if nbytes else "")
            raise TimedOut(f"{self.shown(path)}: no answer within the time allowed ({allowed}; --remote-timeout "
                           "sets it)") from None
        except Exception as exc:  # noqa: BLE001 - credentials, network, permissions: all one line
            raise InputError(f"{self.shown(path)}: cannot be read ({type(exc).__name__}: {first_line(exc)}); "
                             f"check the address and your credentials for {self.scheme}://") from None

    def read(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `path` (a range request), never more."""
        data = self._call("cat_file", path, end - start, start=start, end=end) if end > start else b""
        return data[:end - start]

    def read_small(self, path: str, limit: int) -> bytes:
        """The whole of a small file (a config, an index): more than `limit` bytes is refused."""
        data = self.read(path, 0, limit + 1)
        if len(data) > limit:
            raise InputError(f"{self.shown(path)}: larger than {limit >> 20} MB, the most initaudit reads of a JSON "
                             "file")
        return data

    def size(self, path: str) -> int | None:
        """The file's size where the store tells it."""
        size = self._call("size", path)
        return size if isinstance(size, int) else None

    def exists(self, path: str) -> bool:
        try:
            return bool(self._call("exists", path))
        except TimedOut:
            raise
        except InputError:
            return True  # no permission to look is not a missing file: reading it says why


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
            _check(self.entries, remote.size(path), 8 + n)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(f"{shown}: not a readable safetensors header ({first_line(exc)})") from None
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


def _check(entries: dict, size: int | None, base: int) -> None:
    """Every entry names a dtype, a shape and data offsets that agree (bytes = values × element size), inside
    the file (of `size` bytes, where the store tells it; the data from `base`) and within this machine's memory,
    before any of it is fetched."""
    for key, entry in entries.items():
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and isinstance(shape, list)
                and len(shape) <= MAX_DIMS and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{key}: bad shape or offsets")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is not None and math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"{key}: {end - begin} bytes for {math.prod(shape)} {entry['dtype']} values")
        if size is not None and base + end > size:
            raise ValueError(f"{key}: its data ends past the end of the file ({base + end:,} > {size:,} bytes)")
        if not fits_in_memory(end - begin):
            raise ValueError(f"{key}: {end - begin:,} bytes, more than this machine's memory")


def _json(remote: Remote, path: str) -> object:
    """A small JSON file (a config, an index), its size and nesting bounded."""
    try:
        return loads_json(remote.read_small(path, MAX_JSON_BYTES))
    except Unreadable as exc:
        raise InputError(f"{remote.shown(path)}: not readable JSON ({exc})") from None


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
        if not file.entries:
            raise NoWeights(f"{url}: a safetensors file holding no tensors: nothing to audit")
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
    from initaudit.load.hf_folder import NO_CONFIG, config_context

    if index is None:
        shards = None
        files = {"model.safetensors": RemoteSafetensors(remote, posixpath.join(folder, "model.safetensors"))}
    else:
        weight_map = _json(remote, index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
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
    config = _json(remote, config_path) if remote.exists(config_path) else {}
    if isinstance(config, dict) and config:
        flow, modules, hints, notes, init, ties = config_context(config, shapes, remote.shown(config_path))
    else:
        init, ties = {}, []
        flow, modules, hints, notes = None, {}, {}, [NO_CONFIG]
    source = TensorSource(shapes, lambda k: files[shards[k]].get(k), nbytes={k: files[shards[k]].nbytes(k) for k in shapes})
    return Loaded(None, "hf-folder", source, flow=flow, modules=modules, activations=hints,
                  container={"shards": shards, "metadata": {n: f.metadata for n, f in files.items()}, "handles": files},
                  notes=notes, source=url, declared_init=init, ties=ties)
