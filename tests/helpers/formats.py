"""Write one module in each supported file format, as users produce them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("state_dict", "checkpoint", "safetensors", "torchscript", "pickled_module", "factory", "onnx")
BARE = ("state_dict", "checkpoint", "safetensors")  # formats that carry no activations


def example_input(module: torch.nn.Module) -> torch.Tensor:
    """An input batch for the fixture models (for ONNX export)."""
    from fixtures import models

    if isinstance(module, models.TinyLM):
        return torch.randint(0, models.TinyLM.VOCAB, (2, 7))
    return torch.randn(2, 3, 16, 16) if isinstance(module, models.ConvNet) else torch.randn(2, models.INPUTS)


def export_onnx(module: torch.nn.Module, path: Path, opset: int = 17, dynamo: bool = False,
                shape: tuple[int, ...] | None = None) -> Path:
    """torch.onnx.export as users call it: the legacy TorchScript exporter, or the dynamo one (`shape`: of a
    random input, for modules other than the fixture models)."""
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        x = torch.randn(shape) if shape else example_input(module)
        torch.onnx.export(module.eval(), (x,), str(path), opset_version=opset, dynamo=dynamo)
    return path


def save_as(module: torch.nn.Module, fmt: str, folder: Path, factory: str | None = None) -> tuple[Path | None, dict]:
    """Save `module` in `fmt`; return the path and the audit() keywords a user would pass for it."""
    state = module.state_dict()
    if fmt == "state_dict":
        path = folder / "model.pt"
        torch.save(state, path)
        return path, {}
    if fmt == "checkpoint":  # DDP-wrapped weights inside a training checkpoint
        path = folder / "checkpoint.ckpt"
        torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
        return path, {}
    if fmt == "safetensors":
        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
        return path, {}
    if fmt == "torchscript":
        path = folder / "scripted.pt"
        torch.jit.script(module).save(str(path))
        return path, {}
    if fmt == "pickled_module":
        path = folder / "module.pt"
        torch.save(module, path)
        return path, {"trust_pickle": True}
    if fmt == "factory":
        return None, {"model": factory}
    if fmt == "onnx":
        return export_onnx(module, folder / "model.onnx"), {}
    raise ValueError(fmt)

