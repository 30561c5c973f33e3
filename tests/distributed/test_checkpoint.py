"""A checkpoint fanned out: work units listed from headers and metadata, measured from their byte ranges alone by
1, 2 or 4 workers (in process, under torchrun, as Ray tasks), give the single-process report byte for byte."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.fanout import fanned_out, report_json
from initaudit.config import Options
from initaudit.distributed import checkpoint
from initaudit.load import plan
from initaudit.load.dispatch import load
from initaudit.measure import stats
from initaudit.pipeline import run

ROOT = Path(__file__).resolve().parents[2]


def planted_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small transformer-shaped state: an embedding, blocks of linears (one with a dead unit, one at Xavier
    feeding nothing known), norms, an int buffer, a head copied from the embedding (a tie saved by value)."""
    g = torch.Generator().manual_seed(seed)
    state = {"wte.weight": torch.randn(3000, 96, generator=g), "pos.ids": torch.arange(64)}
    for b in range(3):
        p = f"h.{b}."
        state[p + "fc1.weight"] = torch.randn(384, 96, generator=g) * 0.02
        state[p + "fc1.bias"] = torch.zeros(384)
        state[p + "fc2.weight"] = torch.randn(96, 384, generator=g) * 0.02
        state[p + "fc2.bias"] = torch.zeros(96)
        state[p + "ln.weight"] = torch.ones(96)
    state["h.1.fc1.weight"][7] = 0
    state["h.2.fc2.weight"][:, 5] = state["h.2.fc2.weight"][:, 9]  # copied inputs: no iid draw
    state["head.weight"] = state["wte.weight"].clone()
    return state


def sharded_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """`state` as a Hugging Face folder of two safetensors shards and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    names = {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for name in set(names.values()):
        save_file({k: state[k].contiguous() for k in keys if names[k] == name}, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    return folder


def dcp_checkpoint(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    state = planted_state()
    return {"safetensors": sharded_safetensors(root / "sharded", state), "dcp": dcp_checkpoint(root / "dcp", state)}


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_one_two_and_four_workers_give_the_single_process_report_byte_for_byte(checkpoints, fmt):
    single = report_json(run(load(checkpoints[fmt]), Options()))
    rules = {f["rule"] for f in json.loads(single)["findings"]}
    assert "dead-units" in rules  # the planted fault is there to be kept
    for workers in (1, 2, 4):
        got, read = fanned_out(checkpoints[fmt], workers)
        assert got == single, workers
        assert all(read) and max(read) <= 1.5 * sum(read) / workers, read


def test_a_remote_sharded_folder_is_fanned_out_by_byte_ranges(checkpoints):
    """The same shards served over HTTP (127.0.0.1, Range requests): two workers each fetch only their units' byte
    ranges, about half the tensor bytes, and give the local folder's report."""
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    from helpers.range_server import RangeServer

    server = RangeServer(checkpoints["safetensors"])
    try:
        url = f"{server.url}/model.safetensors.index.json"
        local = report_json(run(load(checkpoints["safetensors"]), Options()))
        before = len(server.gets())
        got, read = fanned_out(url, 2)
        ranged = server.gets()[before:]
    finally:
        server.close()
    got, local = json.loads(got), json.loads(local)
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in local.items() if k != "model"}
    assert all(0.3 * sum(read) <= r <= 0.7 * sum(read) for r in read), read
    shard_gets = [r for r in ranged if r[1].endswith(".safetensors")]
    assert shard_gets and all(r[2] for r in shard_gets), shard_gets  # every shard read asked for a byte range


def test_a_retried_unit_is_counted_once(checkpoints):
    single = report_json(run(load(checkpoints["safetensors"]), Options()))
    assert fanned_out(checkpoints["safetensors"], 2, retry=True)[0] == single


