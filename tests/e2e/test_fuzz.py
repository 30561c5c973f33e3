"""Fuzzing: mutated model files of every format get exit 0, 1 or 2 — on 2 one clear line, never a
traceback or an internal error — and the files are left as they were.

A bounded number of examples per format runs by default (derandomized, so CI is repeatable);
INITAUDIT_FUZZ_EXAMPLES=500 runs more, with fresh random examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fixtures import models
from helpers.formats import export_onnx
from initaudit.cli.main import main

EXAMPLES = int(os.environ.get("INITAUDIT_FUZZ_EXAMPLES", "0")) or 20
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="INITAUDIT_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seed_files(root: Path) -> dict[str, Path]:
    """One small model per format: what each fuzz example starts from (a file, or a folder for HF/ONNX+data)."""
    torch.manual_seed(0)
    module = models.zero_layer()
    state = module.state_dict()
    out = {}
    for name, writer in {
        "state_dict.pt": lambda p: torch.save(state, p),
        "checkpoint.ckpt": lambda p: torch.save({"epoch": 1, "state_dict": state, "optimizer": {"lr": 0.1}}, p),
        "model.safetensors": lambda p: save_file({k: v.contiguous() for k, v in state.items()}, str(p)),
        "scripted.pt": lambda p: torch.jit.script(module).save(str(p)),
        "model.onnx": lambda p: export_onnx(module, p),
    }.items():
        folder = root / name.replace(".", "_")
        folder.mkdir()
        writer(folder / name)
        out[name] = folder / name
    external = root / "onnx_external"
    external.mkdir()
    import onnx
    proto = onnx.load(str(out["model.onnx"]))
    onnx.save_model(proto, str(external / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    out["onnx+data"] = external / "model.onnx"
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_act": "gelu"}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(hf / "model.safetensors"), metadata={"format": "pt"})
    out["hf-folder"] = hf
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return _seed_files(tmp_path_factory.mktemp("fuzz-seeds"))


# A mutation: (what, where as a fraction of the file, bytes). Headers sit in the first bytes, so
# positions there are drawn more often.
MUTATION = st.tuples(
    st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete"]),
    st.one_of(st.floats(0, 0.02), st.floats(0, 1)),
    st.binary(min_size=1, max_size=16),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for what, where, chunk in mutations:
        at = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if what == "flip" and buf:
            buf[at] ^= chunk[0] or 0xFF
        elif what == "overwrite":
            buf[at:at + len(chunk)] = chunk
        elif what == "truncate":
            del buf[at:]
        elif what == "insert":
            buf[at:at] = chunk
        elif what == "delete":
            del buf[at:at + len(chunk)]
    return bytes(buf)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run_check(target: Path):
    return CliRunner().invoke(main, ["check", str(target), "--format", "json"], catch_exceptions=True)


def _assert_well_behaved(result) -> None:
    assert not isinstance(result.exception, BaseException) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code in (0, 1, 2), result.exit_code
    assert "Traceback" not in result.stderr
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("initaudit: error: "), lines[0]
    else:
        json.loads(result.stdout)  # a whole report, parseable


FORMATS = ["state_dict.pt", "checkpoint.ckpt", "model.safetensors", "scripted.pt", "model.onnx", "onnx+data",
           "hf-folder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_files_get_a_verdict_or_one_clear_line(seeds, fmt):
    source = seeds[fmt]
    folder = source if source.is_dir() else source.parent
    # Which file of the model is mutated: the weights (and, for ONNX with external data, the data file too).
    victims = [p.name for p in sorted(folder.iterdir()) if p.suffix != ".json" or fmt == "hf-folder"]

    @SETTINGS
    @given(victim=st.sampled_from(victims), mutations=st.lists(MUTATION, min_size=1, max_size=3))
    def example(victim, mutations):
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch) / "model"
            shutil.copytree(folder, work)
            (work / victim).write_bytes(_mutate((work / victim).read_bytes(), mutations))
            before = _digest(work)
            result = _run_check(work if fmt == "hf-folder" else work / source.name)
            _assert_well_behaved(result)
            assert _digest(work) == before

    example()


# ---------------------------------------------------------------- parsers: config.json, TOML, DCP, remote headers

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=24)
# Nesting as deep as an attacker likes: brackets, objects, or both, closed or not.
DEEP = st.builds(lambda depth, opener, closed: opener * depth + ("1" + ("]" if opener == "[" else "}") * depth
                                                                  if closed else ""),
                 st.integers(1, 100_000), st.sampled_from(["[", '{"a":']), st.booleans())
BASE_CONFIG = {"model_type": "not-a-real-type", "hidden_act": "gelu"}
CONFIG_TEXT = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).map(
        lambda extra: json.dumps({**BASE_CONFIG, **extra})),
    DEEP.map(lambda deep: '{"model_type": "bert", "extra": ' + deep + "}"),
    st.lists(MUTATION, min_size=1, max_size=3).map(lambda m: _mutate(json.dumps(BASE_CONFIG).encode(), m).decode(
        "utf-8", "replace")),
)


def test_fuzzed_config_json_gets_a_verdict_or_one_clear_line(seeds):
    @SETTINGS
    @given(text=CONFIG_TEXT)
    def example(text):
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch) / "model"
            shutil.copytree(seeds["hf-folder"], work)
            (work / "config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
            _assert_well_behaved(_run_check(work))

    example()


TOML_SCALARS = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                         st.text(max_size=12).map(json.dumps))
TOML_TEXT = st.one_of(
    st.lists(st.tuples(st.sampled_from(["fail-on", "activation", "select", "ignore", "signal-band", "exclude",
                                        "x", "a.b.c"]), TOML_SCALARS | st.lists(TOML_SCALARS, max_size=3).map(
        lambda items: "[" + ", ".join(map(str, items)).lower() + "]")), max_size=5).map(
        lambda pairs: "[tool.initaudit]\n" + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n"
                                                     for k, v in pairs)),
    DEEP.map(lambda deep: "[tool.initaudit]\nselect = " + deep.replace('{"a":', "{a = ") + "\n"),
    st.integers(1, 5000).map(lambda n: ".".join(["a"] * n) + " = 1\n"),
    st.lists(MUTATION, min_size=1, max_size=3).map(
        lambda m: _mutate(b'[tool.initaudit]\nfail-on = "warning"\nselect = ["IA1"]\n', m).decode("utf-8", "replace")),
)


def test_fuzzed_toml_config_gets_a_verdict_or_one_clear_line(seeds):
    @SETTINGS
    @given(text=TOML_TEXT)
    def example(text):
        with tempfile.TemporaryDirectory() as scratch:
            config = Path(scratch) / "initaudit.toml"
            config.write_text(text, encoding="utf-8", errors="surrogatepass")
            result = CliRunner().invoke(main, ["check", "--config", str(config), str(seeds["state_dict.pt"]),
                                               "--format", "json"], catch_exceptions=True)
            _assert_well_behaved(result)

    example()


@pytest.fixture(scope="module")
def dcp_seed(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("fuzz-dcp") / "ckpt"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": models.zero_layer().state_dict()}, checkpoint_id=str(folder), no_dist=True)
    return folder


ANY_VALUE = st.one_of(st.integers(-2 ** 62, 2 ** 62), st.sampled_from([torch.float32, torch.int8, torch.complex64]),
                      st.text(max_size=6), st.none(), st.lists(st.integers(-3, 2 ** 40), max_size=5),
                      st.lists(st.integers(0, 64), max_size=70).map(torch.Size))
FIELDS = st.sampled_from(["size", "dtype", "chunks", "chunk.offsets", "chunk.sizes", "storage.offset",
                          "storage.length", "storage.relative_path"])


def _lie(metadata, field: str, value) -> None:
    """Set one field of the first tensor entry (or of its first piece or storage record) to `value`."""
    name, md = next(iter(metadata.state_dict_metadata.items()))
    if field == "dtype":
        md.properties.dtype = value
    elif field.startswith("chunk."):
        setattr(md.chunks[0], field.split(".")[1], value)
    elif field.startswith("storage."):
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == name)
        setattr(info, field.split(".")[1], value)
    else:
        setattr(md, field, value)


def test_fuzzed_dcp_metadata_gets_a_verdict_or_one_clear_line(dcp_seed):
    """The metadata pickle mutated as bytes, or re-pickled with claims turned into anything."""
    from initaudit.load.dcp import read_metadata

    @SETTINGS
    @given(mutations=st.lists(MUTATION, max_size=3), lies=st.dictionaries(FIELDS, ANY_VALUE, max_size=3))
    def example(mutations, lies):
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch) / "ckpt"
            shutil.copytree(dcp_seed, work)
            metadata = read_metadata(work)
            for field in sorted(lies, key=lambda f: "." not in f):  # a piece's fields before the pieces themselves
                _lie(metadata, field, lies[field])
            data = _mutate(pickle.dumps(metadata), mutations)
            (work / ".metadata").write_bytes(data)
            before = _digest(work)
            _assert_well_behaved(_run_check(work))
            assert _digest(work) == before

    example()


def test_fuzzed_remote_safetensors_headers_get_a_verdict_or_one_clear_line(seeds):
    """A served file whose header is mutated, replaced by any JSON, or nested without end."""
    pytest.importorskip("aiohttp")
    from helpers.range_server import RangeServer

    data = seeds["model.safetensors"].read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = data[8:8 + n], data[8 + n:]
    headers = st.one_of(st.lists(MUTATION, min_size=1, max_size=3).map(lambda m: _mutate(header, m)),
                        JSON_VALUES.map(lambda v: json.dumps(v).encode()), DEEP.map(str.encode))
    with tempfile.TemporaryDirectory() as scratch:
        server = RangeServer(Path(scratch))
        try:
            @SETTINGS
            @given(raw=headers)
            def example(raw):
                (Path(scratch) / "m.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + body)
                _assert_well_behaved(_run_check(f"{server.url}/m.safetensors"))

            example()
        finally:
            server.close()
