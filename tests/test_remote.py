"""Remote checkpoints through fsspec, against a local HTTP server with range requests on 127.0.0.1
and fsspec's memory file system: byte ranges only (header first), the same verdicts as the local
file, one clear line when fsspec, a protocol's package or the credentials are missing."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import initaudit
from initaudit.errors import InputError

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


class RangeServer:
    """Serves a folder over HTTP/1.1 on 127.0.0.1 with Range requests (206), recording each request."""

    def __init__(self, folder: Path, status: int | None = None):
        self.folder, self.status, self.requests = folder, status, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = server.folder / self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((self.command, self.path, rng))
                if server.status:
                    self.send_response(server.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                if rng:
                    start, end = rng.removeprefix("bytes=").split("-")
                    start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                    part = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    part = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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

    from initaudit import writers
    from initaudit.audit import analyse, make_options
    from initaudit.fixer import repair
    from initaudit.loaders import load

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
