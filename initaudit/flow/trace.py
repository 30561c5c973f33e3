"""Data flow of live modules and TorchScript archives: torch.fx where it traces, module order otherwise."""

from __future__ import annotations

import contextlib
import copy
import copy
import inspect
import math
import re
from collections.abc import Iterator

import torch

from initaudit.flow.activations import UNKNOWN, Activation, canonical, unmodelled
from initaudit.flow.dataflow import (ACT, ADD, DIV_NAMES, LAYER, MUL, MUL_NAMES, NORM, OUTPUT, PASS, SCALE, STOP, Flow,
                                     scale_factor)
from initaudit.flow.layers import ModuleInfo, kind_of_class
from initaudit.flow.layer import WEIGHTED_KINDS

_ADD_NAMES = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "iadd"})
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
            conv = kind.startswith("conv") and isinstance(getattr(module, "stride", None), tuple)
            infos[name] = ModuleInfo(kind, names[0], transposed=names[0] == "Conv1D",
                                     strides=tuple(module.stride) if conv else (),
                                     groups=int(getattr(module, "groups", 1)) if conv else 1,
                                     gain_offset=one_plus_gain(module) if kind == "norm" else None)
    return infos


_ONE_PLUS = re.compile(r"\b1(\.0*)?\s*\+\s*self\.weight\b|\bself\.weight(\.\w+\(\))?\s*\+\s*1(\.0*)?\b")


def one_plus_gain(module: torch.nn.Module) -> bool | None:
    """Whether a norm module scales by (1 + weight) (Gemma's RMSNorm: a zero weight is its identity): torch's own
    norms do not; another's answer is what a copy of it puts out with its weight at zero (nothing: x·w), else what
    its forward's source says; None where neither can be read (TorchScript)."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    if type(module).__module__.startswith("torch.nn."):
        return False
    measured = _output_at_zero_gain(module)
    if measured is not None:
        return measured
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    return bool(_ONE_PLUS.search(source))


def _output_at_zero_gain(module: torch.nn.Module) -> bool | None:
    """Whether a copy of a norm with its weight set to zero still puts out a signal (None: it cannot be run here)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or weight.is_meta:
        return None
    n = weight.numel()
    channels_first = any(k in type(module).__name__.lower() for k in ("batch", "group", "instance"))
    try:
        probe = copy.deepcopy(module).float().eval()
        with torch.no_grad():
            probe.weight.zero_()
            out = probe(torch.randn((2, n, 4) if channels_first else (2, 3, n), generator=torch.Generator().manual_seed(0)))
    except Exception:  # noqa: BLE001 - a user's norm may take other inputs: its source tells instead
        return None
    return bool(isinstance(out, torch.Tensor) and out.abs().max() > 0)


def activation_of_module(module: torch.nn.Module) -> Activation | None:
    names = class_names(module)
    if names[0] in ("PReLU",):
        weight = getattr(module, "weight", None)
        return Activation("prelu", float(weight.detach().float().mean()) if weight is not None else 0.25)
    if "LeakyReLU" in names:
        return Activation("leaky_relu", float(getattr(module, "negative_slope", 0.01)))
    if list(module.parameters(recurse=False)) or list(module.children()):
        return None
    if unmodelled(names[0]):
        return UNKNOWN
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
    if name in MUL_NAMES:
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
    if unmodelled(name):
        return ACT, UNKNOWN
    return PASS, None


