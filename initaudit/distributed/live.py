"""A live model sharded across the ranks of a `torch.distributed` job, audited where it lives: every rank measures
its local shards only (FSDP2, tensor-parallel DTensors; a DDP replica's tensors on the first rank), the partial
summaries (measure/summary.py) travel to rank 0 over the process group and are merged there, exactly and in any
order, and rank 0 reports what one process reports on the gathered model. No rank gathers a parameter: tensors
that may hold equal values (ties, identical layers) are compared through digests of their shards (digest.py)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

import torch
import torch.distributed as dist

from initaudit.common.errors import InputError
from initaudit.config import Options
from initaudit.distributed.digest import Digest, block_digest
from initaudit.distributed.shards import LocalShard, local_shards, unwrap
from initaudit.distributed.twin import meta_twin, twin_loaded
from initaudit.judge.report import Report
from initaudit.load.source import Loaded
from initaudit.measure import stats, summary
from initaudit.measure.tensors import summary_targets
from initaudit.pipeline import analyse, build_graph

Plan = dict[str, tuple[bool, int]]  # tensor -> (units, unit_axis) as summary.summarize takes them


def carried(exc: Exception, rank: int) -> Exception:
    """An error as it travels to the other ranks: an input error stays one (its one line), anything else names
    the rank it happened on."""
    if isinstance(exc, InputError):
        return InputError(str(exc))
    return RuntimeError(f"rank {rank}: {type(exc).__name__}: {exc}")


def exchange(payload: Callable[[], Any], combine: Callable[[list], tuple[Any, Any]],
             group: dist.ProcessGroup | None) -> tuple[Any, Any]:
    """Every rank's `payload()` gathered on rank 0, which `combine`s them into (what every rank is told, what rank 0
    keeps): both on rank 0, (told, None) elsewhere. An error on any rank is raised on every rank alike, so none is
    left waiting at a collective."""
    rank = dist.get_rank(group)
    try:
        mine: tuple = ("ok", payload())
    except Exception as exc:  # noqa: BLE001 - carried to rank 0, raised everywhere below
        mine = ("error", carried(exc, rank))
    gathered: list | None = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(mine, gathered, group=group, group_dst=0)
    answer: list[tuple] = [("ok", None)]
    kept = None
    if rank == 0:
        answer[0] = next((item for item in gathered if item[0] == "error"), ("ok", None))
        if answer[0][0] == "ok":
            try:
                told, kept = combine([value for _, value in gathered])
                answer[0] = ("ok", told)
            except Exception as exc:  # noqa: BLE001
                answer[0] = ("error", carried(exc, rank))
    dist.broadcast_object_list(answer, group=group, group_src=0)
    status, told = answer[0]
    if status == "error":
        raise told
    return told, kept


def shard_summaries(shards: list[LocalShard], plan: Plan) -> dict[str, summary.Summary | str]:
    """This rank's summary of each of its blocks the plan measures (or why the tensor is not measured), read on the
    CPU (a GPU shard is copied there one at a time: summaries travel as CPU objects)."""
    out: dict[str, summary.Summary | str] = {}
    for s in shards:
        if s.key in plan:
            units, unit_axis = plan[s.key]
            values, reason = stats.auditable(s.block.cpu())
            out[s.key] = reason if values is None else \
                summary.summarize(values, s.key, s.shape, s.offset, units=units, unit_axis=unit_axis)
    return out


def finished(parts: list[dict[str, summary.Summary | str]]) -> dict[str, summary.Finished | str]:
    """Each tensor's summaries merged (in any order) and finished, or why it is not measured."""
    by_key: dict[str, list] = {}
    for rank_parts in parts:
        for key, part in rank_parts.items():
            by_key.setdefault(key, []).append(part)
    return {key: group[0] if isinstance(group[0], str) else summary.finish(summary.merge(group))
            for key, group in by_key.items()}


def lookalikes(done: dict[str, summary.Finished | str]) -> set[str]:
    """The tensors that may hold the same values as another: the same shape and the same exact extremes, the only
    ones a comparison reads (as in one process)."""
    sign = {key: (f.samples.shape, f.stats.min, f.stats.max) for key, f in done.items() if not isinstance(f, str)}
    seen = Counter(sign.values())
    return {key for key, s in sign.items() if seen[s] > 1}


def shard_digests(shards: list[LocalShard], keys: set[str]) -> dict[str, Digest]:
    """This rank's part of the value digest of each tensor in `keys`."""
    return {s.key: block_digest(s.block.cpu(), s.shape, s.offset) for s in shards if s.key in keys}


def with_value_digests(done: dict[str, summary.Finished | str], parts: list[dict[str, Digest]]) -> None:
    """Each compared tensor's digest made its values' (summed over the ranks' parts: equal values, equal digest,
    however each tensor is split); one with NaN has none (it equals nothing)."""
    totals: dict[str, Digest] = {}
    for rank_parts in parts:
        for key, digest in rank_parts.items():
            totals[key] = totals.get(key, Digest()) + digest
    for key, total in totals.items():
        value = None if total.nan else f"{done[key].samples.dtype}:{total.total:016x}"
        done[key] = dataclasses.replace(done[key], digest=value)


def with_shared(done: dict[str, summary.Finished | str], shared: dict[str, str]) -> dict[str, summary.Finished | str]:
    """A name of a tensor an earlier name holds reads what that name's summaries finished into (the same object:
    the pass measures it once, as one process does a tied tensor)."""
    return {**done, **{key: done[first] for key, first in shared.items() if first in done}}


def plan_of(module: torch.nn.Module, options: Options, shared: dict[str, str], keep: dict[str, Loaded]) -> Plan:
    """Rank 0's reading of the model's structure (kept in `keep`) and the tensors it measures, each once."""
    keep["loaded"] = loaded = twin_loaded(meta_twin(module))
    return {k: how for k, how in summary_targets(build_graph(loaded, options)).items() if k not in shared}


def finished_and_alike(parts: list[dict[str, summary.Summary | str]]) -> tuple[set[str], dict]:
    """(the tensors to compare by their values' digests, every tensor's finished summary)."""
    done = finished(parts)
    return lookalikes(done), done


def audit_sharded(module: torch.nn.Module, options: Options | None = None,
                  group: dist.ProcessGroup | None = None) -> Report | None:
    """Audit a model sharded across the ranks of `group` (the default group if None): call it on every rank.
    Rank 0 gets the report a single process gives on the gathered model; every other rank gets None."""
    options = options or Options()
    module = unwrap(module)
    shards, shared = local_shards(module, group)
    keep: dict[str, Loaded] = {}
    plan, _ = exchange(lambda: None, lambda _: (plan_of(module, options, shared, keep), None), group)
    alike, done = exchange(lambda: shard_summaries(shards, plan), finished_and_alike, group)
    _, digests = exchange(lambda: shard_digests(shards, alike), lambda parts: (None, parts), group)
    if dist.get_rank(group) != 0:
        return None
    with_value_digests(done, digests)
    return analyse(keep["loaded"], options, measured_from=with_shared(done, shared)).report
