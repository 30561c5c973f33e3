"""A small transformer with a tied head, and the worker that audits it sharded across CPU processes (gloo): each
rank builds the same model from one seed, shards it (FSDP2 `fully_shard`, or tensor-parallel DTensors), and
calls `audit_sharded`; rank 0 writes the report's JSON."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm attention and a ReLU MLP, each on a residual."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    """Token embedding, `depth` blocks, a final norm and a head tied to the embedding."""

    def __init__(self, vocab: int = 37, dim: int = 16, depth: int = 3, heads: int = 2, hidden: int = 42):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.segment = nn.Embedding(2, dim)  # two rows: a rank of four holds none of them
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.segment(torch.zeros_like(tokens))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(variant: str = "clean") -> TinyLM:
    """The model every rank builds from one seed: `clean`; `untied` (the head a separate copy of the embedding);
    `zero` (one block's first MLP layer all zeros); `copy` (one block's first MLP layer a copy of another's)."""
    torch.manual_seed(0)
    model = TinyLM()
    if variant == "untied":
        model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    elif variant == "zero":
        with torch.no_grad():
            model.blocks[1].fc1.weight.zero_()
    elif variant == "copy":
        with torch.no_grad():
            model.blocks[2].fc1.weight.copy_(model.blocks[1].fc1.weight)
    return model


def shard_fsdp(model: TinyLM, mesh) -> TinyLM:
    """FSDP2: each block its own group, then the root (the tie stays one parameter)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def shard_fsdp_apart(model: TinyLM, mesh) -> TinyLM:
    """FSDP2 with the embedding and the head wrapped as groups of their own: `fully_shard` then gives each its
    own DTensor, and the tie is silently two tensors (equal values)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.embed, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    return shard_fsdp(model, mesh)


TP_PLACEMENTS = {"qkv.weight": 0, "qkv.bias": 0, "fc1.weight": 0, "fc1.bias": 0, "proj.weight": 1, "fc2.weight": 1,
                 "embed.weight": 1}  # the dim each tensor is split on; every other tensor replicated


def shard_tp(model: TinyLM, mesh) -> TinyLM:
    """Tensor parallelism by hand: column-parallel qkv and fc1 (Shard(0)), row-parallel proj and fc2 (Shard(1)),
    the embedding split by columns, the rest replicated; a tensor two names share stays one DTensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            key = f"{module_name}.{name}"
            dim = next((d for suffix, d in TP_PLACEMENTS.items() if key.endswith(suffix)), None)
            if id(param) not in made:
                placement = Replicate() if dim is None else Shard(dim)
                made[id(param)] = nn.Parameter(distribute_tensor(param.detach(), mesh, [placement]))
            setattr(module, name, made[id(param)])
    return model


def shard_ddp(model: TinyLM, mesh) -> nn.Module:
    """Plain data parallelism: every rank holds the whole model (DDP's wrapper, its keys under `module.`)."""
    return nn.parallel.DistributedDataParallel(model)


SHARDINGS = {"fsdp": shard_fsdp, "fsdp_apart": shard_fsdp_apart, "tp": shard_tp, "ddp": shard_ddp}


class GatherForbidden(RuntimeError):
    """A rank tried to gather a parameter."""


def forbid_gathers():
    """A context in which `DTensor.full_tensor` raises, and so does every all-gather of more than one floating-point
    value (c10d's and the functional collectives' ops, whoever calls them: FSDP2's unshard, a DTensor
    redistribution); object collectives (pickled bytes and their sizes) still pass."""
    import contextlib

    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NoGather(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.name())
            sizes = [t.numel() for t in tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if ("allgather" in name or "all_gather" in name) and max(sizes, default=0) > 1:
                raise GatherForbidden(f"{name} of {max(sizes)} values")
            return func(*args, **(kwargs or {}))

    def full_tensor(self, *args, **kwargs):
        raise GatherForbidden(f"full_tensor of a {tuple(self.shape)} DTensor")

    @contextlib.contextmanager
    def active():
        original = DTensor.full_tensor
        DTensor.full_tensor = full_tensor
        try:
            with NoGather():
                yield
        finally:
            DTensor.full_tensor = original
    return active()


def caught_gathers(model: nn.Module) -> list[str]:
    """What `forbid_gathers` stops on this model: a full tensor, a redistribution to a replica, and an FSDP2
    model's forward (it all-gathers the parameters); the names of the calls it stopped."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate

    sharded = next(p for p in model.parameters() if isinstance(p, DTensor) and p.placements[0].is_shard())
    calls = {"full_tensor": sharded.full_tensor,
             "redistribute": lambda: sharded.redistribute(sharded.device_mesh, [Replicate()]).to_local()}
    if isinstance(model, FSDPModule):
        calls["forward"] = lambda: model(torch.zeros(1, 4, dtype=torch.long))
    stopped = []
    for name, call in calls.items():
        try:
            with forbid_gathers():
                call()
        except GatherForbidden:
            stopped.append(name)
    return stopped


def train_start(mesh) -> dict[str, str | None]:
    """`audit_at_train_start` on FSDP2-sharded models: per variant, the exception it raised on this rank (None: the
    run proceeds)."""
    from initaudit.config import Options
    from initaudit.integrations.train_start import audit_at_train_start

    raised = {}
    for variant in ("clean", "zero"):
        try:
            with forbid_gathers():
                audit_at_train_start(shard_fsdp(build(variant), mesh), config=Options())
            raised[variant] = None
        except Exception as exc:  # noqa: BLE001 - the test reads which
            raised[variant] = type(exc).__name__
    return raised


def save_dcp(model: nn.Module, folder) -> None:
    """The sharded model saved with torch.distributed.checkpoint from every rank: each rank writes its own shards
    (FSDP2's uneven rows as they lie)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder))


def worker(rank: int, world: int, port: int, out: str, jobs: list[tuple[str, str]]) -> None:
    """One rank: for each (variant, sharding) build, shard and audit the model under `forbid_gathers`; rank 0
    writes `<variant>-<sharding>.json`; every rank writes what `forbid_gathers` stopped (`caught-<rank>.json`) and
    what the train-start audit raised (`train-start-<rank>.json`); all save the `zero` model FSDP2-sharded as a
DCP folder (`dcp-fsdp`)."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from initaudit.config import Options
    from initaudit.distributed.live import audit_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        caught = None
        for variant, sharding in jobs:
            model = SHARDINGS[sharding](build(variant), mesh)
            if sharding == "fsdp" and caught is None:
                caught = caught_gathers(shard_fsdp(build(variant), mesh))
                held = {k: list(v.to_local().shape) for k, v in model.state_dict().items()}
                Path(out, f"held-{rank}.json").write_text(json.dumps(held))
            with forbid_gathers():
                report = audit_sharded(model, Options())
            if rank == 0:
                Path(out, f"{variant}-{sharding}.json").write_text(json.dumps(report.to_dict(), indent=2))
            elif report is not None:
                raise AssertionError(f"rank {rank} returned a report")
        Path(out, f"caught-{rank}.json").write_text(json.dumps(caught))
        Path(out, f"train-start-{rank}.json").write_text(json.dumps(train_start(mesh)))
        save_dcp(shard_fsdp(build("zero"), mesh), Path(out, "dcp-fsdp"))
        dist.barrier()  # gloo aborts a process that tears the group down while a peer's collective is in flight
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, out: str, jobs: list[tuple[str, str]], timeout: float = 600) -> None:
    """`worker` on `world` CPU processes (gloo on 127.0.0.1), joined within `timeout` seconds."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(world, free_port(), out, jobs), nprocs=world, join=False,
                                 start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world} ranks did not finish in {timeout:.0f} s")
