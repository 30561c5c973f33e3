"""A 2-process torch.distributed run (gloo on 127.0.0.1): the train-start verdict is the same on every rank, so a
bad model stops both ranks, a model bad on one rank only stops both too, an unmaterialized model on one rank is
refused on both, and no rank waits forever at its next collective; only rank 0 logs and writes the report."""

from __future__ import annotations

import json
import multiprocessing
import socket

import pytest

from helpers.train_start_ranks import SCENARIOS, run_rank

TIMEOUT = 180  # seconds for both ranks to start, run every scenario and leave: a hang fails the test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], list[dict], object]:
    out = tmp_path_factory.mktemp("ranks")
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [spawn.Process(target=run_rank, args=(rank, port, str(out))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} did not finish within {TIMEOUT} s: a rank waits at a collective"
    assert [p.exitcode for p in procs] == [0, 0]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    return {s["scenario"]: s for s in rank0}, {s["scenario"]: s for s in rank1}, out


def test_every_scenario_ends_with_both_ranks_at_the_next_collective(ranks):
    rank0, rank1, _ = ranks
    assert list(rank0) == list(rank1) == list(SCENARIOS)
    assert {s["after"] for s in [*rank0.values(), *rank1.values()]} == {2.0}


def test_a_bad_model_stops_both_ranks_with_the_finding(ranks):
    rank0, rank1, _ = ranks
    for outcome in (rank0["both-bad"], rank1["both-bad"]):
        assert outcome["raised"] == "InitAuditFailed" and outcome["findings"] == [["zero-weights", "2"]]
    assert rank0["both-bad"]["message"] == rank1["both-bad"]["message"]
    assert "(rank" not in rank0["both-bad"]["message"]  # both found it


def test_weights_bad_on_one_rank_stop_both_ranks_naming_it(ranks):
    rank0, rank1, _ = ranks
    for outcome in (rank0["rank-1-bad"], rank1["rank-1-bad"]):
        assert outcome["raised"] == "InitAuditFailed" and outcome["findings"] == [["zero-weights", "2"]]
        assert "zero-weights" in outcome["message"] and "(rank 1)" in outcome["message"]
    assert rank0["rank-1-bad"]["message"] == rank1["rank-1-bad"]["message"]
    logged = rank0["rank-1-bad"]["records"]  # rank 0 logs what only rank 1 found
    assert any(line.startswith("initaudit: rank 1: 2: IA101 zero-weights error") for line in logged)
    assert rank1["rank-1-bad"]["records"] == []


def test_an_unmaterialized_model_on_one_rank_is_refused_on_both(ranks):
    rank0, rank1, _ = ranks
    for outcome in (rank0["rank-1-meta"], rank1["rank-1-meta"]):
        assert outcome["raised"] == "NotMaterialized"
        assert outcome["message"].startswith("rank 1: ") and "meta device" in outcome["message"]
        assert "\n" not in outcome["message"]


def test_fsdp1_shards_are_refused_on_both_ranks(ranks):
    rank0, rank1, _ = ranks
    for outcome in (rank0["fsdp1-sharded"], rank1["fsdp1-sharded"]):
        assert outcome["raised"] == "NotMaterialized" and "FSDP1 shards" in outcome["message"]


def test_a_clean_model_lets_both_ranks_train_and_only_rank_0_logs_and_writes(ranks):
    rank0, rank1, out = ranks
    assert rank0["clean"]["raised"] is None and rank1["clean"]["raised"] is None
    assert rank0["clean"]["records"] and rank1["clean"]["records"] == []
    assert sorted(p.name for p in (out / "clean").iterdir()) == ["initaudit.json"]
