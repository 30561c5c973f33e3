"""Write a model back in the format it was read from, with some tensors replaced.

Every file goes through `outputs.atomic` (a temporary name beside the target, fsynced, moved into
place only when complete, never over a file that appeared meanwhile) and a new Hugging Face folder
through `outputs.atomic_folder`, so an interrupted run leaves the old files whole and nothing under
the final name. No output may land on a file the model reads (`outputs.Protected`), nor on one
written since the run began (`outputs.Stamp`; for `--in-place`, MODEL's files as they were read).
Tensors that were not replaced are written back bit for bit, and the same input and new tensors
give the same bytes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import torch

from initaudit.common.errors import InputError
from initaudit.load.files import within
from initaudit.load.source import Loaded
from initaudit.load import safetensors_file
from initaudit.repair.outputs import Protected, Stamp, atomic, atomic_folder, check_suffix


def apply_to_module(module: torch.nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Copy new values into a live module's parameters and buffers, in place."""
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in new.items():
            state[key].copy_(tensor)


def write(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, in_place: bool = False,
          before: Stamp | None = None) -> list[str]:
    """Write `loaded` with the tensors of `new` (by audited key) replaced, in its own format, to `out`
    (`loaded.path` itself with `in_place`); return notes on what was left out. `before`: what `out` held when
    the run began (for --in-place, before MODEL was read); nothing written since is replaced."""
    writer = {"torch-state-dict": _state_dict, "torch-module": _pickled_module, "torchscript": _torchscript,
              "safetensors": _safetensors, "onnx": _onnx, "hf-folder": _hf_folder}.get(loaded.format)
    if writer is None or (loaded.path is None and loaded.format != "safetensors"):
        raise InputError(f"cannot write the {loaded.format} format"
                         + (f" from {loaded.source}" if loaded.source else ""))
    if not in_place:
        if before is not None:
            before.check(out)  # a name taken since the run began: said so, not "not empty" or the like
        check_target(loaded, out)
    return writer(loaded, new, out, Protected(loaded), before) or []


def check_target(loaded: Loaded, out: Path) -> None:
    """Refuse an output that is, or lies in, what the model reads, or whose suffix names another format."""
    Protected(loaded).guard(out, "the fixed model")
    check_suffix(loaded, out)
    if loaded.path is not None and loaded.path.is_dir() and out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: a folder that is not empty; give a new folder name for the fixed model")


class _Sink:
    """A file for torch.save that keeps the OSError (a full disk...) its C++ writer turns into a RuntimeError,
    and hands back the pages of the mapped source after each record (torch writes a storage in one call)."""

    def __init__(self, file, pages=None):
        self.file, self.error, self.pages = file, None, pages

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        if self.pages is not None and len(data) >= _RELEASE_BYTES:
            self.pages.release_all()
        return written

    def flush(self) -> None:
        self.file.flush()


_RELEASE_BYTES = 1 << 20  # records this large hand back the source's pages once written


def _torch_save(obj, out: Path, before: Stamp | None, pages=None) -> None:
    """torch.save through a file object: the archive's inner folder is then always 'archive', not the temp name.
    Untouched tensors are written straight from the mapped source (`pages`: where it is mapped)."""
    with atomic(out, before) as tmp, open(tmp, "wb") as file:
        sink = _Sink(file, pages)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def _state_dict(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, protected: Protected,
                before: Stamp | None) -> None:
    c = loaded.container
    levels = [c.root]
    for key in c.path:
        levels.append(levels[-1][key])
    inner = copy.copy(levels[-1])  # a shallow copy keeps the mapping type and its _metadata
    for key, tensor in new.items():
        full = c.prefix + key
        inner[full] = tensor.to(inner[full].dtype)
    for level, key in zip(reversed(levels[:-1]), reversed(c.path)):
        parent = copy.copy(level)
        parent[key] = inner
        inner = parent
    _torch_save(inner, out, before, c.pages)