def constant_value(value) -> float | None:
    """A Python number's value, or a one-element real tensor's (the caller leaves learnable parameters out); None
    for anything else, and for a tensor without values (on the meta device)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.is_meta:
        return None
    if value.dtype.is_complex or value.dtype == torch.bool:
        return None
    found = float(value.detach().reshape(()))
    return found if math.isfinite(found) else None


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
    """The flow from torch.fx (norm modules kept whole); None where the module does not trace (data-dependent code).
    The module is left as it was found."""
    try:
        with left_as_found(root):
            tracer = _NormsWhole({name for name, info in infos.items() if info.kind == "norm"})
            traced = torch.fx.GraphModule(root, tracer.trace(root), type(root).__name__)
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        return None
    flow, ids = Flow(), {}
    for node in traced.graph.nodes:
        entry, ids[node] = _fx_node(flow, traced, node, infos)
        if not _shape_only(node):
            for src in node.all_input_nodes:
                if src.op != "get_attr":  # a parameter or buffer read as it is: no signal (a bias, a position table)
                    flow.link(ids[src], entry)
    return flow.fold_gains()


class _NormsWhole(torch.fx.Tracer):
    """fx's tracer, keeping whole the modules known as norms: a norm written by hand (LLaMA's and T5's RMSNorm) is
    a normalization of the flow, not its arithmetic."""

    def __init__(self, norms: set[str]):
        super().__init__()
        self.norms = norms

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.norms or super().is_leaf_module(m, module_qualified_name)


def _fx_node(flow: Flow, traced: torch.fx.GraphModule, node: torch.fx.Node,
             infos: dict[str, ModuleInfo]) -> tuple[int, int]:
    """The flow nodes of one fx node: (where its inputs go, where its output comes from); a layer applied to a
    weight times a constant (F.linear(x, w·c): StyleGAN's equalized learning rate) is followed by that constant."""
    if node.op == "call_module":
        info = infos.get(node.target)
        role, act = module_role(traced.get_submodule(node.target), info.kind if info else None)
        idx = flow.add(role, node.target if role in (LAYER, NORM) else None, act)
        return idx, idx
    if node.op == "output":
        idx = flow.add(OUTPUT)
        return idx, idx
    if node.op not in ("call_function", "call_method"):
        idx = flow.add(PASS)
        return idx, idx
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    layer = _functional_layer(node, name, traced)
    if layer is not None:
        idx = flow.add(LAYER, layer[0])
        if layer[1] == 1.0:
            return idx, idx
        scaled = flow.add(SCALE, factor=layer[1])
        flow.link(idx, scaled)
        return idx, scaled
    factor = _fx_scale(node, name, traced)
    if factor is not None:
        idx = flow.add(SCALE, factor=factor[0])
    else:
        role, act = function_role(name, node.args, node.kwargs)
        idx = flow.add(role, None, act, moment=_fx_parameter_moment(node, traced) if role == MUL else None)
    return idx, idx


def _fx_constant(arg, traced: torch.fx.GraphModule) -> float | None:
    """The value of an fx argument that is a constant: a number, or a one-element buffer or tensor attribute (not
    a parameter: a learnable scalar, ReZero's α, is a recipe of its own)."""
    if isinstance(arg, torch.fx.Node):
        found = getattr_path(traced, arg.target) if arg.op == "get_attr" else None
        return None if isinstance(found, torch.nn.Parameter) else constant_value(found)
    return constant_value(arg)


def _fx_parameter_moment(node: torch.fx.Node, traced: torch.fx.GraphModule) -> float | None:
    """E[p²] of the learnable parameter a product of one computed tensor and that parameter multiplies by
    (ReZero's and SkipInit's α, LayerScale's γ); None for any other product."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(arg, torch.fx.Node) for arg in node.args):
        return None
    held = [getattr_path(traced, arg.target) if arg.op == "get_attr" else None for arg in node.args]
    params = [p for p in held if isinstance(p, torch.nn.Parameter)]
    if len(params) != 1 or all(h is not None for h in held) or not params[0].is_floating_point() or params[0].is_meta:
        return None  # a meta tensor (a model built from its config, no values) holds no moment
    return float(params[0].detach().double().square().mean()) if params[0].numel() else None


def _fx_scale(node: torch.fx.Node, name: str, traced: torch.fx.GraphModule) -> tuple[float, object] | None:
    """(the constant, the other operand) of a product or quotient of one tensor and one constant, else None."""
    if name not in MUL_NAMES | DIV_NAMES or len(node.args) != 2 or node.kwargs:
        return None
    constants = [_fx_constant(arg, traced) for arg in node.args]
    factor = scale_factor(name, constants)
    if factor is None:
        return None
    return factor, node.args[0] if constants[0] is None else node.args[1]


def getattr_path(root: object, path: str) -> object:
    """The object at a dotted attribute path ('block.0.scale'); None where there is none."""
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


def _shape_only(node: torch.fx.Node) -> bool:
    """x.size(), x.dim(), x.shape, len(x): a node that reads only the shape of its input."""
    if node.op == "call_method":
        return node.target in SHAPE_ONLY
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (name == "len" or name == "getattr" and len(node.args) > 1
                                           and node.args[1] in SHAPE_ONLY)


def _functional_layer(node: torch.fx.Node, name: str, traced: torch.fx.GraphModule) -> tuple[str, float] | None:
    """F.linear(x, self.weight) and friends on a module's own parameter: the layer is that module; with the
    constant the weight is multiplied by on the way (F.linear(x, self.weight * self.scale)), else 1."""
    if name not in LAYER_FUNCTIONS or len(node.args) < 2:
        return None
    weight, factor = node.args[1], 1.0
    while isinstance(weight, torch.fx.Node) and weight.op in ("call_function", "call_method"):
        op = weight.target if isinstance(weight.target, str) else getattr(weight.target, "__name__", "")
        found = _fx_scale(weight, op, traced)
        if found is None:
            return None
        factor, weight = factor * found[0], found[1]
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and "." in weight.target:
        return weight.target.rsplit(".", 1)[0], factor
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

    Functional ops hide their work in prim::If/Loop blocks (`if inplace: ...`): blocks are walked and their
    outputs feed the If node's outputs; an If on a constant or a module attribute walks only the branch taken.
    Constants are propagated first (math.sqrt(2) becomes 1.414...), so that products by constants are scales.
    """
    if not hasattr(root, "inlined_graph"):  # no one forward graph (a scripted nn.LSTM has forward__0, forward__1)
        return order_flow(root, module_infos(root))
    graph = root.inlined_graph  # a copy: passes over it leave the archive alone
    with contextlib.suppress(RuntimeError):
        torch._C._jit_pass_constant_propagation(graph)
    return _ScriptFlow(root).build(graph)


class _ScriptFlow:
    """The flow of one inlined TorchScript graph, with the values its GetAttr nodes read."""

    def __init__(self, root: torch.jit.ScriptModule):
        self.root = root
        self.parameters = {name for name, _ in root.named_parameters()}
        self.paths: dict[torch._C.Value, str] = {}
        self.flow, self.ids = Flow(), {}

    def build(self, graph: torch._C.Graph) -> Flow:
        for value in graph.inputs():
            self.ids[value] = self.flow.add(PASS)
        self.visit(graph.nodes())
        out = self.flow.add(OUTPUT)
        for value in graph.outputs():
            if value in self.ids:
                self.flow.link(self.ids[value], out)
        return self.flow.fold_gains()

    def visit(self, nodes) -> None:
        for node in nodes:
            kind = node.kind()
            if kind == "prim::GetAttr":
                base = self.paths.get(node.input(), "")
                self.paths[node.output()] = f"{base}.{node.s('name')}" if base else node.s("name")
                continue
            if kind == "prim::Constant":
                continue
            inputs = list(node.inputs())
            entry, idx = self.node(node, inputs)
            for value in inputs if kind.split("::", 1)[1] not in SHAPE_ONLY else ():
                if value in self.ids:
                    self.flow.link(self.ids[value], entry)
            for block in self.blocks(node, inputs):
                self.visit(block.nodes())
                for value in block.outputs():
                    if value in self.ids:
                        self.flow.link(self.ids[value], entry)
            for value in node.outputs():
                self.ids[value] = idx

    def blocks(self, node: torch._C.Node, inputs: list) -> list:
        """The node's blocks that run: an If whose condition is known runs one of its two."""
        blocks = list(node.blocks())
        if node.kind() != "prim::If" or len(blocks) != 2:
            return blocks
        condition = self.known(inputs[0])
        return blocks if not isinstance(condition, bool) else [blocks[0] if condition else blocks[1]]

    def known(self, value: torch._C.Value) -> object:
        """A value fixed before the forward runs: a constant, or a module attribute that is no parameter."""
        if value.node().kind() == "prim::Constant":
            return value.toIValue()
        path = self.paths.get(value)
        return getattr_path(self.root, path) if path is not None and path not in self.parameters else None

    def node(self, node: torch._C.Node, inputs: list) -> tuple[int, int]:
        """(where the node's inputs go, where its output comes from)."""
        op = node.kind().split("::", 1)[1]
        weight = self.weight(inputs[1]) if op in LAYER_FUNCTIONS and len(inputs) > 1 else None
        if weight is not None:
            idx = self.flow.add(LAYER, weight[0].rsplit(".", 1)[0])
            if weight[1] == 1.0:
                return idx, idx
            scaled = self.flow.add(SCALE, factor=weight[1])
            self.flow.link(idx, scaled)
            return idx, scaled
        factor = self.scale(op, inputs)
        if factor is not None:
            idx = self.flow.add(SCALE, factor=factor[0])
            return idx, idx
        role, act = function_role(op, (), {})
        if act is not None and act.name == "leaky_relu" and len(inputs) > 1:
            slope = inputs[1].toIValue()
            act = Activation("leaky_relu", float(slope) if slope is not None else 0.01)
        idx = self.flow.add(role, None, act)
        return idx, idx

    def scale(self, op: str, inputs: list) -> tuple[float, torch._C.Value] | None:
        """(the constant, the other operand) of aten::mul/div of one tensor by one constant, else None."""
        if op not in MUL_NAMES | DIV_NAMES or len(inputs) != 2:
            return None
        constants = [constant_value(self.known(value)) for value in inputs]
        factor = scale_factor(op, constants)
        return None if factor is None else (factor, inputs[0] if constants[0] is None else inputs[1])

    def weight(self, value: torch._C.Value) -> tuple[str, float] | None:
        """(the parameter's path, the constant it is multiplied by on the way) of a layer function's weight."""
        factor = 1.0
        while value not in self.paths:
            found = self.scale(value.node().kind().split("::", 1)[-1], list(value.node().inputs()))
            if found is None:
                return None
            factor, value = factor * found[0], found[1]
        return self.paths[value], factor
