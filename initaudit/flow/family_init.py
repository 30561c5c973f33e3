"""The init a model family's own code declares for each tensor: a transformers model's `initialize_weights()` run
on a copy built on the meta device, every torch.nn.init call recorded (nothing is drawn, no memory is taken), the
last call on each parameter kept — children first, then the modules above them, as transformers runs it, so a
family's exceptions (a projection drawn uniform, GPT-2's depth-scaled c_proj, zero-init heads) are its recipe too.

A recorded call is written as a recipe, in torch.nn.init's own names: `normal(mean=0.0, std=0.02)`."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

# The torch.nn.init functions a family's init calls, recorded by name (transformers looks them up at call time).
RECORDED = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "xavier_uniform_", "xavier_normal_",
            "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "orthogonal_")


def recipe_text(name: str, bound: dict) -> str:
    """`normal(mean=0.0, std=0.02)` for a call of torch.nn.init.normal_ with those arguments."""
    args = ", ".join(f"{k}={v!r}" for k, v in bound.items() if k not in ("tensor", "generator"))
    return f"{name.rstrip('_')}({args})" if args else name.rstrip("_")


class _Overwrites(TorchFunctionMode):
    """Forgets the recorded recipe of a tensor that code then writes in place itself (a sinusoidal table copied in,
    a row set by indexing): its values are no longer what the recorded call draws."""

    def __init__(self, calls: dict[int, str]):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and (name.endswith("_") or name == "__setitem__"):
            self.calls.pop(id(args[0]), None)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _recording(calls: dict[int, str]) -> Iterator[None]:
    """While active, torch.nn.init's functions (and transformers' table of them) record their call per tensor
    instead of drawing."""
    originals = {name: getattr(torch.nn.init, name) for name in RECORDED}

    def recorder(name):
        signature = inspect.signature(originals[name])

        def record(tensor, *args, **kwargs):
            bound = signature.bind(tensor, *args, **kwargs)
            bound.apply_defaults()
            calls[id(tensor)] = recipe_text(name, dict(bound.arguments))
            return tensor
        return record

    tables = [torch.nn.init.__dict__]
    with contextlib.suppress(ImportError):
        from transformers import initialization

        tables.append(initialization.TORCH_INIT_FUNCTIONS)
    saved = [(table, name, table[name]) for table in tables for name in RECORDED if name in table]
    try:
        for table, name, _ in saved:
            table[name] = recorder(name)
        with _Overwrites(calls):
            yield
    finally:
        for table, name, original in saved:
            table[name] = original


def declared_init(module: torch.nn.Module) -> dict[str, str]:
    """Own parameter name -> the recipe a transformers model (built on the meta device) declares for it; {} for
    other modules, or where its init code fails on meta tensors (timm and other families are not read)."""
    initialize = getattr(module, "initialize_weights", None)
    if not type(module).__module__.startswith("transformers.") or not callable(initialize):
        return {}
    calls: dict[int, str] = {}
    with _recording(calls), torch.device("meta"):
        try:
            initialize()
        except Exception:  # noqa: BLE001 - a family's init code may fail on meta tensors: nothing is declared
            return {}
    return {name: calls[id(p)] for name, p in module.named_parameters() if id(p) in calls}
