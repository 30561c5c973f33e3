"""The structure of a sharded live model without its values: a twin of the module tree whose parameters and
buffers are meta tensors of the global shapes, its classes the ones the user wrote (FSDP2's wrapper classes and
every hook left behind). Tracing it (torch.fx, else one forward pass on fake tensors) gives the layer graph a
single process gets from the unsharded model, and no rank runs the sharded model (its forward all-gathers)."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from initaudit.flow import meta_model, trace
from initaudit.flow.ties import module_ties
from initaudit.load.modules import ORDER_NOTE
from initaudit.load.source import Loaded, TensorSource


def user_class(module: torch.nn.Module) -> type:
    """The module's own class: FSDP2's `fully_shard` swaps it for a subclass of FSDPModule and it."""
    cls = type(module)
    if isinstance(module, FSDPModule):
        return next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def meta_copy(tensor: torch.Tensor | None, memo: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """A meta tensor of the tensor's global shape and dtype (a Parameter stays one); a tensor met again (tied)
    gets the copy made the first time."""
    if tensor is None:
        return None
    if id(tensor) not in memo:
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) \
            else empty
    return memo[id(tensor)]


def meta_twin(module: torch.nn.Module, memo: dict[int, torch.Tensor] | None = None) -> torch.nn.Module:
    """The module tree with meta tensors for its values, fresh (empty) hook tables, and every other attribute
    shared with the original (read, never written)."""
    memo = {} if memo is None else memo
    twin = user_class(module).__new__(user_class(module))
    torch.nn.Module.__init__(twin)
    fresh = set(vars(twin))
    vars(twin).update({k: v for k, v in vars(module).items() if k not in fresh})
    twin.training = module.training
    twin._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    twin._parameters = {k: meta_copy(p, memo) for k, p in module._parameters.items()}
    twin._buffers = {k: meta_copy(b, memo) for k, b in module._buffers.items()}
    twin._modules = {k: None if m is None else meta_twin(m, memo) for k, m in module._modules.items()}
    return twin


def twin_loaded(twin: torch.nn.Module) -> Loaded:
    """What `from_module` gives for the unsharded model, from the twin: the flow from torch.fx, else from one forward
    pass on fake tensors, else module order; the tensors' shapes (their values are the shards', measured apart)."""
    infos = trace.module_infos(twin)
    flow = trace.fx_flow(twin, infos)
    if flow is None:
        flow = meta_model.fake_flow(twin, infos, None)
    notes = []
    if flow is None:
        flow = trace.order_flow(twin, infos)
        notes.append(ORDER_NOTE)
    state = dict(twin.state_dict(keep_vars=True))
    return Loaded(None, "torch-module", TensorSource.of(state), module=twin, flow=flow, modules=infos, notes=notes,
                  declared_init=meta_model.family_init(twin), ties=module_ties(twin))
