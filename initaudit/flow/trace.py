"""Data flow of live modules and TorchScript archives: torch.fx where it traces, module order otherwise."""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Iterator

import torch

from initaudit.flow.activations import Activation, canonical
from initaudit.flow.dataflow import ACT, ADD, LAYER, MUL, NORM, OUTPUT, PASS, STOP, Flow
from initaudit.flow.layers import ModuleInfo, kind_of_class
from initaudit.flow.layer import WEIGHTED_KINDS

_ADD_NAMES = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "iadd"})
_MUL_NAMES = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "imul"})
# Ops that read a tensor's shape, not its values: no signal flows through them (a reshape sized by a
# layer's output would otherwise link that layer to whatever the reshape feeds).
SHAPE_ONLY = frozenset({"size", "dim", "numel", "stride", "shape", "ndim", "len"})
_STOP_NAMES = frozenset({"softmax", "log_softmax", "softmin", "Softmax", "LogSoftmax", "Softmin", "Softmax2d"})
_NORM_FUNCTIONS = frozenset({"layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm"})
# Functions that apply a weighted layer (addmm: HF's Conv1D, torch.addmm(bias, x, weight)).
LAYER_FUNCTIONS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                             "conv_transpose3d", "_convolution", "bilinear", "addmm"})


def class_names(module: torch.nn.Module) -> list[str]:
    """The module's class and its bases' names, most derived first (TorchScript: the original name)."""
    original = getattr(module, "original_name", None)
    if isinstance(module, torch.jit.ScriptModule) and original:
        return [original]
    return [cls.__name__ for cls in type(module).__mro__]


def module_infos(root: torch.nn.Module) -> dict[str, ModuleInfo]:
    """Kind of every module whose class says it (Linear, Conv2d, LayerNorm, LSTM, HF Conv1D...)."""
    infos = {}
    for name, module in root.named_modules():
        names = class_names(module)
        kind = kind_of_class(names)
        if kind is not None:
            infos[name] = ModuleInfo(kind, names[0], transposed=names[0] == "Conv1D",
                                     gain_offset=one_plus_gain(module) if kind == "norm" else None)
    return infos


_ONE_PLUS = re.compile(r"\b1(\.0*)?\s*\+\s*self\.weight\b|\bself\.weight(\.\w+\(\))?\s*\+\s*1(\.0*)?\b")


