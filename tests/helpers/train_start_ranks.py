"""One rank of the 2-process train-start test: a gloo group on 127.0.0.1, scenarios run in turn, each rank's
outcome (exception class and message, findings, log records) written as JSON for the test to compare."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from helpers.tiny_training import mlp

SCENARIOS = ("both-bad", "rank-1-bad", "rank-1-meta", "fsdp1-sharded", "clean")


def model_for(scenario: str, rank: int) -> torch.nn.Module:
    if scenario == "rank-1-meta" and rank == 1:
        with torch.device("meta"):
            return mlp()
    if scenario == "fsdp1-sharded":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(mlp(), device_id=torch.device("cpu"), use_orig_params=True)
    return mlp(zero_layer=scenario == "both-bad" or (scenario == "rank-1-bad" and rank == 1))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def outcome(scenario: str, rank: int, out: Path) -> dict:
    from initaudit.integrations.train_start import audit_at_train_start

    records = Records()
    logging.getLogger("initaudit").addHandler(records)
    logging.getLogger("initaudit").setLevel(logging.INFO)
    try:
        audit_at_train_start(model_for(scenario, rank), output_dir=out / scenario)
        raised = None
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        raised = exc
    finally:
        logging.getLogger("initaudit").removeHandler(records)
    step = torch.ones(1)
    torch.distributed.all_reduce(step)  # the next collective: both ranks reach it
    return {"scenario": scenario, "raised": type(raised).__name__ if raised else None,
            "message": str(raised) if raised else None, "records": records.messages, "after": step.item(),
            "findings": [[f.rule, f.layer] for f in getattr(raised, "findings", [])]}


def run_rank(rank: int, port: int, out: str) -> None:
    """The target of each spawned process."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = [outcome(scenario, rank, Path(out)) for scenario in SCENARIOS]
        torch.distributed.barrier()  # gloo aborts a process that tears the group down mid-collective of a peer
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
