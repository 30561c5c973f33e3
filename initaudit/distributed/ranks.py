"""`initaudit check --distributed` under torchrun: every rank lists the same work units, measures its share
(reading only those byte ranges), the summaries are gathered over a gloo process group, and rank 0 builds the
report; every rank ends with rank 0's exit code. A process group is started only on that explicit flag (never
because RANK happens to be set), and without torchrun's variables the run is one worker."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from initaudit.config import Options
from initaudit.common.errors import InputError
from initaudit.distributed import checkpoint
from initaudit.judge.report import Report
from initaudit.load.source import Loaded
from initaudit.measure.summary import Finished
from initaudit.pipeline import analyse

log = logging.getLogger(__name__)


@dataclass
class Group:
    """This process's place among the workers (world 1: no process group)."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextmanager
def joined() -> Iterator[Group]:
    """The gloo process group torchrun's environment describes (its variables checked), or a world of one."""
    if "WORLD_SIZE" not in os.environ:
        yield Group()
        return
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise InputError("--distributed: RANK and WORLD_SIZE must be set as torchrun sets them") from None
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield Group(rank, world)
        dist.barrier()  # no rank tears the group down while another's last collective is in flight
    finally:
        dist.destroy_process_group()


def measured(loaded: Loaded, options: Options, group: Group) -> dict[str, Finished | str] | None:
    """This rank's share of the checkpoint measured and gathered: the finished summaries on rank 0, None elsewhere.
    A unit that cannot be read stops every rank with the same error."""
    work, skipped = checkpoint.tasks(loaded, options)
    mine = checkpoint.assign(work, group.world)[group.rank]
    try:
        outcome: tuple = ([checkpoint.measure_unit(t) for t in mine], checkpoint.bytes_read(mine), None)
    except InputError as exc:
        outcome = ([], 0, str(exc))
    gathered = group.gather(outcome)
    errors = [e for _, _, e in gathered if e]
    if errors:
        raise InputError(errors[0])
    for rank, (_, read, _) in enumerate(gathered):
        log.info("rank %d of %d read %d bytes", rank, group.world, read)
    if not group.leader:
        return None
    return checkpoint.finished([s for summaries, _, _ in gathered for s in summaries], skipped)


def on_ranks(check: Callable[[Callable[[Loaded, Options], Report], bool], int]) -> int:
    """Run `check(report_of, leader)` on every rank of torchrun's group (or alone): ranks other than 0 print nothing;
    every rank returns rank 0's exit code."""
    with joined() as group:
        if not group.leader:
            _silenced()
        elif logging.root.manager.disable < logging.INFO and not log.handlers:  # --debug: each rank's bytes read
            log.addHandler(logging.StreamHandler())
            log.setLevel(logging.INFO)
        gathered = [False]

        def report_of(loaded: Loaded, options: Options) -> Report:
            found = measured(loaded, options, group)
            gathered[0] = True
            if found is None:
                return Report(model=loaded.name, format=loaded.format)
            return analyse(loaded, options, measured_from=found).report
        try:
            code = check(report_of, group.leader)
        except BaseException:
            if group.leader and gathered[0]:  # the others wait for the code past the gather
                group.share(2)
            raise
        return group.share(code)


def _silenced() -> None:
    """This process's stdout and stderr (Python's and the C++ libraries') sent nowhere."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
