"""ONNX models: the graph is parsed whole, tensors (external data included) are read one at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from initaudit.common.errors import InputError, first_line
from initaudit.load.files import inside
from initaudit.flow.onnx_graph import analyse
from initaudit.flow.onnx_ops import View
from initaudit.flow.onnx_scopes import scopes, walk
from initaudit.load.source import Loaded, TensorSource


@dataclass
class OnnxContainer:
    """What `fix` needs to write the model back: the proto (external data not loaded) and where each tensor lives."""

    model: onnx.ModelProto
    views: dict[str, View]
    sources: dict[str, onnx.TensorProto]
    outputs: dict[str, str] = field(default_factory=dict)  # layer -> its node's output value (for `probe`)


# The most nodes (subgraphs' included) one model may hold: the checker and the graph walk cost about 40 µs and
# 2 kB a node, so a 30 MB file of a million empty nodes would take 40 s and 2 GB; the largest exported LLMs
# hold tens of thousands.
MAX_NODES = 250_000


def node_count(graph: onnx.GraphProto) -> int:
    """Nodes in a graph and every subgraph its nodes hold (If branches, Loop and Scan bodies)."""
    count = 0
    pending = [graph]
    while pending:
        current = pending.pop()
        count += len(current.node)
        for node in current.node:
            for attribute in node.attribute:
                pending.extend([attribute.g] if attribute.HasField("g") else [])
                pending.extend(attribute.graphs)
    return count


def read(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """Parse and validate; a broken graph or bad external data is an InputError. Returns the model and
    the real paths of its external data files (each one inside the model's folder)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    nodes = node_count(model.graph)
    if nodes > MAX_NODES:
        raise InputError(f"{path}: {nodes:,} graph nodes, more than the {MAX_NODES:,} initaudit walks in one model")
    real = path.resolve()
    data_files = {}  # in order, once each
    for proto in sources_of(model.graph).values():
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            data_files[_check_external(proto, path)] = None
    try:
        onnx.checker.check_model(str(real))  # by path: handles external data and models over 2 GB
    except (onnx.checker.ValidationError, DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: the ONNX checker rejects the model ({first_line(exc)})") from None
    return model, list(data_files)


def _check_external(proto: onnx.TensorProto, path: Path) -> Path:
    """The real path of a tensor's external data file, once its location, offset and length are sound."""
    info = {e.key: e.value for e in proto.external_data}
    if not info.get("location"):
        raise InputError(f"{path}: tensor {proto.name!r} is stored externally but names no file")
    target = inside(path.resolve().parent, info["location"], path)
    offset, length = (_whole(info.get(key, "0"), key, proto, path) for key in ("offset", "length"))
    if offset + length > target.stat().st_size:  # no length: the rest of the file
        raise InputError(f"{path}: external data file {info['location']!r} is shorter than tensor {proto.name!r} needs")
    return target


def _whole(value: str, key: str, proto: onnx.TensorProto, path: Path) -> int:
    if not (value.isascii() and value.isdigit()):
        raise InputError(f"{path}: tensor {proto.name!r} has external-data {key} {value!r}, not a non-negative "
                         "whole number")
    return int(value)


def sources_of(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors of the graph and every subgraph in it (If branches,
    Loop/Scan bodies), by the key `analyse` gives them: the tensor's name, made unique across subgraphs.

    The protos are the graph's own, so a writer that changes them changes the model.
    """
    return {key: proto for scope in walk(scopes(graph)) for key, proto, _ in scope.tensors()}


def array(proto: onnx.TensorProto, folder: Path) -> np.ndarray:
    try:
        return numpy_helper.to_array(proto, base_dir=str(folder))
    except (OSError, ValueError) as exc:
        raise InputError(f"tensor {proto.name!r} cannot be read ({first_line(exc)})") from None


def _shape(dims: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return np.broadcast_to(np.zeros((), dtype=bool), dims)[index].shape


def load(path: Path) -> Loaded:
    model, data_files = read(path)
    sources = sources_of(model.graph)
    folder = path.resolve().parent

    def value(name: str) -> np.ndarray:
        return array(sources[name], folder)

    layers = analyse(model.graph, sources, value)

    def get(key: str) -> torch.Tensor:
        view = layers.views[key]
        data = dequantize(view, value)[view.index]
        if data.dtype not in (np.float16, np.float32, np.float64):
            data = data.astype(np.float32)  # bfloat16 and the like
        if view.shape is not None:
            data = data.reshape(view.shape)
        return torch.from_numpy(np.array(data, order="C"))  # a copy: numpy_helper's arrays are read-only

    shapes = {k: v.shape or _shape(tuple(sources[v.source].dims), v.index) for k, v in layers.views.items()}
    return Loaded(path, "onnx", TensorSource(shapes, get), flow=layers.flow, modules=layers.modules,
                  container=OnnxContainer(model, layers.views, sources, layers.outputs), notes=layers.notes,
                  files=[path.resolve(), *data_files], unread=unread(model.graph, sources, layers.views))


def dequantize(view: View, value: Callable[[str], np.ndarray]) -> np.ndarray:
    """The tensor a view reads: its source, or for a quantized one (x − zero_point)·scale."""
    data = value(view.source)
    if view.scale is None:
        return data
    zero, scale = _scale_and_zero(view, data.ndim, value)
    return (data.astype(np.float32) - zero) * scale


def stored(view: View, values: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Values read through `view` (`fix`'s new ones) as its source stores them at the view's index, in the
    source's layout; a quantized weight is not rewritten (its scale was fitted to the values it holds)."""
    if view.scale is not None:
        raise InputError(f"tensor {view.source!r} is a quantized weight: fix the float model and quantize it again")
    return values.reshape(source[view.index].shape).astype(source.dtype)


def _scale_and_zero(view: View, ndim: int, value: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A quantized view's zero point and scale, shaped to broadcast along its axis of a rank-`ndim` tensor."""
    along = [1] * ndim
    along[view.axis] = -1

    def spread(name: str) -> np.ndarray:
        part = np.asarray(value(name), dtype=np.float32).reshape(-1)
        return part.reshape(along) if part.size > 1 else part.reshape(())

    zero = spread(view.zero_point) if view.zero_point is not None else np.zeros((), np.float32)
    return zero, spread(view.scale)


_QUANTIZERS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_WEIGHT_STEP = ("quantization parameter", "scale or zero point of an audited quantized weight")
_ACTIVATION_STEP = ("quantization parameter", "scale or zero point of an activation's quantization")


def unread(graph: onnx.GraphProto, sources: dict[str, onnx.TensorProto], views: dict[str, View]) -> dict:
    """The tensors no layer reads, (kind, reason) -> names, by the (top-level) op that takes them; the scales and
    zero points of dequantized weights and of quantized activations are named as such."""
    read = {view.source for view in views.values()}
    steps = {name: _WEIGHT_STEP for view in views.values() for name in view.reads() if name not in read}
    for node in graph.node:
        if node.op_type in _QUANTIZERS:
            steps.update({name: _ACTIVATION_STEP for name in node.input[1:] if name not in steps and name not in read})
    takes = {name: node.op_type for node in graph.node for name in node.input}
    out: dict[tuple[str, str], list[str]] = {}
    for key, proto in sources.items():
        if key in steps:
            out.setdefault(steps[key], []).append(key)
        if key in read or key in steps:
            continue
        op = takes.get(key, "no top-level op")
        if any(mark in op for mark in ("Integer", "QLinear", "Quantize", "NBits")):
            group = ("quantized weight", f"quantized ({op}): not audited yet")
        elif proto.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                 onnx.TensorProto.BFLOAT16):
            group = ("tensor", f"input of {op}, which no audited layer reads")
        else:
            group = ("non-float tensor", f"{onnx.TensorProto.DataType.Name(proto.data_type).lower()} values: shapes or "
                     "indices, not weights")
        out.setdefault(group, []).append(key)
    return out
