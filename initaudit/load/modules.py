"""Live modules: built from code (`--model package.module:factory`), fully pickled (trusted), or TorchScript."""

from __future__ import annotations

import importlib
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from initaudit.flow import meta_model, trace
from initaudit.flow.ties import module_ties
from initaudit.flow.dynamic_trace import dynamic_flow, example_inputs
from initaudit.common.errors import InputError, first_line
from initaudit.load.source import Loaded, TensorSource
from initaudit.load.containers import STRIPPED_PREFIXES


def resolve(spec: str, option: str = "--model") -> Callable:
    """The callable `package.module:callable` names (the current folder is importable); `option` names the flag."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"{option} {spec!r}: use package.module:factory")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{option} {spec!r}: {exc}") from None
    if not callable(found):
        raise InputError(f"{option} {spec!r}: names a {type(found).__name__}, not a callable")
    return found


def build(spec: str) -> torch.nn.Module:
    """Import `package.module:callable` and call it."""
    factory = resolve(spec)
    try:
        built = factory()
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise InputError(f"--model {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(built, torch.nn.Module):
        raise InputError(f"--model {spec!r}: returned {type(built).__name__}, not a torch.nn.Module")
    return built


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint into the module built from code; say clearly which keys do not match.

    The module's own state_dict metadata (each submodule's `version`) goes with the weights: load
    hooks that convert old checkpoints read it (torchvision's MNASNet refuses a state without it),
    and a bare dict of tensors (safetensors, an unwrapped checkpoint) carries none.
    """
    own = module.state_dict()
    want = own.keys()
    for prefix in ("",) + STRIPPED_PREFIXES:
        if prefix and not all(k.startswith(prefix) for k in state):
            continue
        candidate = {k[len(prefix):]: v for k, v in state.items()}
        if candidate.keys() == want:
            state = candidate
            break
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = sorted(set(want) - set(state))[:5]
        extra = sorted(set(state) - set(want))[:5]
        raise InputError(f"{path}: its weights do not fit the --model architecture "
                         f"(missing {missing}, unexpected {extra})" if missing or extra
                         else f"{path}: its weights do not fit the --model architecture ({str(exc).splitlines()[-1].strip()})") from None


ORDER_NOTE = ("neither torch.fx nor a forward pass on a tiny input traced the model; activations were read from "
              "module order, which does not see functional calls")


def from_module(module: torch.nn.Module, path: Path | None, fmt: str = "torch-module") -> Loaded:
    """A live module: its flow from torch.fx, else from one forward pass on a tiny input, else module order."""
    infos = trace.module_infos(module)
    flow = trace.fx_flow(module, infos)
    notes = []
    if flow is None:
        inputs = example_inputs(module)
        flow = dynamic_flow(module, infos, inputs) if inputs is not None else None
    if flow is None:
        flow = trace.order_flow(module, infos)
        notes.append(ORDER_NOTE)
    state = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
    return Loaded(path, fmt, TensorSource.of(state), module=module, flow=flow, modules=infos, notes=notes,
                  declared_init=meta_model.family_init(module), ties=module_ties(module))


MAX_SCRIPT_CODE = 64 << 20  # the most TorchScript source read to find a __setstate__ before loading an archive


def loads_code(path: Path) -> bool:
    """Whether loading a TorchScript archive runs code from it: torch.jit.load compiles the archive's source
    (`code/…py`) and runs nothing of it but a class's `__setstate__`, which it calls while restoring that
    object's state. An archive whose source is too large to read through counts as running code."""
    read = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if "/code/" not in f"/{entry.filename}" or not entry.filename.endswith(".py"):
                    continue
                read += entry.file_size
                if read > MAX_SCRIPT_CODE or b"__setstate__" in archive.read(entry):
                    return True
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError):
        return False  # not a zip this reader takes: torch.jit.load gives its own answer
    return False


def read_torchscript(path: Path) -> torch.jit.ScriptModule:
    """torch.jit.load, its warnings kept off stderr and any failure (a crafted archive can raise anything) one line;
    an archive whose loading would run its own code (a scripted `__setstate__`) is refused before it is opened."""
    if loads_code(path):
        raise InputError(f"{path}: a TorchScript archive whose scripted __setstate__ runs when it is loaded: initaudit "
                         "does not load it (save the weights with torch.save(model.state_dict()) to check them)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable TorchScript archive ({first_line(exc)})") from None


def from_torchscript(path: Path) -> Loaded:
    scripted = read_torchscript(path)
    infos = trace.module_infos(scripted)
    state = {k: v.detach() for k, v in scripted.state_dict().items()}
    return Loaded(path, "torchscript", TensorSource.of(state), module=scripted, flow=trace.script_flow(scripted),
                  modules=infos)
