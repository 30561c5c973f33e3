"""Remote checkpoints through fsspec, against a local HTTP server with range requests on 127.0.0.1
and fsspec's memory file system: byte ranges only (header first), the same verdicts as the local
file, one clear line when fsspec, a protocol's package or the credentials are missing."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import initaudit
from click.testing import CliRunner
from helpers.range_server import RangeServer
from initaudit.cli.main import main
from initaudit.common.errors import InputError

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

RNG = torch.Generator().manual_seed(14)


def mlp(zeroed: int | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(4):
        state[f"net.{i}.weight"] = torch.randn(64, 64, generator=RNG) * (2 / 64) ** 0.5
        state[f"net.{i}.bias"] = torch.zeros(64)
    if zeroed is not None:
        state[f"net.{zeroed}.weight"].zero_()
    return state


@pytest.fixture
def served(tmp_path):
    servers = []

    def start(**kw) -> RangeServer:
        servers.append(RangeServer(tmp_path, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_http_safetensors_is_read_by_ranges_header_first(tmp_path, served):
    save_file(mlp(zeroed=2), tmp_path / "m.safetensors")
    server = served()
    remote = initaudit.audit(f"{server.url}/m.safetensors")
    local = initaudit.audit(tmp_path / "m.safetensors")
    assert remote.model == f"{server.url}/m.safetensors" and remote.format == "safetensors"
    assert [(r.name, r.std) for r in remote.layers] == [(r.name, r.std) for r in local.layers]
    assert remote.by_rule() == local.by_rule() and ("zero-weights", "net.2") in remote.by_rule()
    gets = server.gets()
    assert all(rng is not None for _, _, rng in gets), "a request without a Range downloads the whole file"
    assert gets[0][2] == "bytes=0-7"  # the header's length first, then the header, then tensors
    size = (tmp_path / "m.safetensors").stat().st_size
    served_bytes = sum(int(r.split("-")[1]) - int(r.removeprefix("bytes=").split("-")[0]) + 1 for *_, r in gets)
    assert served_bytes <= size


def test_http_sharded_index_reads_each_shard_by_ranges(tmp_path, served):
    state = mlp(zeroed=3)
    first = {k: v for k, v in state.items() if k.startswith(("net.0", "net.1"))}
    second = {k: v for k, v in state.items() if k not in first}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                            **{k: "model-00002-of-00002.safetensors" for k in second}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    server = served()
    for url in (f"{server.url}/model.safetensors.index.json", server.url):
        report = initaudit.audit(url)
        assert [r.name for r in report.layers] == ["net.0", "net.1", "net.2", "net.3"]
        assert ("zero-weights", "net.3") in report.by_rule()
    shards = {"/model-00001-of-00002.safetensors", "/model-00002-of-00002.safetensors"}
    assert {p for _, p, _ in server.gets()} - {"/config.json"} == {"/model.safetensors.index.json", *shards}
    assert all(rng is not None for _, p, rng in server.gets() if p in shards)


def test_an_index_pointing_outside_its_folder_is_refused(tmp_path, served):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../x.safetensors"}}))
    server = served()
    with pytest.raises(InputError, match="outside the index's folder"):
        initaudit.audit(f"{server.url}/model.safetensors.index.json")


def test_refused_access_is_one_line_naming_credentials(tmp_path, served):
    server = served(status=403)
    with pytest.raises(InputError) as err:
        initaudit.audit(f"{server.url}/m.safetensors")
    assert "credentials" in str(err.value) and "\n" not in str(err.value)


def test_memory_filesystem_and_fix_to_a_local_file(tmp_path):
    import fsspec

    from initaudit.repair import writers
    from initaudit.pipeline import analyse, make_options
    from initaudit.repair.fixer import repair
    from initaudit.load.dispatch import load

    data = tmp_path / "m.safetensors"
    save_file(mlp(zeroed=1), data, metadata={"format": "pt"})
    fsspec.filesystem("memory").pipe("/scale-test/m.safetensors", data.read_bytes())
    analysis = analyse(load("memory://scale-test/m.safetensors"), make_options())
    assert ("zero-weights", "net.1") in analysis.report.by_rule()
    result = repair(analysis, seed=0)
    out = tmp_path / "fixed.safetensors"
    writers.write(analysis.loaded, result.tensors, out)
    fixed, original = load_file(out), load_file(data)
    assert set(result.tensors) == {"net.1.weight"} and float(fixed["net.1.weight"].std()) > 0.05
    assert all(torch.equal(fixed[k], original[k]) for k in original if k != "net.1.weight")


def test_missing_fsspec_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(InputError, match=r"pip install 'initaudit\[remote\]'"):
        initaudit.audit("s3://bucket/model.safetensors")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_protocol_without_its_package_names_it():
    with pytest.raises(InputError, match="s3fs"):
        initaudit.audit("s3://bucket/model.safetensors")


def test_other_remote_formats_are_refused(tmp_path, served):
    torch.save(mlp(), tmp_path / "m.pt")
    server = served()
    with pytest.raises(InputError, match="other formats are read from local files"):
        initaudit.audit(f"{server.url}/m.pt")
    assert not server.gets()


def test_the_cli_checks_a_url_beside_a_local_file(tmp_path, served, cli):
    save_file(mlp(zeroed=2), tmp_path / "m.safetensors")
    server = served()
    local = tmp_path / "local"
    local.mkdir()
    save_file(mlp(), local / "ok.safetensors")
    result = cli("check", f"{server.url}/m.safetensors", local / "ok.safetensors", "--format", "json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert [f["model"] for f in data["files"]] == [f"{server.url}/m.safetensors", str(local / "ok.safetensors")]
    assert any(f["rule"] == "zero-weights" and f["layer"] == "net.2" for f in data["files"][0]["findings"])
    assert all(rng is not None for _, _, rng in server.gets())


# ---------------------------------------------------------------- bounded in time and size

def _timed_check(*args):
    start = time.monotonic()
    result = CliRunner().invoke(main, ["check", *map(str, args)])
    return result, time.monotonic() - start


def test_a_server_that_stalls_is_cut_off_by_the_remote_timeout(tmp_path, served):
    """One byte every 3 s: aiohttp's own 300 s per request would hang the run; --remote-timeout 0.5 ends it."""
    save_file(mlp(), tmp_path / "m.safetensors")
    server = served(pace=3)
    result, seconds = _timed_check(f"{server.url}/m.safetensors", "--remote-timeout", "0.5")
    assert result.exit_code == 2 and seconds < 15, (result.output, seconds)
    assert result.stderr == (f"initaudit: error: {server.url}/m.safetensors: no answer within the time allowed (0.5 s "
                             "for 8 bytes; --remote-timeout sets it)\n")


