"""torch.save files: state_dicts, training checkpoints that wrap one, full modules (trusted only), TorchScript."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from initaudit.common.errors import InputError, NoWeights, first_line
from initaudit.load.source import Loaded, TensorSource
from initaudit.load import modules
from initaudit.load.containers import PACKED_REASON, STRIPPED_PREFIXES, WRAPPER_KEYS, packed_quantized, unpacked_linears
from initaudit.load.foreign import Foreign, is_placeholder, placeholder_pickle, placeholders_in, walk
from initaudit.load.pages import MappedFile

# The largest pickle (a torch file's structure, not its tensor data) read: torch's weights_only reader takes
# about 150 microseconds and a few kB per tensor, so 10^6 views of one storage (an 85 MB pickle) would take
# minutes and gigabytes. A state_dict of MAX_TENSORS tensors pickles to about 20 MB.
MAX_PICKLE_BYTES = 48 << 20


@dataclass
class TorchContainer:
    """How the state_dict sat in the file, so `fix` can write the same structure back."""

    root: Any                 # the whole loaded object
    path: tuple[str, ...]     # keys from root down to the state_dict
    prefix: str               # stripped from every key
    pages: MappedFile | None = None  # where the file is mapped (its tensors' memory is handed back as they are read)


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(re.match(r"[^/]+/(code/|constants\.pkl$)", n) for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # not a (readable) zip: torch.load says what is wrong


def _allowed_globals() -> dict[str, Any]:
    """What torch's weights_only reader may build (tensors, storages, dtypes, OrderedDict...), by global name."""
    from torch import _weights_only_unpickler as allowed  # torch's list of what a weights file may name

    return {**allowed._get_allowed_globals(), **allowed._get_user_allowed_globals()}


def _torch_load(source, trust_pickle: bool, foreign: Foreign | None = None, mmap: bool = False) -> Any:
    if foreign is not None:  # torch checks sparse tensors itself only in weights_only mode
        module = placeholder_pickle(foreign, _allowed_globals())
        with torch.sparse.check_sparse_tensor_invariants():
            return torch.load(source, map_location="cpu", weights_only=False, pickle_module=module, mmap=mmap)
    return torch.load(source, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)


