"""Fuzzing: mutated model files of every format get exit 0, 1 or 2 — on 2 one clear line, never a
traceback or an internal error — and the files are left as they were.

A bounded number of examples per format runs by default (derandomized, so CI is repeatable);
INITAUDIT_FUZZ_EXAMPLES=500 runs more, with fresh random examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import export_onnx
from fixtures import models
from initaudit.cli import main

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