def one_plus_gain(module: torch.nn.Module) -> bool | None:
    """Whether a norm module scales by (1 + weight), as its forward's source says (Gemma's RMSNorm: a zero weight is
    its identity); None where the source is not there to read (TorchScript)."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    return bool(_ONE_PLUS.search(source))


def activation_of_module(module: torch.nn.Module) -> Activation | None:
    names = class_names(module)
    if names[0] in ("PReLU",):
        weight = getattr(module, "weight", None)
        return Activation("prelu", float(weight.detach().float().mean()) if weight is not None else 0.25)
    if "LeakyReLU" in names:
        return Activation("leaky_relu", float(getattr(module, "negative_slope", 0.01)))
    if list(module.parameters(recurse=False)) or list(module.children()):
        return None
    for name in names:
        if name in ("Module", "ScriptModule", "RecursiveScriptModule"):
            break
        found = canonical(name, loose=True)
        if found and found not in ("identity", "unknown"):
            return Activation(found)
    return None


def module_role(module: torch.nn.Module, kind: str | None) -> tuple[str, Activation | None]:
    if kind in WEIGHTED_KINDS:
        return LAYER, None
    if kind == "norm":
        return NORM, None
    if class_names(module)[0] in _STOP_NAMES:
        return STOP, None
    act = activation_of_module(module)
    return (ACT, act) if act else (PASS, None)


def function_role(name: str, args: tuple, kwargs: dict) -> tuple[str, Activation | None]:
    if name in _ADD_NAMES:
        return ADD, None
    if name in _MUL_NAMES:
        return MUL, None
    if name in _STOP_NAMES:
        return STOP, None
    if name in _NORM_FUNCTIONS:
        return NORM, None
    found = canonical(name)
    if found == "leaky_relu":
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return ACT, Activation("leaky_relu", float(slope) if isinstance(slope, (int, float)) else 0.01)
    if found and found not in ("identity", "unknown"):
        return ACT, Activation(found)
    return PASS, None


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))  # _parameters, _buffers, _modules, hooks, training


@contextlib.contextmanager
def left_as_found(root: torch.nn.Module) -> Iterator[None]:
    """Put back every module's own attributes after a trace or a forward pass: attributes set are
    removed, replaced ones restored, and the contents of dicts, lists and sets refilled (timm's LeViT
    caches a tensor per device in a dict; under torch.fx that tensor is a Proxy of the trace's graph,
    which would break the user's next trace or deepcopy)."""
    saved = []
    for module in root.modules():
        attrs = dict(vars(module))
        contents = {k: copy.copy(v) for k, v in attrs.items()
                    if k not in _MODULE_INTERNALS and isinstance(v, (dict, list, set))}
        saved.append((module, attrs, contents))
    try:
        yield
    finally:
        for module, attrs, contents in saved:
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            now.update(attrs)
            for key, content in contents.items():
                kept = attrs[key]
                kept.clear()
                if isinstance(kept, list):
                    kept.extend(content)
                else:
                    kept.update(content)


def fx_flow(root: torch.nn.Module, infos: dict[str, ModuleInfo]) -> Flow | None:
    """The flow from torch.fx.symbolic_trace; None where the module does not trace (data-dependent code).
    The module is left as it was found."""
    try:
        with left_as_found(root):
            traced = torch.fx.symbolic_trace(root)
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        return None
    flow, ids = Flow(), {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            info = infos.get(node.target)
            role, act = module_role(traced.get_submodule(node.target), info.kind if info else None)
            ids[node] = flow.add(role, node.target if role in (LAYER, NORM) else None, act)
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            layer = _functional_layer(node, name)
            if layer is not None:
                ids[node] = flow.add(LAYER, layer)
            else:
                role, act = function_role(name, node.args, node.kwargs)
                ids[node] = flow.add(role, None, act)
        elif node.op == "output":
            ids[node] = flow.add(OUTPUT)
        else:
            ids[node] = flow.add(PASS)
        if not _shape_only(node):
            for src in node.all_input_nodes:
                flow.link(ids[src], ids[node])
    return flow


def _shape_only(node: torch.fx.Node) -> bool:
    """x.size(), x.dim(), x.shape, len(x): a node that reads only the shape of its input."""
    if node.op == "call_method":
        return node.target in SHAPE_ONLY
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (name == "len" or name == "getattr" and len(node.args) > 1
                                           and node.args[1] in SHAPE_ONLY)


def _functional_layer(node: torch.fx.Node, name: str) -> str | None:
    """F.linear(x, self.weight) and friends on a module's own parameter: the layer is that module."""
    if name not in LAYER_FUNCTIONS or len(node.args) < 2:
        return None
    weight = node.args[1]
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and "." in weight.target:
        return weight.target.rsplit(".", 1)[0]
    return None


def order_flow(root: torch.nn.Module, infos: dict[str, ModuleInfo]) -> Flow:
    """A chain of leaf modules in registration order (Sequential order; functional calls unseen)."""
    items = []
    for name, module in root.named_modules():
        info = infos.get(name)
        if info is None and list(module.children()):
            continue
        if info is not None and info.kind not in WEIGHTED_KINDS and info.kind != "norm":
            continue
        role, act = module_role(module, info.kind if info else None)
        items.append((role, name if role == LAYER else None, act))
    return Flow.chain(items, sees_activations=False)


def script_flow(root: torch.jit.ScriptModule) -> Flow:
    """The flow of a TorchScript archive's inlined graph: aten ops, weights named by their GetAttr paths.

    Functional ops hide their work in prim::If/Loop blocks (`if inplace: ...`): blocks are walked
    and their outputs feed the If node's outputs.
    """
    if not hasattr(root, "inlined_graph"):  # no one forward graph (a scripted nn.LSTM has forward__0, forward__1)
        return order_flow(root, module_infos(root))
    graph = root.inlined_graph
    paths: dict[torch._C.Value, str] = {}
    flow, ids = Flow(), {}
    for value in graph.inputs():
        ids[value] = flow.add(PASS)

    def visit(nodes) -> None:
        for node in nodes:
            kind = node.kind()
            if kind == "prim::GetAttr":
                base = paths.get(node.input(), "")
                paths[node.output()] = f"{base}.{node.s('name')}" if base else node.s("name")
                continue
            if kind == "prim::Constant":
                continue
            inputs = list(node.inputs())
            idx = _script_node(flow, node, inputs, paths)
            for value in inputs if kind.split("::", 1)[1] not in SHAPE_ONLY else ():
                if value in ids:
                    flow.link(ids[value], idx)
            for block in node.blocks():
                visit(block.nodes())
                for value in block.outputs():
                    if value in ids:
                        flow.link(ids[value], idx)
            for value in node.outputs():
                ids[value] = idx

    visit(graph.nodes())
    out = flow.add(OUTPUT)
    for value in graph.outputs():
        if value in ids:
            flow.link(ids[value], out)
    return flow


def _script_node(flow: Flow, node: torch._C.Node, inputs: list, paths: dict) -> int:
    op = node.kind().split("::", 1)[1]
    if op in LAYER_FUNCTIONS and len(inputs) > 1 and inputs[1] in paths:
        return flow.add(LAYER, paths[inputs[1]].rsplit(".", 1)[0])
    role, act = function_role(op, (), {})
    if act is not None and act.name == "leaky_relu" and len(inputs) > 1:
        slope = inputs[1].toIValue()
        act = Activation("leaky_relu", float(slope) if slope is not None else 0.01)
    return flow.add(role, None, act)
