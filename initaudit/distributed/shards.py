"""What one rank of a `torch.distributed` job holds of a live model: each tensor's local shard and where it sits in
the global tensor, read from the DTensor's own placements (FSDP2's `fully_shard`, tensor parallelism) and never
gathered. A tensor held whole on several ranks (a `Replicate` placement, a plain tensor of a DDP replica) is
measured on one of them only, so nothing is counted twice; a tensor two names share is measured once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from initaudit.common.errors import InputError


@dataclass
class LocalShard:
    """One tensor's block on this rank: its state_dict key, the global shape, the block's offset in it (one index
    per dim) and the block itself (its real extent: FSDP2's padding is not part of it; it may be empty)."""

    key: str
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    block: torch.Tensor


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (its keys then read as the unwrapped model's)."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.module
    return module


def check_placements(key: str, tensor: DTensor) -> None:
    """Refuse, in one line, what cannot be measured in place: partial sums and strided (2-D FSDP) shards."""
    for placement in tensor.placements:
        if not isinstance(placement, (Shard, Replicate)):  # Partial; _StridedShard is not a Shard
            raise InputError(f"{key}: a DTensor placed {placement} cannot be audited in place "
                             "(only Shard and Replicate placements are)")


def holds_first_copy(tensor: DTensor) -> bool:
    """This rank holds the copy of its shard that is measured: the first along every mesh dim that replicates it."""
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return False  # this rank is not in the tensor's mesh
    return all(c == 0 for c, p in zip(coordinate, tensor.placements) if isinstance(p, Replicate))


def dtensor_shard(key: str, tensor: DTensor) -> LocalShard | None:
    """This rank's block of a DTensor with its global offset (the offset checkpointing writes it at), or None where
    another rank's copy of the same block is the one measured."""
    check_placements(key, tensor)
    if not holds_first_copy(tensor):
        return None
    chunks = tensor.__create_chunk_list__()
    local = tensor.to_local()
    if len(chunks) != 1 or tuple(chunks[0].sizes) != tuple(local.shape):
        raise InputError(f"{key}: its local shard {tuple(local.shape)} is not one block of the global tensor")
    return LocalShard(key, tuple(tensor.shape), tuple(chunks[0].offsets), local.detach())


def plain_shard(key: str, tensor: torch.Tensor, rank: int) -> LocalShard | None:
    """A plain tensor is a replica held whole by every rank: the group's first rank measures it."""
    if rank != 0:
        return None
    return LocalShard(key, tuple(tensor.shape), (0,) * tensor.dim(), tensor.detach())


def local_shards(module: torch.nn.Module, group: dist.ProcessGroup | None = None
                 ) -> tuple[list[LocalShard], dict[str, str]]:
    """This rank's blocks of the model's state_dict tensors, and which keys name a tensor an earlier key already
    names (key -> that first key): those are measured once, under the first key."""
    rank = dist.get_rank(group)
    shards, shared, first = [], {}, {}
    for key, tensor in unwrap(module).state_dict(keep_vars=True).items():
        if id(tensor) in first:
            shared[key] = first[id(tensor)]
            continue
        first[id(tensor)] = key
        shard = dtensor_shard(key, tensor) if isinstance(tensor, DTensor) else plain_shard(key, tensor, rank)
        if shard is not None:
            shards.append(shard)
    return shards, shared
