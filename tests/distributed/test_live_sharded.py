"""A model sharded across 2 and 4 CPU processes (gloo) is audited where it lives (`audit_sharded`): rank 0's JSON
report is the single process's on the unsharded model (byte for byte where whole rows are sharded; where columns
are, the figures float32 sums split across shards move in their last digits: see REASSOCIATED), whether FSDP2 shards it (unevenly: a vocab of 37, and two rows
a rank of four holds none of), tensor parallelism splits it by rows and columns, or DDP replicates it; no rank
gathers a parameter; a tie sharding left as two tensors is found, and so are a zero layer and a copied layer."""

from __future__ import annotations

import json
import math

import pytest

import initaudit
from helpers.fanout import fanned_out, report_json
from helpers.sharded import build, run_ranks
from initaudit.config import Options
from initaudit.load.dispatch import load
from initaudit.pipeline import run

JOBS = [("clean", "fsdp"), ("untied", "fsdp"), ("zero", "fsdp"), ("copy", "fsdp"), ("clean", "fsdp_apart"),
        ("clean", "tp"), ("untied", "tp"), ("clean", "ddp")]
# FSDP2 wrapping the tied head and the embedding apart makes them two tensors of equal values: the model the single
# process is compared with is then the one whose head is a copy of the embedding.
UNSHARDED = {("clean", "fsdp_apart"): "untied"}


# Row shards (FSDP2's, uneven or empty; DDP's whole replicas) give the single process's report byte for byte: the
# rows of a chunk of the measuring pass that two shards split are measured as one chunk once merged
# (measure/summary.py). Tensor-parallel column splits cut every chunk: its float32 sums are then added in another
# order, and the figures made from them (a std, the depth model's gains and scales, a finding's measured std) agree to
# float32 reassociation, relative 1e-6; the fit's z-scores, rounded to 4 significant digits, may then round the other
# way (one unit in the 4th digit). Every other field is the same.
REASSOCIATED = {"std", "predicted_gain", "predicted_scale", "predicted_grad_scale", "actual", "expected"}
ROUNDED = {"std_z", "runner_up_std_z", "nearest_std_z"}
RELATIVE = 1e-6


def close(key: str, want: float, got: float) -> bool:
    """Equal, or within the tolerance above for the figures it names."""
    if key in REASSOCIATED:
        return math.isclose(want, got, rel_tol=RELATIVE)
    if key in ROUNDED and want and got:
        return abs(want - got) <= 1.01 * 10 ** (math.floor(math.log10(abs(want))) - 3)
    return want == got


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2-ranks", "4-ranks"])
def ranks(request, tmp_path_factory):
    """(world size, the folder rank 0 wrote each job's report to, and each rank what it held and was stopped at)."""
    out = tmp_path_factory.mktemp(f"ranks{request.param}")
    run_ranks(request.param, str(out), JOBS)
    return request.param, out


def single_process(variant: str) -> str:
    return json.dumps(initaudit.audit(build(variant)).to_dict(), indent=2)


def differences(want, got, path: str = "") -> list[str]:
    """Where two JSON values differ (keys in order; figures as `close` has it)."""
    if isinstance(want, dict) and isinstance(got, dict):
        if list(want) != list(got):
            return [f"{path}: keys {list(want)} != {list(got)}"]
        return [d for key in want for d in differences(want[key], got[key], f"{path}.{key}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(want)} items != {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        return [] if close(path.rsplit(".", 1)[-1], want, got) else [f"{path}: {want!r} != {got!r}"]
    return [] if type(want) is type(got) and want == got else [f"{path}: {want!r} != {got!r}"]


@pytest.mark.parametrize("variant, sharding", JOBS)
def test_rank0_report_is_the_single_process_report(ranks, variant, sharding):
    world, out = ranks
    got = (out / f"{variant}-{sharding}.json").read_text()
    want = single_process(UNSHARDED.get((variant, sharding), variant))
    if sharding != "tp":
        assert got == want
    assert differences(json.loads(want), json.loads(got)) == []


def test_a_dcp_checkpoint_saved_from_uneven_shards_fans_out_to_the_single_process_report(ranks):
    """The FSDP2 ranks' DCP save holds each rank's uneven rows as one record: fanned out over 1, 2 and 4 workers
    (units cut where the ranks' shards were, inside chunks), the report is the one-process report of the folder byte
    for byte, and it keeps the planted zero layer."""
    world, out = ranks
    single = report_json(run(load(out / "dcp-fsdp"), Options()))
    assert ("zero-weights", "error", "blocks.1.fc1.weight") in findings(out, "zero-fsdp")
    assert '"rule": "zero-weights"' in single
    for workers in (1, 2, 4):
        assert fanned_out(out / "dcp-fsdp", workers)[0] == single, workers


def test_no_rank_gathers_a_parameter(ranks):
    """Every audit ran where a full tensor, a redistribution to a replica and FSDP2's unshard raise; that they do
    raise there is checked on each rank."""
    world, out = ranks
    for rank in range(world):
        assert json.loads((out / f"caught-{rank}.json").read_text()) == ["full_tensor", "redistribute", "forward"]


def test_shards_are_uneven_and_a_rank_may_hold_none(ranks):
    """The equal reports above came from uneven shards (FSDP2 pads them), with empty ones on four ranks."""
    world, out = ranks
    held = [json.loads((out / f"held-{rank}.json").read_text()) for rank in range(world)]
    assert [h["embed.weight"][0] for h in held] == ([19, 18] if world == 2 else [10, 10, 10, 7])
    assert [h["segment.weight"][0] for h in held] == ([1, 1] if world == 2 else [1, 1, 0, 0])


def findings(out, job: str) -> set[tuple[str, str, str]]:
    report = json.loads((out / f"{job}.json").read_text())
    return {(f["rule"], f["severity"], f["tensor"]) for f in report["findings"]}


@pytest.mark.parametrize("job", ["clean-fsdp_apart", "untied-fsdp", "untied-tp"])
def test_a_tie_sharding_left_as_two_tensors_is_found(ranks, job):
    """FSDP2 split the tie (the head and the embedding wrapped apart), or the head was a copy of the embedding before
    sharding: values equal, two tensors; where the tie stayed one tensor, the report is clean of it."""
    world, out = ranks
    assert ("tied-weights-diverged", "warning", "head.weight") in findings(out, job)
    for kept in ("clean-fsdp", "clean-tp"):
        assert not {f for f in findings(out, kept) if f[0] == "tied-weights-diverged"}


def test_a_zero_layer_is_found(ranks):
    world, out = ranks
    assert ("zero-weights", "error", "blocks.1.fc1.weight") in findings(out, "zero-fsdp")
    assert not {f for f in findings(out, "clean-fsdp") if f[0] == "zero-weights"}


def test_a_layer_copied_from_another_is_found(ranks):
    """Two shards' digests of the values add up alike only where the layers hold the same values."""
    world, out = ranks
    assert ("identical-layers", "error", "blocks.2.fc1.weight") in findings(out, "copy-fsdp")
    assert not {f for f in findings(out, "clean-fsdp") if f[0] == "identical-layers"}


def test_train_start_stops_a_sharded_run_on_every_rank(ranks):
    """`audit_at_train_start` on an FSDP2 model audits it in place: a zero layer stops the run on every rank (the
    verdict agreed over the group), a clean model's run proceeds."""
    world, out = ranks
    for rank in range(world):
        assert json.loads((out / f"train-start-{rank}.json").read_text()) == {"clean": None, "zero": "InitAuditFailed"}