def _pickled_module(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, protected: Protected,
                    before: Stamp | None) -> None:
    apply_to_module(loaded.module, new)
    _torch_save(loaded.module, out, before)


def _torchscript(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, protected: Protected,
                 before: Stamp | None) -> None:
    apply_to_module(loaded.module, new)
    with atomic(out, before) as tmp, open(tmp, "wb") as sink:
        torch.jit.save(loaded.module, sink)


def _safetensors(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, protected: Protected,
                 before: Stamp | None) -> None:
    with atomic(out, before) as tmp:
        stream_safetensors(loaded.container["file"], new, tmp)


def stream_safetensors(source, new: dict[str, torch.Tensor], dest: Path) -> None:
    """A safetensors file like `source` (a SafetensorsFile, or a remote one) with the tensors of `new` replaced:
    the header first, then each tensor in the source's order, read (and its memory handed back) one at a
    time, so memory holds the new tensors and one more."""
    keys = source.in_file_order()
    header, offset, data = {}, 0, {}
    for key in keys:
        entry = dict(source.entries[key])
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if key in new:
            data[key] = _bytes(new[key], entry["dtype"], key)
            size = len(data[key])
        entry["data_offsets"] = [offset, offset + size]
        header[key] = entry
        offset += size
    if source.metadata:
        header = {"__metadata__": source.metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(dest, "wb") as sink:
        sink.write(len(raw).to_bytes(8, "little") + raw)
        for key in keys:
            if key in data:
                sink.write(data[key])
                continue
            tensor = source.get(key)
            sink.write(_bytes(tensor, source.entries[key]["dtype"], key))
            tensor = None
            source.release(key)


def _bytes(tensor: torch.Tensor, code: str, key: str) -> memoryview:
    """A tensor's bytes in the dtype its safetensors entry names."""
    dtype = safetensors_file.DTYPES.get(code)
    if dtype is None:
        raise InputError(f"{key}: a {code} tensor, which fix cannot write")
    tensor = tensor.to(dtype).contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def _onnx(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, protected: Protected,
          before: Stamp | None) -> None:
    """Only the rewritten initializers change; external data is streamed tensor by tensor into a new data file.
    A model that kept every initializer external keeps the rewritten ones external too, however small."""
    import onnx  # only here: checking and fixing other formats never loads onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from initaudit.load import onnx_file

    views = loaded.container.views
    folder = loaded.path.resolve().parent
    model = onnx.load(str(loaded.path), load_external_data=False)
    sources = onnx_file.sources_of(model.graph)
    initializers = {t.name for t in model.graph.initializer}
    all_external = bool(initializers) and all(uses_external_data(t) for t in model.graph.initializer)
    by_source: dict[str, list[str]] = {}
    for key in new:
        by_source.setdefault(views[key].source, []).append(key)
    for name, keys in by_source.items():
        proto = sources[name]
        data = onnx_file.array(proto, folder).copy()
        for key in keys:  # reshaped views written back in their source's layout
            data[views[key].index] = onnx_file.stored(views[key], new[key].numpy(), data)
        proto.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(data), proto.name))
    if not any(uses_external_data(p) for p in loaded.container.sources.values()):
        with atomic(out, before) as tmp:
            onnx.save_model(model, str(tmp))
        return
    # A data file that is none of the model's files, so the old model and its data stay whole.
    location, n = f"{out.name}.data", 1
    while protected.clash(out.parent / location):
        n += 1
        location = f"{out.name}.{n}.data"
    with atomic(out.parent / location, before) as data_tmp:
        with open(data_tmp, "wb") as sink:
            for proto in sources.values():
                if uses_external_data(proto):
                    offset = _copy_external(proto, folder, sink)
                elif proto.name in by_source and (len(proto.raw_data) >= EXTERNAL_THRESHOLD
                                                  or (all_external and proto.name in initializers)):
                    offset = sink.tell()
                    sink.write(proto.raw_data)
                    proto.ClearField("raw_data")
                else:
                    continue
                _point_to(proto, location, offset, sink.tell() - offset)
    with atomic(out, before) as tmp:  # the data first: the model never points at a missing file
        onnx.save_model(model, str(tmp))


