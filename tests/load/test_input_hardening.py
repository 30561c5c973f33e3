"""Every bad input answered in one line (exit 2, the file named, no traceback), on real files: FIFOs, sockets,
device files, links leaving the model's folder, malformed indexes and external data, code-carrying and
corrupt pickles, hostile shapes; and every dtype audited or skipped with a note, no library warning."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

import initaudit
from helpers import ROOT
from initaudit.load.dispatch import load

RNG = torch.Generator().manual_seed(0)


def kaiming(out: int, inp: int) -> torch.Tensor:
    return torch.randn(out, inp, generator=RNG) * (2 / inp) ** 0.5


def state(out: int = 32, inp: int = 64) -> dict[str, torch.Tensor]:
    return {"fc.weight": kaiming(out, inp), "fc.bias": torch.zeros(out)}


# ---------------------------------------------------------------- builders of real files

def pt(tmp: Path, obj=None, name: str = "model.pt", **kwargs) -> Path:
    path = tmp / name
    torch.save(state() if obj is None else obj, path, **kwargs)
    return path


def hf(tmp: Path, weights: dict | None = None, index: object = None) -> Path:
    """A Hugging Face folder: config.json, model.safetensors and, given `index`, an index whose weight_map it is."""
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_act": "gelu"}))
    save_file(weights or state(), folder / "model.safetensors")
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return folder


def onnx_external(tmp: Path, **fields: str) -> Path:
    """A one-Gemm ONNX model whose weight lives in weights.bin; `fields` overwrite its external_data entries."""
    folder = tmp / "onnx"
    folder.mkdir(exist_ok=True)
    weight = numpy_helper.from_array(kaiming(16, 32).numpy(), "fc.weight")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    if fields:
        model = onnx.load(str(path), load_external_data=False)
        entries = model.graph.initializer[0].external_data
        for key, value in fields.items():
            found = [e for e in entries if e.key == key]
            (found[0] if found else entries.add()).key = key
            (found[0] if found else entries[-1]).value = value
        onnx.save(model, str(path))
    return path


def outside(tmp: Path) -> Path:
    secret = tmp / "secret"
    secret.mkdir(exist_ok=True)
    return secret


def link(at: Path, to: Path) -> Path:
    if at.exists() or at.is_symlink():
        at.unlink()
    at.symlink_to(to)
    return at


def fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "model.pt")
    return tmp / "model.pt"


def unix_socket(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    server = socket.socket(socket.AF_UNIX)
    server.bind("model.safetensors")  # relative (the test runs in tmp): socket paths are limited to 108 bytes
    unix_socket.keep = server  # open until the test ends
    return path


def long_name(tmp: Path) -> Path:
    return tmp / ("a" * 300 + ".pt")


def text_pt(tmp: Path) -> Path:
    (tmp / "notes.pt").write_text("these are not weights\n")
    return tmp / "notes.pt"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def corrupt_pickle(tmp: Path) -> Path:
    """A zip checkpoint whose data.pkl is replaced by garbage."""
    path = pt(tmp)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = b"\x80\x02\xffgarbage"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def hf_shard_link_out(tmp: Path) -> Path:
    folder = hf(tmp)
    save_file(state(), outside(tmp) / "w.safetensors")
    link(folder / "model.safetensors", outside(tmp) / "w.safetensors")
    return folder


def hf_config_link_out(tmp: Path) -> Path:
    folder = hf(tmp)
    (outside(tmp) / "config.json").write_text("{}")
    link(folder / "config.json", outside(tmp) / "config.json")
    return folder


def hf_index_shard_out(tmp: Path) -> Path:
    save_file(state(), outside(tmp) / "w.safetensors")
    return hf(tmp, index={"fc.weight": "../secret/w.safetensors", "fc.bias": "model.safetensors"})


def hf_extra_link_out(tmp: Path) -> Path:
    """No index: every *.safetensors of the folder is read, so a link among them is refused too."""
    folder = hf(tmp)
    link(folder / "extra.safetensors", Path("/etc/passwd"))
    return folder


def hf_fifo_config(tmp: Path) -> Path:
    folder = hf(tmp)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return folder


def hf_fifo_shard(tmp: Path) -> Path:
    folder = hf(tmp)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    return folder


def hf_json(tmp: Path, name: str, text: str) -> Path:
    """A Hugging Face folder (with an index) whose `name` holds `text`."""
    folder = hf(tmp, index={"fc.weight": "model.safetensors", "fc.bias": "model.safetensors"})
    (folder / name).write_text(text)
    return folder


def hf_huge_config(tmp: Path) -> Path:
    """A config.json of 65 MB (sparse: spaces, then a hole)."""
    folder = hf_json(tmp, "config.json", "{}" + " " * 1000)
    with open(folder / "config.json", "r+b") as f:
        f.truncate(65 << 20)
    return folder


def safetensors_header(tmp: Path, header: bytes) -> Path:
    path = tmp / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def onnx_data_link_out(tmp: Path) -> Path:
    path = onnx_external(tmp)
    (outside(tmp) / "weights.bin").write_bytes((path.parent / "weights.bin").read_bytes())
    link(path.parent / "weights.bin", outside(tmp) / "weights.bin")
    return path


def onnx_data_is_fifo(tmp: Path) -> Path:
    path = onnx_external(tmp)
    (path.parent / "weights.bin").unlink()
    os.mkfifo(path.parent / "weights.bin")
    return path


def link_loop(tmp: Path) -> Path:
    link(tmp / "a.pt", tmp / "b.pt")
    link(tmp / "b.pt", tmp / "a.pt")
    return tmp / "a.pt"


def many_tensors(tmp: Path) -> Path:
    path = tmp / "many.safetensors"
    save_file({f"t{i}": torch.full((1,), float(i)) for i in range(101)}, path)
    return path


def many_views(tmp: Path) -> Path:
    base = torch.randn(2000)
    return pt(tmp, {f"v{i}": base[i:i + 1] for i in range(2000)})


BAD_INPUTS = {
    "fifo": (fifo, "FIFO"),
    "device file": (lambda tmp: Path("/dev/zero"), "device file"),
    "socket": (unix_socket, "socket"),
    "name over 255 characters": (long_name, "name too long"),
    "link loop": (link_loop, "cannot be read"),
    "text file named .pt": (text_pt, "not a readable PyTorch checkpoint"),
    "code in a pickle": (lambda tmp: pt(tmp, {"w": torch.zeros(2), "x": Payload()}), "--trust-pickle"),
    "code in a protocol-4 pickle": (lambda tmp: pt(tmp, {"w": torch.zeros(2), "x": Payload()}, pickle_protocol=4),
                                    "--trust-pickle"),
    "corrupt pickle": (corrupt_pickle, "not a readable PyTorch checkpoint"),
    "weight_map a list": (lambda tmp: hf(tmp, index=["fc.weight", "model.safetensors"]), "weight_map"),
    "weight_map nested": (lambda tmp: hf(tmp, index={"fc.weight": {"file": "model.safetensors"}}), "weight_map"),
    "weight_map a number": (lambda tmp: hf(tmp, index=5), "weight_map"),
    "HF shard links outside": (hf_shard_link_out, "outside the model's folder"),
    "HF config links outside": (hf_config_link_out, "outside the model's folder"),
    "HF index names a file outside": (hf_index_shard_out, "outside the model's folder"),
    "HF extra .safetensors links outside": (hf_extra_link_out, "outside the model's folder"),
    "HF config is a FIFO": (hf_fifo_config, "FIFO"),
    "HF shard is a FIFO": (hf_fifo_shard, "FIFO"),
    "ONNX data links outside": (onnx_data_link_out, "outside the model's folder"),
    "ONNX data is a FIFO": (onnx_data_is_fifo, "FIFO"),
    "ONNX location leaves the folder": (lambda tmp: onnx_external(tmp, location="../weights.bin"),
                                        "outside the model's folder"),
    "ONNX offset abc": (lambda tmp: onnx_external(tmp, offset="abc"), "offset 'abc'"),
    "ONNX negative length": (lambda tmp: onnx_external(tmp, length="-5"), "length '-5'"),
    "ONNX fractional length": (lambda tmp: onnx_external(tmp, length="1.5"), "length '1.5'"),
    "ONNX offset past the end": (lambda tmp: onnx_external(tmp, offset="99999999"), "shorter than"),
    "over MAX_TENSORS": (many_tensors, "more than the 100 initaudit audits"),
    "over MAX_PICKLE_BYTES": (many_views, "initaudit.load.torch_files.MAX_PICKLE_BYTES"),
    "HF config.json nested 100,000 deep": (lambda tmp: hf_json(tmp, "config.json", "[" * 100_000 + "]" * 100_000),
                                           "config.json: not readable JSON (nested deeper than 32 levels)"),
    "HF config.json objects nested deep": (lambda tmp: hf_json(tmp, "config.json",
                                                               '{"a":' * 50_000 + "1" + "}" * 50_000),
                                           "config.json: not readable JSON (nested deeper than 32 levels)"),
    "HF index nested deep": (lambda tmp: hf_json(tmp, "model.safetensors.index.json",
                                                 '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                             "model.safetensors.index.json: not readable JSON (nested deeper than 32 levels)"),
    "HF config.json over the cap": (hf_huge_config,
                                    "config.json: larger than 64 MB, the most initaudit reads of a JSON file"),
    "safetensors header {}": (lambda tmp: safetensors_header(tmp, b"{}"), "holding no tensors: nothing to audit"),
    "safetensors header of metadata alone": (lambda tmp: safetensors_header(tmp, b'{"__metadata__":{"format":"pt"}}'),
                                             "holding no tensors: nothing to audit"),
}


def one_stderr_line(result) -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(case, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("initaudit.load.source.MAX_TENSORS", 100)
    monkeypatch.setattr("initaudit.load.torch_files.MAX_PICKLE_BYTES", 50_000)
    build, fragment = BAD_INPUTS[case]
    path = build(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli("check", path)
    line = one_stderr_line(result)
    assert result.exit_code == 2
    assert line.startswith("initaudit: error: ") and "internal error" not in line
    assert fragment.lower() in line.lower()
    assert str(path.parent) in line  # the file (or one it refers to) is named
    assert "weights_only" not in line  # torch's advice never reaches the user
    assert not caught, [str(w.message) for w in caught]
    assert not (tmp_path / "pwned.txt").exists()


def test_fifo_as_model_is_refused_without_blocking(tmp_path):
    """In a subprocess: a FIFO that nothing writes would block open() forever."""
    path = fifo(tmp_path)
    done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "FIFO" in done.stderr


def test_a_file_url_to_a_fifo_is_refused_without_blocking(tmp_path):
    """`file://` is a local path: the same policy as a typed path (before, fsspec opened the FIFO and blocked)."""
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", f"file://{path}"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"initaudit: error: {path}: a FIFO (named pipe); initaudit reads only regular files\n"


def test_a_file_url_folder_follows_the_folder_link_policy(cli, tmp_path):
    folder = hf_shard_link_out(tmp_path)
    result = cli("check", f"file://{folder}")
    assert result.exit_code == 2 and "outside the model's folder" in one_stderr_line(result)
    (tmp_path / "plain").mkdir()
    plain = hf(tmp_path / "plain")
    by_url, by_path = cli("check", f"file://{plain}", "--format", "json"), cli("check", plain, "--format", "json")
    assert by_url.exit_code == by_path.exit_code == 0
    assert json.loads(by_url.stdout)["layers"] == json.loads(by_path.stdout)["layers"]


# ---------------------------------------------------------------- what the policy lets through

def test_model_path_may_be_a_link_the_user_chose(cli, tmp_path):
    real = pt(outside(tmp_path), state())
    typed = link(tmp_path / "chosen.pt", real)
    result = cli("check", typed)
    assert result.exit_code == 0, result.output
    assert load(typed).files == [real.resolve()]


def test_links_inside_the_folder_are_followed_and_listed(tmp_path):
    folder = hf(tmp_path)
    (folder / "blobs").mkdir()
    (folder / "model.safetensors").rename(folder / "blobs" / "abc123")
    link(folder / "model.safetensors", Path("blobs") / "abc123")
    loaded = load(folder)
    assert loaded.files == [folder.resolve(), (folder / "config.json").resolve(), (folder / "blobs" / "abc123").resolve()]
    assert initaudit.audit(folder).summary["layers"] == 1


def test_loaded_files_lists_every_file_read(tmp_path):
    folder = hf(tmp_path, index={"fc.weight": "model.safetensors", "fc.bias": "model.safetensors"})
    (folder / "README.md").write_text("not read")
    assert load(folder).files == [folder.resolve(), *(folder / n for n in
                                  ("config.json", "model.safetensors.index.json", "model.safetensors"))]
    path = onnx_external(tmp_path)
    assert load(path).files == [path.resolve(), (path.parent / "weights.bin").resolve()]
    torch_file = pt(tmp_path)
    assert load(torch_file).files == [torch_file.resolve()]


# ---------------------------------------------------------------- torch loading

def test_protocol_4_pickle_loads_like_protocol_2(tmp_path):
    weights = state()
    weights["fc.weight"][3] = 0
    p2 = pt(tmp_path, weights, "p2.pt")
    p4 = pt(tmp_path, weights, "p4.pt", pickle_protocol=4)
    loaded = load(p4)
    assert all(torch.equal(loaded.tensors[k], weights[k]) for k in weights)
    assert initaudit.audit(p4).findings == initaudit.audit(p2).findings


def test_no_library_warning_reaches_stderr(tmp_path):
    """A protocol-4 pickle holding quantized and sparse tensors, checked in a fresh process."""
    w = kaiming(32, 64)
    with warnings.catch_warnings():  # torch warns when the test makes them; the check must not
        warnings.simplefilter("ignore")
        weights = {"q.weight": torch.quantize_per_tensor(w, 0.05, 0, torch.qint8), "q.bias": torch.zeros(32),
                   "s.weight": (w * (w.abs() > 1)).to_sparse(), "c.weight": (w * (w.abs() > 1)).to_sparse_csr()}
        path = pt(tmp_path, weights, pickle_protocol=4)
    done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", str(path), "--format", "json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode in (0, 1) and done.stderr == "", done.stderr
    assert {row["name"] for row in json.loads(done.stdout)["layers"]} == {"q", "s", "c"}


# ---------------------------------------------------------------- dtypes

FLOATS = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
SKIPPED = {torch.int8: "integer or bool", torch.int64: "integer or bool", torch.uint16: "integer or bool",
           torch.bool: "integer or bool", torch.complex64: "complex"}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_float_dtype_is_audited(dtype, fmt, tmp_path):
    weight = kaiming(32, 64).to(dtype)
    weight[5] = weight[6]
    weight[0, 0] = float("nan")
    weights = {"fc.weight": weight, "fc.bias": torch.zeros(32, dtype=dtype)}
    path = tmp_path / f"m.{fmt}"
    torch.save(weights, path) if fmt == "pt" else save_file(weights, path)
    report = initaudit.audit(path)
    assert [row.name for row in report.layers] == ["fc"] and 0.1 < report.layers[0].std < 0.3
    assert report.by_rule() == {("non-finite", "fc"), ("duplicate-units", "fc")}  # found in every precision


@pytest.mark.parametrize("dtype", sorted(SKIPPED, key=str), ids=str)
def test_dtypes_without_real_values_are_named_in_coverage(dtype, tmp_path):
    weights = {"fc.weight": (kaiming(8, 16) * 10).to(dtype), "fc.bias": torch.zeros(8)}
    path = tmp_path / "m.safetensors"
    save_file(weights, path)
    report = initaudit.audit(path)
    assert [n for n in report.coverage.not_audited if SKIPPED[dtype] in n.reason and "fc.weight" in n.tensors]
    assert not report.layers


def test_float4_is_named_in_coverage(tmp_path):
    packed = torch.zeros(8, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = pt(tmp_path, {"fc.weight": packed, "fc.bias": torch.zeros(8)})
    assert "float4_e2m1fn_x2" in initaudit.audit(path).coverage.line()


def test_empty_tensors_give_empty_stats(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"fc.weight": torch.empty(0, 5), "fc.bias": torch.empty(0)}, path)
    report = initaudit.audit(path)
    assert report.layers[0].std is None or report.layers[0].std != report.layers[0].std
    assert report.layers[0].scheme == "unknown" and not report.findings


def test_sparse_and_quantized_tensors_are_audited_as_dense(tmp_path):
    w = kaiming(32, 64)
    w[5] = w[6]
    dense = initaudit.audit(pt(tmp_path, {"fc.weight": w, "fc.bias": torch.zeros(32)}, "dense.pt"))
    for name, tensor in (("coo", w.to_sparse()), ("csr", w.to_sparse_csr())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = initaudit.audit(pt(tmp_path, {"fc.weight": tensor, "fc.bias": torch.zeros(32)}, f"{name}.pt"))
        assert report.findings == dense.findings and report.layers[0].std == dense.layers[0].std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, torch.full((32,), 0.01), torch.zeros(32, dtype=torch.long), 0, torch.qint8)
    report = initaudit.audit(pt(tmp_path, {"fc.weight": q, "fc.bias": torch.zeros(32)}, "q.pt"))
    assert abs(report.layers[0].std / dense.layers[0].std - 1) < 0.01
    assert ("duplicate-units", "fc") in report.by_rule() == dense.by_rule()


def test_large_sparse_tensor_is_named_in_coverage(tmp_path, monkeypatch):
    monkeypatch.setattr("initaudit.measure.stats.SPARSE_DENSE_LIMIT", 1000)
    path = pt(tmp_path, {"fc.weight": kaiming(64, 64).to_sparse(), "fc.bias": torch.zeros(64)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = initaudit.audit(path)
    assert [n for n in report.coverage.not_audited if "sparse" in n.reason and "fc.weight" in n.tensors]


# ---------------------------------------------------------------- hostile shapes

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["safetensors", "views"])
def test_a_hundred_thousand_tiny_tensors_complete(kind, cli, tmp_path):
    n = 100_000
    if kind == "safetensors":
        path = tmp_path / "many.safetensors"
        save_file({f"t{i}": torch.full((1,), float(i)) for i in range(n)}, path)
    else:
        base = torch.randn(n)
        path = pt(tmp_path, {f"v{i}": base[i:i + 1] for i in range(n)})
    result = cli("check", path, "--format", "json")
    assert result.exit_code in (0, 1)
    assert json.loads(result.stdout)["model"] == str(path)


def test_ten_thousand_tiny_tensors_complete(cli, tmp_path):
    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.full((2,), float(i)) for i in range(10_000)}, path)
    result = cli("check", path, "--format", "json")
    assert result.exit_code in (0, 1) and json.loads(result.stdout)["model"] == str(path)