def _load_any(path: Path, trust_pickle: bool, foreign: Foreign | None = None) -> Any:
    """torch.load mmapped where the format allows it; a .safetensors name gets the bytes (torch would pick its
    safetensors reader by the name)."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            return _torch_load(f, trust_pickle, foreign)
    try:
        return _torch_load(path, trust_pickle, foreign, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return _torch_load(path, trust_pickle, foreign)  # legacy (non-zip) format


def refusal(path: Path, names: list[str]) -> InputError:
    """The one line that refuses a pickle whose objects need code to be read, naming the globals that do."""
    return InputError(f"{path}: the file pickles Python objects ({', '.join(names)}), and loading it would run code "
                      "from the file; save a state_dict instead, or pass --trust-pickle if you trust its source")


def _read_objects(path: Path, trust_pickle: bool, foreign: Foreign) -> Any:
    """torch's weights_only reader; where it refuses a global outside its allowlist (or cannot parse protocol 3-5
    opcodes such as FRAME), the same allowlist with every other global an inert placeholder of `foreign`."""
    try:
        return _load_any(path, trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle or not re.search(r"Unsupported operand|GLOBAL", str(exc)):
            raise
    try:
        obj = _load_any(path, trust_pickle, foreign)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - what placeholders cannot stand in for (a tensor subclass) needs its code
        if foreign.refused or foreign.classes:
            raise refusal(path, foreign.refused or list(foreign.classes)[:1]) from None
        raise
    if foreign.refused:
        raise refusal(path, foreign.refused)
    return obj


def read_objects(path: Path, trust_pickle: bool) -> tuple[Any, Foreign]:
    """torch.load with weights_only unless trusted, and what it met outside the allowlist (read as placeholders,
    never imported or called); no library warning is printed; every failure is one line."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise InputError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle), nor a "
                         "safetensors or ONNX file")
    foreign = Foreign(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # protocol notices, TypedStorage and quantization deprecations
        try:
            return _read_objects(path, trust_pickle, foreign), foreign
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a crafted file can make torch's reader raise anything
            raise InputError(f"{path}: not a readable PyTorch checkpoint ({load_error_reason(exc)})") from None


def read(path: Path, trust_pickle: bool) -> Any:
    """What `read_objects` reads, where nothing may be a placeholder (a shard of named tensors)."""
    obj, foreign = read_objects(path, trust_pickle)
    if foreign.classes:
        raise refusal(path, list(foreign.classes)[:1])
    return obj


def check_pickle_size(path: Path) -> None:
    """Refuse a zip-format torch file whose pickle exceeds MAX_PICKLE_BYTES, before torch reads it."""
    try:
        with zipfile.ZipFile(path) as z:
            size = max((i.file_size for i in z.infolist() if i.filename.endswith("data.pkl")), default=0)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # a legacy (non-zip) file, or a broken one: torch.load says what is wrong
    if size > MAX_PICKLE_BYTES:
        raise InputError(f"{path}: its pickle takes {size / 2**20:.0f} MB, more than the {MAX_PICKLE_BYTES >> 20} MB "
                         "initaudit reads (initaudit.load.torch_files.MAX_PICKLE_BYTES): too many tensors or "
                         "objects to load in bounded time")


def load_error_reason(exc: BaseException) -> str:
    """The reason in torch's message, without its advice (e.g. to set weights_only=False)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if found:
        text = found.group(1)
    elif "weights_only" in text:
        text = type(exc).__name__
    text = re.split(r"(?<=[a-z])\. ", text.strip(), maxsplit=1)[0]  # the first sentence
    return first_line(text) if text.strip() else type(exc).__name__


def _tensors_in(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj:
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
    return None


def unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], TorchContainer]:
    """Find the state_dict in a checkpoint and strip wrapper prefixes from its keys."""
    root, trail = obj, ()
    state = _tensors_in(obj)
    while state is None and isinstance(obj, Mapping):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        trail += (key,)
        obj = obj[key]
        state = _tensors_in(obj)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
        raise NoWeights(f"{path}: no state_dict found in the checkpoint (top level: {keys})")
    prefix = ""
    for candidate in STRIPPED_PREFIXES:
        if all(k.startswith(prefix + candidate) for k in state):
            prefix += candidate
    stripped = {k[len(prefix):]: v for k, v in {**state, **unpacked_linears(obj)}.items()}
    return stripped, TorchContainer(root, trail, prefix)


def _weights_in(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], TorchContainer]:
    """`unwrap`, where weights found outside placeholders are the file's weights: a file whose only weights sit
    inside a placeholder (a pickled module) needs its code to be read, and is refused as one that runs it."""
    if is_placeholder(obj):
        raise refusal(path, [obj.foreign_name])
    try:
        return unwrap(obj, path)
    except NoWeights:
        holders = [p.foreign_name for p in placeholders_in(obj) if any(isinstance(inner, torch.Tensor)
                                                                       for inner in walk(p, into_placeholders=True))]
        if holders:
            raise refusal(path, list(dict.fromkeys(holders))) from None
        raise


def state_dict_of(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """Just the (unwrapped) state_dict of a torch file, to load into a module built from code."""

    check_pickle_size(path)
    if is_torchscript(path):
        return modules.read_torchscript(path).state_dict()
    obj = read_objects(path, trust_pickle)[0]
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    return _weights_in(obj, path)[0]


def load(path: Path, trust_pickle: bool) -> Loaded:

    check_pickle_size(path)
    if is_torchscript(path):
        return modules.from_torchscript(path)
    obj, foreign = read_objects(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return modules.from_module(obj, path, fmt="torch-module")
    state, container = _weights_in(obj, path)
    packed = packed_quantized(list(state))
    left_out = set(packed)
    state = {k: v for k, v in state.items() if k not in left_out}
    container.pages = MappedFile(path)
    notes = ["activations are unknown in a bare state_dict: pass --activation (or --model package.module:factory)"
             " to check scales against them", foreign.note(obj)]
    return Loaded(path, "torch-state-dict", TensorSource.of(state, container.pages.release), container=container,
                  notes=[note for note in notes if note], unread={PACKED_REASON: packed} if packed else {})
