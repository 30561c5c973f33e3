"""Write a model back in the format it was read from, with some tensors replaced.

Every writer goes through `atomic`: the new file is written beside the target under a temporary
name and renamed over it only when complete, so an interrupted run leaves the old file whole.
Tensors that were not replaced are written back bit for bit.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from safetensors.torch import save_file

from .errors import InputError
from .loaders import Loaded
from .loaders import onnx_file, safetensors_file


@contextmanager
def atomic(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, renamed over it on success and removed on failure."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".initaudit-tmp")
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~umask  # mkstemp makes 0600
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def apply_to_module(module: torch.nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Copy new values into a live module's parameters and buffers, in place."""
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in new.items():
            state[key].copy_(tensor)


def write(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
    """Write `loaded` with the tensors of `new` (by audited key) replaced, in its own format, to `out`."""
    writer = {"torch-state-dict": _state_dict, "torch-module": _pickled_module, "torchscript": _torchscript,
              "safetensors": _safetensors, "onnx": _onnx, "hf-folder": _hf_folder}.get(loaded.format)
    if writer is None:
        raise InputError(f"cannot write the {loaded.format} format")
    writer(loaded, new, out)


def _state_dict(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
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
    with atomic(out) as tmp:
        torch.save(inner, tmp)


def _pickled_module(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
    apply_to_module(loaded.module, new)
    with atomic(out) as tmp:
        torch.save(loaded.module, tmp)


def _torchscript(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
    apply_to_module(loaded.module, new)
    with atomic(out) as tmp:
        loaded.module.save(str(tmp))


def _safetensors(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
    tensors = safetensors_file.read_all(loaded.path)
    for key, tensor in new.items():
        tensors[key] = tensor.to(tensors[key].dtype).contiguous()
    with atomic(out) as tmp:
        save_file(tensors, str(tmp), metadata=loaded.container["metadata"] or None)


def _onnx(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
    """Only the rewritten initializers change; external data is streamed tensor by tensor into a new data file."""
    views = loaded.container.views
    folder = loaded.path.resolve().parent
    model = onnx.load(str(loaded.path), load_external_data=False)
    sources = onnx_file.sources_of(model.graph)
    by_source: dict[str, list[str]] = {}
    for key in new:
        by_source.setdefault(views[key].source, []).append(key)
    for name, keys in by_source.items():
        proto = sources[name]
        data = onnx_file.array(proto, folder).copy()
        for key in keys:
            data[views[key].index] = new[key].numpy().astype(data.dtype)
        proto.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(data), proto.name))
    external = [p for p in loaded.container.sources.values() if uses_external_data(p)]
    if not external:
        with atomic(out) as tmp:
            onnx.save_model(model, str(tmp))
        return
    # A data file name the input does not use, so the old model and its data stay whole until the renames.
    taken = {e.value for p in external for e in p.external_data if e.key == "location"}
    location, n = f"{out.name}.data", 1
    while location in taken:
        n += 1
        location = f"{out.name}.{n}.data"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".initaudit-") as scratch:
        with open(Path(scratch) / location, "wb") as sink:
            for proto in sources.values():
                if uses_external_data(proto):
                    offset = _copy_external(proto, folder, sink)
                elif proto.name in by_source and len(proto.raw_data) >= EXTERNAL_THRESHOLD:
                    offset = sink.tell()
                    sink.write(proto.raw_data)
                    proto.ClearField("raw_data")
                else:
                    continue
                _point_to(proto, location, offset, sink.tell() - offset)
        onnx.save_model(model, str(Path(scratch) / out.name))
        os.replace(Path(scratch) / location, out.parent / location)
        os.replace(Path(scratch) / out.name, out)


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
    del proto.external_data[:]
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)


def _hf_folder(loaded: Loaded, new: dict[str, torch.Tensor], out: Path) -> None:
    """A Hugging Face folder: every other file copied, the weight files that hold a new tensor rewritten."""
    shards = loaded.container["shards"]  # key -> shard file name
    src = loaded.path
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a Hugging Face model folder is written to a folder")
    out.mkdir(parents=True, exist_ok=True)
    touched = {shards[k] for k in new}
    for item in src.iterdir():
        if item.is_file() and item.name not in touched and (out / item.name).resolve() != item.resolve():
            with atomic(out / item.name) as tmp:
                shutil.copy2(item, tmp)
    for shard in sorted(touched):
        tensors = safetensors_file.read_all(src / shard)
        for key in (k for k in new if shards[k] == shard):
            tensors[key] = new[key].to(tensors[key].dtype).contiguous()
        with atomic(out / shard) as tmp:
            save_file(tensors, str(tmp), metadata=loaded.container["metadata"].get(shard) or None)
