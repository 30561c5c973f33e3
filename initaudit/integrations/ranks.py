"""One verdict for every rank of a torch.distributed run: each rank's outcome is gathered by all of them
(`all_gather_object`), and the verdict is a pure function of that list, so every rank raises the same exception
or none does, and no rank is left waiting at its next collective."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from initaudit.common.printable import printable
from initaudit.integrations.errors import InitAuditError, InitAuditFailed, NotMaterialized
from initaudit.judge.report import Finding
from initaudit.reporters import message

CAUSES = {"NotMaterialized": NotMaterialized, "InitAuditError": InitAuditError}


@dataclass
class Outcome:
    """What one rank found: its findings at or above fail_on, or why it could not audit (one line)."""

    rank: int = 0
    failing: list[Finding] = field(default_factory=list)
    problem: str | None = None
    cause: str = "InitAuditError"  # the exception class every rank raises for `problem`


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group=None) -> int:
    return torch.distributed.get_rank(group) if distributed() else 0


def gather(outcome: Outcome, group=None) -> list[Outcome]:
    """Every rank's outcome, in rank order, on every rank (just this one outside a distributed run)."""
    if not distributed():
        return [outcome]
    everyone: list[Outcome | None] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, outcome, group=group)
    return [o for o in everyone if o is not None]


def verdict(outcomes: list[Outcome], fail_on: str) -> InitAuditError | None:
    """The exception every rank raises (the same on each, from the same list), or None to let training go on."""
    several = len(outcomes) > 1
    problems = [o for o in outcomes if o.problem is not None]
    if problems:
        first = problems[0]
        where = f"rank {first.rank}: " if several else ""
        return CAUSES.get(first.cause, InitAuditError)(f"{where}{first.problem}")
    failing = failing_on_ranks(outcomes)
    if not failing:
        return None
    lines = [f"  {finding_line(f)}{ranks_note(ranks, len(outcomes))}" for f, ranks in failing]
    head = (f"initaudit stopped the run: the model is not well initialized, {len(failing)} finding(s) at or above "
            f"fail_on={fail_on!r}")
    return InitAuditFailed("\n".join([head, *lines]), [f for f, _ in failing], fail_on)


def failing_on_ranks(outcomes: list[Outcome]) -> list[tuple[Finding, list[int]]]:
    """The failing findings of every rank, each once (replicas find the same), with the ranks that found it."""
    seen: dict[tuple[str, str, str], tuple[Finding, list[int]]] = {}
    for outcome in outcomes:
        for f in outcome.failing:
            seen.setdefault((f.rule, f.tensor, f.severity), (f, []))[1].append(outcome.rank)
    return list(seen.values())


def finding_line(f: Finding) -> str:
    """'net.2: IA101 zero-weights error: all 64 weights are 0' (the concise report's line)."""
    return f"{printable(f.layer)}: {f.code} {f.rule} {f.severity}: {message(f)}"


def ranks_note(ranks: list[int], world: int) -> str:
    return "" if len(ranks) == world else f" (rank {', '.join(map(str, ranks))})"
