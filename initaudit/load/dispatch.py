"""`load(MODEL)`: the loader for the format at hand (a file, a folder, a URL, a module built by a factory)."""

from __future__ import annotations

from pathlib import Path

import torch

from initaudit.common.errors import InputError
from initaudit.load import files as file_policy
from initaudit.load.paths import folder_kind, is_remote, local_path, sniff
from initaudit.load.source import Loaded, check_count


def load(path: str | Path | None, *, trust_pickle: bool = False, factory: str | None = None,
         module: torch.nn.Module | None = None, optimizer_state: bool = False) -> Loaded:
    """Load a model file, folder or URL (or a module built by `factory`, or a live `module`) for auditing.

    A `file://` URL is a local path, read under the local file policy (FIFOs and devices refused, links
    leaving a folder refused) like any other.
    `optimizer_state`: audit a distributed checkpoint's optimizer tensors too, for NaN/Inf (skipped by default;
    their presence is evidence that the weights are trained either way).
    """
    if is_remote(path):
        path = local_path(path) or path
    if is_remote(path) and module is None and not factory:
        from initaudit.load import remote
        loaded = remote.load(path)
        check_count(len(loaded.tensors), path)
        return loaded
    loaded = _load(path, trust_pickle=trust_pickle, factory=factory, module=module, optimizer_state=optimizer_state)
    check_count(len(loaded.tensors), loaded.path or "the model")
    if loaded.path is not None and not loaded.files:
        loaded.files = [loaded.path.resolve()]
    return loaded


def _load(path: str | Path | None, *, trust_pickle: bool = False, factory: str | None = None,
          module: torch.nn.Module | None = None, optimizer_state: bool = False) -> Loaded:
    """The loader for the format at hand."""
    from initaudit.load import modules as module_loader
    from initaudit.load import dcp, hf_folder, safetensors_file, torch_files

    if is_remote(path):
        raise InputError(f"{path}: --model takes local weights; check a remote checkpoint on its own")
    if module is None and factory:
        module = module_loader.build(factory)
    p = Path(path) if path is not None else None
    where = file_policy.model_kind(p) if p is not None else None  # before any open: a FIFO would block it
    kind = sniff(p) if where == "file" else None
    if module is not None:
        if kind == "onnx":
            raise InputError(f"{p}: --model takes PyTorch weights; check an ONNX model on its own")
        if p is not None:
            state = safetensors_file.read_all(p) if kind == "safetensors" else torch_files.state_dict_of(p, trust_pickle)
            module_loader.load_weights(module, state, p)
        return module_loader.from_module(module, p)
    if p is None:
        raise InputError("give a model file, or --model package.module:factory")
    kind = folder_kind(p) if where == "folder" else kind
    if kind == "dcp":
        return dcp.load(p, optimizer_state)
    if kind in ("hf", "shards"):
        return hf_folder.load(p)
    if where == "folder":
        raise InputError(f"{p}: a folder without config.json, a shard index or a distributed checkpoint's .metadata; "
                         "give a model file (.pt, .pth, .bin, .ckpt, .safetensors, .onnx) or a model folder")
    if p.name.endswith(".index.json"):
        return hf_folder.load(p.parent, index=p.name)
    if kind == "safetensors":
        return safetensors_file.load(p)
    if kind == "onnx":
        from initaudit.load import onnx_file  # onnx (and protobuf) are imported only for an ONNX model

        return onnx_file.load(p)
    return torch_files.load(p, trust_pickle)