def test_units_come_from_the_headers_and_tile_each_tensor_on_chunk_boundaries(checkpoints, monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 96 * 50)  # chunks of 50 rows
    loaded = load(checkpoints["safetensors"])
    units = plan.plan(loaded, list(loaded.tensors.shapes), stats.chunk_rows, 100_000)
    wte = [u for u in units if u.key == "wte.weight"]
    assert len(wte) > 2 and wte[0].offset == (0, 0)
    step = stats.chunk_rows(96)
    assert step == 50 and all(u.size[0] % step == 0 for u in wte[:-1])
    for a, b in zip(wte, wte[1:]):
        assert b.offset[0] == a.offset[0] + a.size[0] and b.start == a.end and b.offset[0] % step == 0
    assert sum(u.nbytes for u in wte) == 3000 * 96 * 4
    whole = planted_state()["wte.weight"]
    for u in wte:  # each unit's bytes are its rows, read alone
        assert torch.equal(plan.read_unit(u), whole[u.rows[0]:u.rows[1]])


def test_many_small_units_still_give_the_single_process_report(checkpoints, monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 96 * 50)
    monkeypatch.setattr(plan, "UNIT_BYTES", 50_000)
    single = report_json(run(load(checkpoints["safetensors"]), Options()))
    loaded = load(checkpoints["safetensors"])
    assert len(checkpoint.tasks(loaded, Options())[0]) > 3 * len(loaded.tensors.shapes)
    assert fanned_out(checkpoints["safetensors"], 4)[0] == single


def test_dcp_units_are_the_stored_records(checkpoints):
    loaded = load(checkpoints["dcp"])
    units = plan.plan(loaded, list(loaded.tensors.shapes), stats.chunk_rows)
    assert {u.key for u in units} == set(loaded.tensors.shapes) and all(u.encoding == "torch-save" for u in units)
    wte = next(u for u in units if u.key == "wte.weight")
    assert torch.equal(plan.read_unit(wte), planted_state()["wte.weight"])


def test_non_float_tensors_are_not_audited_in_either_path(checkpoints):
    single = run(load(checkpoints["safetensors"]), Options()).to_dict()["coverage"]
    fanned = json.loads(fanned_out(checkpoints["safetensors"], 2)[0])["coverage"]
    assert fanned == single and any("pos.ids" in json.dumps(x) for x in single["not_audited"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), "-m", "initaudit", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
def test_torchrun_two_ranks_write_the_single_process_report_each_reading_half(checkpoints, fmt, cli):
    single = cli("check", checkpoints[fmt], "--format", "json")
    done = torchrun(2, "--debug", "check", "--distributed", str(checkpoints[fmt]), "--format", "json")
    assert done.returncode == single.exit_code, done.stderr
    assert done.stdout == single.stdout  # rank 0 alone wrote it
    read = {int(line.split()[1]): int(line.split()[5]) for line in done.stderr.splitlines()
            if line.startswith("rank ") and " read " in line}
    assert sorted(read) == [0, 1]
    total = sum(read.values())
    assert all(0.3 * total <= r <= 0.7 * total for r in read.values()), read


def test_the_cli_joins_no_process_group_because_rank_is_set(checkpoints, cli):
    """RANK and WORLD_SIZE in the environment (a training job's) change nothing without --distributed."""
    alone = cli("check", checkpoints["safetensors"], "--format", "json")
    with_rank = cli("check", checkpoints["safetensors"], "--format", "json",
                    env={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert (with_rank.exit_code, with_rank.stdout) == (alone.exit_code, alone.stdout)


def test_distributed_check_alone_is_the_plain_check(checkpoints, cli):
    plain = cli("check", checkpoints["dcp"], "--format", "json")
    fanned = cli("check", "--distributed", checkpoints["dcp"], "--format", "json")
    assert (fanned.exit_code, fanned.stdout) == (plain.exit_code, plain.stdout)


def test_distributed_refuses_a_format_whose_bytes_are_not_laid_out_by_tensor(tmp_path, cli):
    torch.save(planted_state(), tmp_path / "model.pt")
    done = cli("check", "--distributed", tmp_path / "model.pt")
    assert done.exit_code == 2 and "--distributed reads safetensors" in done.stderr


@pytest.mark.slow
def test_ray_tasks_give_the_single_process_report(checkpoints):
    ray = pytest.importorskip("ray")
    from initaudit.distributed import ray_tasks

    single = report_json(run(load(checkpoints["safetensors"]), Options()))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert report_json(ray_tasks.report(load(checkpoints["safetensors"]), Options())) == single
    finally:
        ray.shutdown()