def test_a_server_trickling_within_the_timeout_is_cut_off_at_the_reads_deadline(tmp_path, served, monkeypatch):
    """A byte every 0.3 s never trips a 1 s wait between bytes; the read's own deadline (1 s + 8 bytes at
    64 kB/s) does."""
    from initaudit.load.bounded import REMOTE

    monkeypatch.setattr(REMOTE, "timeout", 1.0)
    save_file(mlp(), tmp_path / "m.safetensors")
    server = served(pace=0.3)
    start = time.monotonic()
    with pytest.raises(InputError, match=r"no answer within the time allowed \(1 s for 8 bytes"):
        initaudit.audit(f"{server.url}/m.safetensors")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("target", ["index", "safetensors"])
def test_an_endless_body_is_read_no_further_than_asked(target, tmp_path, served, monkeypatch):
    """A server that ignores Range and sends on and on: the index (a whole small file) is capped, a header range
    is refused as soon as the answer is not one; the server gets to send a few MB at most."""
    monkeypatch.setattr("initaudit.load.remote.MAX_JSON_BYTES", 1 << 20)
    start = struct.pack("<Q", 100) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    server = served(endless=b'{"weight_map": {"a": "m.safetensors"}, "pad": "' if target == "index" else start)
    url = f"{server.url}/model.safetensors.index.json" if target == "index" else f"{server.url}/m.safetensors"
    result, seconds = _timed_check(url)
    assert result.exit_code == 2, result.output
    expected = "larger than 1 MB, the most initaudit reads of a JSON file" if target == "index" else \
        "the server ignores byte ranges"
    assert expected in result.stderr and result.stderr.count("\n") == 1
    time.sleep(0.2)  # the server thread sees the hang-up
    assert server.sent < 16 << 20, server.sent


def _served_header(tmp_path: Path, header: bytes, data: bytes = b"") -> None:
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header, fragment", [
    (b"[" * 100_000 + b"]" * 100_000, "not a readable safetensors header (nested deeper than 32 levels)"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "not a readable safetensors header (nested deeper than 32 levels)"),
    (b"{}", "a safetensors file holding no tensors: nothing to audit"),
    (b'{"__metadata__": {"format": "pt"}}', "a safetensors file holding no tensors: nothing to audit"),
    (b'{"__metadata__": {"format": 5}}', "not a readable safetensors header (__metadata__ must map names to strings)"),
    (b'[1, 2]', "not a readable safetensors header (the header is a JSON list, not an object)"),
    (b'{"a": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}',
     "not a readable safetensors header (a: its data ends past the end of the file (4,000,0"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"1, " * 70 + b'1], "data_offsets": [0, 4]}}',
     "not a readable safetensors header (a: bad shape or offsets)"),
], ids=["arrays 100,000 deep", "objects 50,000 deep", "empty", "metadata alone", "metadata not strings", "a list",
        "past the end", "71 dimensions"])
def test_a_hostile_remote_header_is_one_line(header, fragment, tmp_path, served):
    _served_header(tmp_path, header, b"\0" * 4)
    server = served()
    result = CliRunner().invoke(main, ["check", f"{server.url}/m.safetensors"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"initaudit: error: {server.url}/m.safetensors: {fragment}")
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr


def test_a_remote_folder_with_its_config_takes_activations_from_it(tmp_path, served):
    save_file(mlp(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-real-type", "hidden_act": "tanh"}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors"
                                                                                    for k in mlp()}}))
    server = served()
    report = initaudit.audit(server.url)
    assert report.format == "hf-folder" and len(report.layers) == 4
    assert ("GET", "/config.json", "bytes=0-67108864") in server.requests  # read, within its cap


def test_a_chained_url_is_refused_before_anything_is_read(tmp_path, served):
    server = served()
    with pytest.raises(InputError, match="a chained fsspec URL"):
        initaudit.audit(f"zip://m.safetensors::{server.url}/m.zip")
    assert not server.requests
