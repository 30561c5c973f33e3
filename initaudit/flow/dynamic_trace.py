"""The flow of one real forward pass, for models torch.fx cannot trace (Hugging Face transformers...).

A tiny example input is run once, in eval mode and without gradients; a TorchFunctionMode
records every torch call with the tensors it read and wrote, and module hooks turn each layer,
norm and activation module into one node. Model state is left as it was.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from initaudit.flow.dataflow import DIV_NAMES, LAYER, MUL_NAMES, NORM, OUTPUT, PASS, SCALE, Flow, scale_factor
from initaudit.flow.layers import ModuleInfo
from initaudit.flow.layer import WEIGHTED_KINDS
from initaudit.flow.trace import LAYER_FUNCTIONS, constant_value, function_role, left_as_found, module_role


def _tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(values)[0] if isinstance(v, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    """Builds the flow: tensors are matched to the node that produced them by identity."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.flow = Flow()
        self.params = params                 # id(parameter) -> its state_dict key
        self.made: dict[int, tuple[torch.Tensor, int]] = {}  # id(tensor) -> (tensor, producing node)
        self.scaled: dict[int, tuple[torch.Tensor, str, float]] = {}  # id(w·c) -> (w·c, w's key, c)
        self.inside = 0                      # depth inside modules read as one node

    def node(self, role: str, inputs: Any, outputs: Any, layer: str | None = None, act=None,
             factor: float = 1.0) -> int | None:
        outs = _tensors(outputs)
        if not outs:
            return None
        idx = self.flow.add(role, layer, act, factor)
        for t in _tensors(inputs):
            found = self.made.get(id(t))
            if found is not None and found[0] is t:
                self.flow.link(found[1], idx)
        for t in outs:
            self.made[id(t)] = (t, idx)
        return idx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        name = getattr(func, "__name__", "")
        weight = next((t for t in _tensors((args, kwargs)) if id(t) in self.params or self.weight(t)), None)
        factor = self.scale(name, args, kwargs)
        if name in LAYER_FUNCTIONS and weight is not None and weight.dim() >= 2:
            self.layer(args, kwargs, out, weight)
        elif factor is not None and isinstance(out, torch.Tensor) and self.weight(factor[1]):
            key, before = self.weight(factor[1])
            self.scaled[id(out)] = (out, key, before * factor[0])
        elif factor is not None:
            self.node(SCALE, (args, kwargs), out, factor=factor[0])
        else:
            role, act = function_role(name, args, kwargs)
            self.node(role, (args, kwargs), out, act=act)
        return out

    def weight(self, t: Any) -> tuple[str, float] | None:
        """(the parameter's key, the constant it was multiplied by) of a parameter, or of one times a constant."""
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.params:
            return self.params[id(t)], 1.0
        found = self.scaled.get(id(t))
        return (found[1], found[2]) if found is not None and found[0] is t else None

    def computed(self, t: Any) -> bool:
        """The tensor was made by a node of the flow."""
        found = self.made.get(id(t)) if isinstance(t, torch.Tensor) else None
        return found is not None and found[0] is t

    def layer(self, args: tuple, kwargs: dict, out: Any, weight: torch.Tensor) -> None:
        """A layer function's node, and after it the constant its weight was multiplied by (if any)."""
        key, factor = self.weight(weight)
        self.node(LAYER, (args, kwargs), out, key.rsplit(".", 1)[0])
        if factor != 1.0:
            self.node(SCALE, out, out, factor=factor)  # fed by the layer's node, which made `out`

    def scale(self, name: str, args: tuple, kwargs: dict) -> tuple[float, Any] | None:
        """(the constant, the other operand) of a product or quotient of one tensor and one constant (a number
        or a one-element tensor no node made and no parameter is), else None."""
        if name not in MUL_NAMES | DIV_NAMES or len(args) != 2 or kwargs:
            return None
        constants = [None if self.weight(a) or self.computed(a) else constant_value(a) for a in args]
        factor = scale_factor(name, constants)
        return None if factor is None else (factor, args[0] if constants[0] is None else args[1])


