"""torch.save files: state_dicts, training checkpoints that wrap one, full modules (trusted only), TorchScript."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from . import Loaded, TensorSource

# Where training checkpoints keep the model's weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network",
                "weights", "params", "ema_state_dict", "ema")
# Prefixes that wrappers add to every key: DDP (module.), Lightning (model.), torch.compile (_orig_mod.).
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class TorchContainer:
    """How the state_dict sat in the file, so `fix` can write the same structure back."""

    root: Any                 # the whole loaded object
    path: tuple[str, ...]     # keys from root down to the state_dict
    prefix: str               # stripped from every key


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(re.match(r"[^/]+/(code/|constants\.pkl$)", n) for n in z.namelist())


def read(path: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only unless trusted; mmap where the file format allows it."""
    try:
        if path.suffix == ".safetensors":  # torch would pick its safetensors reader by the name: give it the bytes
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=not trust_pickle)
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            what = f" ({found.group(1)})"
            raise InputError(f"{path}: the file pickles Python objects{what}, and loading it would run code from "
                             "the file; save a state_dict instead, or pass --trust-pickle if you trust its source") from None
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, ImportError) as exc:
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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
        raise InputError(f"{path}: no state_dict found in the checkpoint (top level: {keys})")
    prefix = ""
    for candidate in STRIPPED_PREFIXES:
        if all(k.startswith(prefix + candidate) for k in state):
            prefix += candidate
    stripped = {k[len(prefix):]: v for k, v in state.items()}
    return stripped, TorchContainer(root, trail, prefix)


def state_dict_of(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """Just the (unwrapped) state_dict of a torch file, to load into a module built from code."""
    if is_torchscript(path):
        return {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    obj = read(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    return unwrap(obj, path)[0]


def load(path: Path, trust_pickle: bool) -> Loaded:
    from . import modules

    if is_torchscript(path):
        return modules.from_torchscript(path)
    obj = read(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return modules.from_module(obj, path, fmt="torch-module")
    state, container = unwrap(obj, path)
    note = ("activations are unknown in a bare state_dict: pass --activation (or --model package.module:factory)"
            " to check scales against them")
    return Loaded(path, "torch-state-dict", TensorSource.of(state), container=container, notes=[note])