EXTERNAL_THRESHOLD = 1024  # onnx's own default: smaller tensors stay in the model file
_CHUNK = 64 * 2**20


def _copy_external(proto: onnx.TensorProto, folder: Path, sink) -> int:
    """Copy one tensor's bytes from its data file to `sink`, in chunks; return where they start."""
    info = {e.key: e.value for e in proto.external_data}
    start, left = int(info.get("offset", 0)), int(info.get("length", 0))
    offset = sink.tell()
    with open(folder / info["location"], "rb") as source:
        source.seek(start)
        if not left:  # no length recorded: the tensor runs to the end of the file
            left = (folder / info["location"]).stat().st_size - start
        while left:
            chunk = source.read(min(left, _CHUNK))
            if not chunk:
                raise InputError(f"{proto.name}: its external data ends early")
            sink.write(chunk)
            left -= len(chunk)
    return offset


def _point_to(proto: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    import onnx

    del proto.external_data[:]
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)


def _hf_folder(loaded: Loaded, new: dict[str, torch.Tensor], out: Path, protected: Protected,
               before: Stamp | None) -> list[str]:
    """A Hugging Face folder: the weight files that hold a new tensor rewritten; for a new folder, every
    other regular file copied (never a link leaving the model's folder, a device or a subfolder: those are
    listed in the notes)."""
    shards = loaded.container["shards"]  # key -> shard file name
    src = loaded.path
    touched = sorted({shards[k] for k in new})
    if out == src:  # --in-place: each rewritten shard replaced atomically, nothing else touched
        for shard in touched:
            with atomic(src / shard, before) as tmp:
                _write_shard(loaded, new, shard, tmp)
        return []
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a file; a Hugging Face model folder is written to a folder")
    with atomic_folder(out, before) as scratch:
        left_out = _copy_regular_files(src, scratch, skip=set(touched))
        for shard in touched:
            _write_shard(loaded, new, shard, scratch / shard)
    return [f"{name}: {why}, not copied" for name, why in left_out]


def _write_shard(loaded: Loaded, new: dict[str, torch.Tensor], shard: str, dest: Path) -> None:
    shards = loaded.container["shards"]
    handle = loaded.container["handles"][shard]
    mine = {k: t for k, t in new.items() if shards[k] == shard}
    if isinstance(handle, safetensors_file.SafetensorsFile):
        stream_safetensors(handle, mine, dest)
        return
    tensors = dict(handle.tensors)  # a torch shard: untouched tensors written from the mapped file
    for key, tensor in mine.items():
        tensors[key] = tensor.to(tensors[key].dtype)
    with open(dest, "wb") as file:
        sink = _Sink(file, handle.pages)
        torch.save(tensors, sink)


def _copy_regular_files(src: Path, dest: Path, skip: set[str]) -> list[tuple[str, str]]:
    """Copy the regular files of `src`, keeping their mode: a link only when the file policy lets the model
    read what it leads to (in a Hugging Face cache snapshot, its blob); return what was left out."""
    left_out = []
    for item in sorted(src.iterdir()):
        if item.name in skip:
            continue
        try:
            real = within(src, item.name, src) if item.is_symlink() else item
        except InputError:
            left_out.append((item.name, "a link leading outside the model's folder"))
            continue
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO never blocks
        except OSError:
            left_out.append((item.name, "not readable"))
            continue
        with os.fdopen(fd, "rb") as source:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                left_out.append((item.name, "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"))
                continue
            with open(dest / item.name, "xb") as sink:
                shutil.copyfileobj(source, sink)
            os.chmod(dest / item.name, stat.S_IMODE(st.st_mode))
    return left_out