def dynamic_flow(root: torch.nn.Module, infos: dict[str, ModuleInfo], inputs: tuple[tuple, dict]) -> Flow | None:
    """Run `root` once on `inputs` (args, kwargs) and return the recorded flow; None if the forward fails."""
    recorder = _Recorder({id(p): k for k, p in root.named_parameters(remove_duplicate=False)})
    handles = []
    for name, module in root.named_modules():
        info = infos.get(name)
        role, act = module_role(module, info.kind if info else None)
        if role == PASS or (info is not None and info.kind not in WEIGHTED_KINDS and role != NORM):
            continue
        handles.append(module.register_forward_pre_hook(_enter(recorder), with_kwargs=True))
        handles.append(module.register_forward_hook(_leave(recorder, role, name if role in (LAYER, NORM) else None, act),
                                                    with_kwargs=True))
    args, kwargs = inputs
    try:
        with left_as_found(root), torch.no_grad(), recorder:
            root.eval()
            outputs = root(*args, **kwargs)
        out = recorder.flow.add(OUTPUT)
        for t in _tensors(outputs):
            found = recorder.made.get(id(t))
            if found is not None and found[0] is t:
                recorder.flow.link(found[1], out)
    except Exception:  # noqa: BLE001 - any failure of the user's forward means: no dynamic flow
        return None
    finally:
        for h in handles:
            h.remove()
    return recorder.flow.fold_gains()


def _enter(recorder: _Recorder):
    def hook(module, args, kwargs):
        recorder.inside += 1
        module._initaudit_inputs = (args, kwargs)
    return hook


def _leave(recorder: _Recorder, role: str, layer: str | None, act):
    def hook(module, args, kwargs, output):
        recorder.inside -= 1
        inputs = module.__dict__.pop("_initaudit_inputs", (args, kwargs))
        if not recorder.inside:
            recorder.node(role, inputs, output, layer, act)
    return hook


def example_inputs(root: torch.nn.Module) -> tuple[tuple, dict] | None:
    """A tiny input for `root`: from a Hugging Face config, or from the first layer's shape."""
    config = getattr(root, "config", None)
    if config is not None and hasattr(root, "main_input_name"):
        return (), _hf_inputs(root, config)
    size = (getattr(root, "pretrained_cfg", None) or {}).get("input_size")  # timm models say what they take
    if size:
        return (torch.randn(1, *size),), {}
    for module in root.modules():
        if isinstance(module, torch.nn.Embedding):
            return (torch.randint(0, module.num_embeddings, (2, 8)),), {}
        if isinstance(module, torch.nn.Linear):
            return (torch.randn(2, module.in_features),), {}
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            dims = module.weight.dim() - 2
            return (torch.randn(1, module.in_channels, *([64, 32, 16][dims - 1],) * dims),), {}
        if isinstance(module, (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)):
            return (torch.randn(2, 5, module.input_size) if module.batch_first else torch.randn(5, 2, module.input_size),), {}
    return None


def _hf_inputs(root: torch.nn.Module, config: Any) -> dict[str, torch.Tensor]:
    name = root.main_input_name
    accepted = inspect.signature(root.forward).parameters
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        inputs = {name: torch.randn(1, getattr(config, "num_channels", 3), h, w)}
    elif name == "input_features" and hasattr(config, "num_mel_bins"):  # Whisper: mel frames, two per position
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs = {name: torch.randn(1, config.num_mel_bins, frames)}
        if "decoder_input_ids" in accepted:
            inputs["decoder_input_ids"] = torch.zeros(1, 4, dtype=torch.long)
    elif name == "input_values":  # raw audio (wav2vec2, HuBERT): one second at 16 kHz
        inputs = {name: torch.randn(1, 16000)}
    else:
        vocab = getattr(config, "vocab_size", None) or 100
        inputs = {name: torch.randint(0, vocab, (1, 8))}
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
            inputs["decoder_input_ids"] = torch.randint(0, vocab, (1, 4))
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs
