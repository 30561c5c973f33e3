"""The model as the training job holds it: unwrapped from DDP and torch.compile, and refused (one line) when its
parameters hold no values yet (meta tensors, DeepSpeed ZeRO-3 partitions, FSDP1 flat shards)."""

from __future__ import annotations

import torch

from initaudit.integrations.errors import NotMaterialized

DEEPSPEED_ADVICE = ("audit inside `deepspeed.zero.GatheredParameters(list(model.parameters()))`, or before "
                    "the model is partitioned")
FSDP1_ADVICE = ("audit before wrapping the model, inside `FullyShardedDataParallel.summon_full_params(model)`, "
                "or shard it with FSDP2's `fully_shard`, which initaudit audits in place")
META_ADVICE = "audit once the model is materialized (`model.to_empty(device=...)` and its init have run)"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel and torch.compile's wrapper."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def refuse_unmaterialized(model: torch.nn.Module) -> None:
    """Raise NotMaterialized (one line, naming an example tensor and what to do) when parameters hold no values."""
    params = dict(model.named_parameters())
    checks = (
        ("are DeepSpeed ZeRO-3 partitions (0 elements on this rank)", DEEPSPEED_ADVICE,
         [n for n, p in params.items() if hasattr(p, "ds_id") and p.numel() == 0]),
        ("are FSDP1 flat parameters (FullyShardedDataParallel without use_orig_params)", FSDP1_ADVICE,
         [n for n, p in params.items() if getattr(p, "_is_flat_param", False)]),
        ("are FSDP1 shards (FullyShardedDataParallel with use_orig_params: 1-D views of this rank's shard)",
         FSDP1_ADVICE, fsdp1_sharded(model)),
        ("are on the meta device (no values yet)", META_ADVICE,
         [n for n, t in [*params.items(), *model.named_buffers()] if t.is_meta]),
    )
    for what, advice, names in checks:
        if names:
            raise NotMaterialized(f"initaudit cannot audit this model: {len(names)} of its tensors {what}, e.g. "
                                  f"{names[0]!r}; {advice}")


def fsdp1_sharded(model: torch.nn.Module) -> list[str]:
    """Names of FSDP1 modules (use_orig_params=True) whose flat parameter is sharded right now, so that their
    original parameters are views of this rank's shard (outside `summon_full_params`)."""
    sharded = []
    for name, module in model.named_modules():
        flat = getattr(module, "_flat_param", None)  # FSDP1's FlatParameter (torch keeps its class private)
        full = getattr(flat, "_unpadded_unsharded_size", None)
        if flat is not None and full is not None and flat.numel() < full.numel():
            sharded.append(name or "the model")
    return sharded


def holds_dtensors(model: torch.nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2's fully_shard, tensor parallelism): audited where it lives."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
