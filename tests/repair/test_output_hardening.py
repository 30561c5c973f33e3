"""Hardened outputs and messages: nothing the model reads is ever written, fix is deterministic and
crash-safe, links are never copied, every error is one escaped line on stderr."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file

from fixtures import models
from helpers import ROOT
from helpers.cli import one_stderr_line, run
from helpers.formats import export_onnx, save_as
from initaudit.common.printable import printable

PYTHON = sys.executable


def state_dict_file(folder: Path) -> Path:
    return save_as(models.zero_layer(), "state_dict", folder)[0]


def onnx_external(folder: Path, threshold: int = 1024) -> Path:
    """The zero-layer MLP as ONNX with its tensors in model.onnx.data (those under `threshold` bytes inline)."""
    exported = export_onnx(models.zero_layer(), folder / "exported.onnx")
    onnx.save(onnx.load(str(exported)), str(folder / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=threshold)
    exported.unlink()
    return folder / "m.onnx"


def hf_folder(folder: Path) -> Path:
    """A Hugging Face style folder: config.json and model.safetensors holding the zero-layer MLP."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_act": "relu"}))
    save_file({k: v.contiguous() for k, v in models.zero_layer().state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def hardlink(path: Path, name: str) -> Path:
    os.link(path, path.parent / name)
    return path.parent / name


def symlink(path: Path, name: str) -> Path:
    (path.parent / name).symlink_to(path)
    return path.parent / name


def pyproject(tmp: Path, text: str | bytes, name: str = "pyproject.toml") -> Path:
    (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp / name


PT = "--activation", "relu"

# (id, setup(tmp) -> CLI args, expected exit code, a fragment of the one stderr line)
CASES = [
    ("check-o-hardlink", lambda t: ["check", state_dict_file(t), "-o", hardlink(t / "model.pt", "link.pt")],
     2, "MODEL itself"),
    ("check-o-symlink", lambda t: ["check", state_dict_file(t), "-o", symlink(t / "model.pt", "link.json")],
     2, "MODEL itself"),
    ("check-o-model", lambda t: ["check", state_dict_file(t), "-o", t / "model.pt"], 2, "MODEL itself"),
    ("check-o-onnx-data", lambda t: ["check", onnx_external(t), "-o", t / "m.onnx.data"], 2,
     "m.onnx.data, which the model reads"),
    ("check-o-onnx-data-symlink", lambda t: ["check", onnx_external(t), "-o", symlink(t / "m.onnx.data", "r.json")],
     2, "m.onnx.data, which the model reads"),
    ("check-o-hf-weights", lambda t: ["check", hf_folder(t / "hf"), "-o", t / "hf" / "model.safetensors"], 2,
     "inside the model folder"),
    ("check-o-hf-new-file", lambda t: ["check", hf_folder(t / "hf"), "-o", t / "hf" / "report.json"], 2,
     "inside the model folder"),
    ("check-o-no-folder", lambda t: ["check", state_dict_file(t), "-o", t / "nowhere" / "r.json"], 2,
     "cannot write"),
    ("fix-o-onnx-data", lambda t: ["fix", onnx_external(t), "-o", t / "m.onnx.data", *PT], 2,
     "m.onnx.data, which the model reads"),
    ("fix-o-hardlink", lambda t: ["fix", state_dict_file(t), "-o", hardlink(t / "model.pt", "x.pt"), *PT], 2,
     "--in-place"),
    ("fix-o-symlink", lambda t: ["fix", state_dict_file(t), "-o", symlink(t / "model.pt", "x.pt"), *PT], 2,
     "--in-place"),
    ("fix-pt-to-safetensors", lambda t: ["fix", state_dict_file(t), "-o", t / "x.safetensors", *PT], 2,
     "fix writes MODEL's own format (torch-state-dict); name it x.pt"),
    ("fix-safetensors-to-pt", lambda t: ["fix", save_as(models.zero_layer(), "safetensors", t)[0], "-o", t / "x.pt",
                                         *PT], 2, "name it x.safetensors"),
    ("fix-o-inside-hf", lambda t: ["fix", hf_folder(t / "hf"), "-o", t / "hf" / "out", *PT], 2,
     "inside the model folder"),
    ("fix-o-hf-itself", lambda t: ["fix", hf_folder(t / "hf"), "-o", t / "hf", *PT], 2, "inside the model folder"),
    ("fix-o-hf-nonempty", lambda t: ["fix", hf_folder(t / "hf"), "-o", t, *PT], 2, "not empty"),
    ("fix-o-both", lambda t: ["fix", state_dict_file(t), "-o", t / "x.pt", "--in-place", *PT], 2, "not both"),
    ("config-trust-pickle", lambda t: ["check", state_dict_file(t), "--config",
                                       pyproject(t, "[tool.initaudit]\ntrust-pickle = true\n")], 2,
     "pass --trust-pickle on the command line"),
    ("config-trust-pickle-string", lambda t: ["check", state_dict_file(t), "--config",
                                              pyproject(t, '[tool.initaudit]\ntrust-pickle = "false"\n')], 2,
     "trust-pickle cannot be set in a config file"),
    ("config-select-string", lambda t: ["check", state_dict_file(t), "--config",
                                        pyproject(t, '[tool.initaudit]\nselect = "zero-weights"\n')], 2,
     "pyproject.toml: select must be a list, not a string ('zero-weights')"),
    ("config-per-layer-string", lambda t: ["check", state_dict_file(t), "--config",
                                           pyproject(t, '[tool.initaudit.per-layer-ignores]\n"x" = "IA9"\n')], 2,
     "per-layer-ignores.'x' must be a list"),
    ("config-per-layer-unknown", lambda t: ["check", state_dict_file(t), "--config",
                                            pyproject(t, '[tool.initaudit.per-layer-ignores]\n"x" = ["zero-weight"]\n')],
     2, "did you mean 'zero-weights'"),
    ("config-tool-5", lambda t: ["check", state_dict_file(t), "--config", pyproject(t, "tool = 5\n")], 2,
     "`tool` must be a table"),
    ("config-initaudit-5", lambda t: ["check", state_dict_file(t), "--config", pyproject(t, "[tool]\ninitaudit = 5\n")],
     2, "[tool.initaudit] must be a table"),
    ("config-not-utf8", lambda t: ["check", state_dict_file(t), "--config",
                                   pyproject(t, b"[tool.initaudit]\nactivation = '\xff'\n")], 2, "not UTF-8"),
    ("config-key-typo", lambda t: ["check", state_dict_file(t), "--config", pyproject(t, 'fail_on = "warning"\n',
                                                                                       "other.toml")],
     2, "other.toml: unknown [tool.initaudit] key 'fail_on' (did you mean 'fail-on'?"),
    ("config-fail-on-int", lambda t: ["check", state_dict_file(t), "--config", pyproject(t, "fail-on = 1\n", "c.toml")],
     2, "c.toml: fail-on must be a string, not an integer (1)"),
    ("ignore-typo", lambda t: ["check", state_dict_file(t), "--ignore", "zero-weight"], 2,
     "did you mean 'zero-weights'"),
    ("select-empty", lambda t: ["check", state_dict_file(t), "--select", ""], 2, "unknown rule ''"),
    ("select-single-letter", lambda t: ["check", state_dict_file(t), "--select", "I"], 2, "unknown rule 'I'"),
    ("usage-unknown-option", lambda t: ["check", "--nope"], 2, "initaudit check: error: No such option"),
    ("usage-bad-choice", lambda t: ["check", "--format", "xml"], 2, "see `initaudit check --help`"),
    ("usage-missing-argument", lambda t: ["explain"], 2, "initaudit explain: error: Missing argument"),
    ("usage-unknown-command", lambda t: ["chek"], 2, "initaudit: error: No such command"),
    ("escaped-file-name", lambda t: ["check", t / "evil\x1b[2J\n.pt"], 2, "evil\\x1b[2J\\n.pt: no such file"),
]


@pytest.mark.parametrize("setup, code, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_outputs_configs_and_usage_get_one_line(setup, code, fragment, tmp_path):
    args = setup(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    result = run(*args)
    assert result.exit_code == code, result.output
    line = one_stderr_line(result)
    assert fragment in line, line
    assert "\x1b" not in line
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before  # nothing written, nothing changed


def test_a_report_beside_the_model_is_allowed(tmp_path):
    model = onnx_external(tmp_path)
    assert run("check", model, "--format", "json", "-o", tmp_path / "report.json").exit_code == 1
    assert json.loads((tmp_path / "report.json").read_text())["format"] == "onnx"
    hf = hf_folder(tmp_path / "hf")
    assert run("check", hf, "--format", "json", "-o", tmp_path / "hf.json", "--fail-on", "info").exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.json", "m.onnx", "m.onnx.data", "report.json"]


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    assert "Traceback" not in run("check", missing).stderr
    for result in (run("check", missing, "--debug"), run("--debug", "check", missing),
                   run("check", missing, env={"INITAUDIT_DEBUG": "1"})):
        assert result.exit_code == 2
        assert "Traceback" in result.stderr and result.stderr.splitlines()[-1].endswith("no such file or directory")


# ---------------------------------------------------------------- control characters

EVIL = "evil\x1b[2J\x1b]0;pwned\x07\r\nerror IA101 forged\u202e"


def test_printable_escapes_every_control_character():
    assert printable(EVIL) == "evil\\x1b[2J\\x1b]0;pwned\\x07\\r\\nerror IA101 forged\\u202e"
    assert printable("\x9b31m\x7f\t") == "\\x9b31m\\x7f\\t"
    assert printable("layers.0.weight → ok") == "layers.0.weight → ok"


def test_names_from_the_file_are_escaped_in_every_text_output(tmp_path):
    state = {f"{EVIL}.{k}": v for k, v in models.zero_layer().state_dict().items()}
    path = tmp_path / "evil.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    outputs = {fmt: run("check", path, "--format", fmt, *PT) for fmt in ("table", "github", "json", "sarif")}
    for fmt, result in outputs.items():
        assert result.exit_code == 1, (fmt, result.output)
        assert not any(c in result.stdout for c in "\x1b\x07\r\u202e"), fmt
    assert "evil\\x1b[2J" in outputs["table"].stdout
    errors = len([f for f in json.loads(outputs["json"].stdout)["findings"] if f["severity"] == "error"])
    finding_lines = [line for line in outputs["table"].stdout.splitlines() if line.startswith("error")]
    assert errors == len(finding_lines) == 1 and "forged" in finding_lines[0]  # no forged finding line
    assert all(line.startswith("::") for line in outputs["github"].stdout.splitlines())
    assert any(EVIL in f["layer"] for f in json.loads(outputs["json"].stdout)["findings"])  # JSON keeps the name
    fixed = run("fix", path, "-o", tmp_path / "fixed.safetensors", "--seed", 0, *PT)
    assert fixed.exit_code == 0 and "\x1b" not in fixed.stdout and "evil\\x1b[2J" in fixed.stdout


# ---------------------------------------------------------------- links, suffixes, nothing to fix

def test_fix_never_copies_a_link_out_of_a_model_folder(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret")
    os.chmod(secret, 0o600)
    hf = hf_folder(tmp_path / "hf")
    (hf / "tokenizer.json").symlink_to(secret)
    (hf / "notes.txt").write_text("kept")
    os.chmod(hf / "notes.txt", 0o640)
    result = run("fix", hf, "-o", tmp_path / "out", "--seed", 0, "--only", "4")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert not any("$6$" in p.read_bytes().decode("latin-1") for p in out.iterdir())
    assert "note: tokenizer.json: a link leading outside the model's folder, not copied" in result.stdout
    assert (out / "notes.txt").stat().st_mode & 0o777 == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


def test_fix_writes_no_file_when_nothing_was_fixed(tmp_path):
    path, _ = save_as(models.deep_relu_kaiming(), "state_dict", tmp_path)
    result = run("fix", path, "-o", tmp_path / "fixed.pt", *PT)
    assert result.exit_code == 0 and "no file written" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_onnx_with_every_tensor_external_keeps_small_rewritten_tensors_external(tmp_path):
    model = onnx_external(tmp_path, threshold=0)
    assert run("fix", model, "-o", tmp_path / "fixed.onnx", "--all", "--seed", 0, *PT).exit_code == 0
    fixed = onnx.load(str(tmp_path / "fixed.onnx"), load_external_data=False)
    small = [t for t in fixed.graph.initializer if 4 * math.prod(t.dims) < 1024]  # under onnx's inline threshold
    assert small and all(t.data_location == onnx.TensorProto.EXTERNAL for t in fixed.graph.initializer)


# ---------------------------------------------------------------- determinism

def _hf_from(t: Path) -> Path:
    return hf_folder(t / "hf")


DETERMINISTIC = {
    "state_dict": lambda t: save_as(models.zero_layer(), "state_dict", t)[0],
    "checkpoint": lambda t: save_as(models.zero_layer(), "checkpoint", t)[0],
    "safetensors": lambda t: save_as(models.zero_layer(), "safetensors", t)[0],
    "torchscript": lambda t: save_as(models.zero_layer(), "torchscript", t)[0],
    "pickled_module": lambda t: save_as(models.zero_layer(), "pickled_module", t)[0],
    "onnx": lambda t: export_onnx(models.zero_layer(), t / "m.onnx"),
    "onnx_external": onnx_external,
    "hf_folder": _hf_from,
}


def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("fmt", sorted(DETERMINISTIC))
def test_fix_output_is_byte_identical_for_the_same_seed(fmt, tmp_path):
    model = DETERMINISTIC[fmt](tmp_path)
    extra = ["--trust-pickle"] if fmt == "pickled_module" else []
    name = model.name if model.is_dir() else f"fixed{model.suffix}"
    written = []
    for run_no, seed in ((1, 5), (2, 5), (3, 6)):
        folder = tmp_path / f"run{run_no}"
        folder.mkdir()
        result = run("fix", model, "-o", folder / name, "--all", "--seed", seed, *PT, *extra)
        assert result.exit_code == 0, result.output
        written.append({k: v for p in folder.iterdir() for k, v in _tree(p).items()})
    assert written[0] == written[1]
    assert written[0].keys() == written[2].keys() and written[0] != written[2]  # the seed matters
    if fmt in ("state_dict", "checkpoint", "pickled_module", "torchscript"):
        result = run("fix", model, "-o", tmp_path / f"other{model.suffix}", "--all", "--seed", 5, *PT, *extra)
        assert result.exit_code == 0 and (tmp_path / f"other{model.suffix}").read_bytes() == written[0][name]


# ---------------------------------------------------------------- disk errors

def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probes = (["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
              ["unshare", "--map-user=65534", "--map-group=65534", PYTHON, "-c", "pass"])
    return all(subprocess.run(probe, capture_output=True).returncode == 0 for probe in probes)


DISK_ERRORS = {  # how the output folder `mnt` is made unwritable, each in a private namespace for this one run
    "No space left on device": ("unshare -rm sh -c", "mount -t tmpfs -o size=1m tmpfs mnt && "),
    "Read-only file system": ("unshare -rm sh -c", "mount -t tmpfs tmpfs mnt && mount -o remount,ro mnt && "),
    "Permission denied": ("unshare --map-user=65534 --map-group=65534 sh -c", "chmod 555 mnt && "),
}


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare: a tmpfs mount in a user namespace, a mapped user")
@pytest.mark.parametrize("message, fmt", [("No space left on device", "pt"), ("No space left on device", "safetensors"),
                                          ("No space left on device", "hf"), ("Read-only file system", "pt"),
                                          ("Permission denied", "safetensors")])
def test_a_full_read_only_or_forbidden_disk_gives_one_line_and_no_temp_file(message, fmt, tmp_path):
    state = {"0.weight": torch.zeros(512, 1024), "0.bias": torch.zeros(512)}  # 2 MB: more than the 1 MB disk
    if fmt == "pt":
        model, out = tmp_path / "big.pt", "mnt/fixed.pt"
        torch.save(state, model)
    else:
        model, out = tmp_path / "big.safetensors", "mnt/fixed.safetensors"
        save_file(state, str(model))
    if fmt == "hf":
        model, out = tmp_path / "hf", "mnt/fixed"
        model.mkdir()
        (model / "config.json").write_text("{}")
        (tmp_path / "big.safetensors").rename(model / "model.safetensors")
    (tmp_path / "mnt").mkdir()
    unshare, prepare = DISK_ERRORS[message]
    script = f"{prepare}{PYTHON} -m initaudit.cli fix {model.name} -o {out} --all --activation relu; echo rc=$?; ls -A mnt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*unshare.split(), script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.stderr.strip() == f"initaudit: error: {out}: cannot write ({message})", result.stderr
    assert result.stdout.strip() == "rc=2"  # and `ls -A mnt` listed nothing: no temporary file left


# ---------------------------------------------------------------- SIGKILL mid-write

def _big_state(n: int = 3) -> dict[str, torch.Tensor]:
    """An MLP of 3 zero 2048x2048 layers (48 MB): writing it takes a moment."""
    state = {}
    for i in range(n):
        state[f"{2 * i}.weight"] = torch.zeros(2048, 2048)
        state[f"{2 * i}.bias"] = torch.zeros(2048)
    return state


def _big(fmt: str, folder: Path) -> Path:
    state = _big_state()
    if fmt == "pt":
        torch.save(state, folder / "big.pt")
        return folder / "big.pt"
    if fmt == "safetensors":
        save_file(state, str(folder / "big.safetensors"))
        return folder / "big.safetensors"
    if fmt == "hf":
        (folder / "hf").mkdir()
        (folder / "hf" / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_act": "relu"}))
        save_file(state, str(folder / "hf" / "model.safetensors"))
        return folder / "hf"
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for i in range(3):
        inits += [numpy_helper.from_array(state[f"{2 * i}.weight"].numpy(), f"w{i}"),
                  numpy_helper.from_array(state[f"{2 * i}.bias"].numpy(), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        x = f"a{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2048])], inits)
    onnx.save(helper.make_model(graph), str(folder / "big.onnx"), save_as_external_data=True, location="big.onnx.data")
    return folder / "big.onnx"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "onnx", "hf"])
def test_sigkill_mid_write_leaves_the_input_whole_and_nothing_under_the_final_name(fmt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model = _big(fmt, src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    final = out_dir / ("fixed" if fmt == "hf" else f"fixed{model.suffix}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([PYTHON, "-m", "initaudit.cli", "fix", str(model), "-o", str(final), "--all",
                             "--activation", "relu", "--seed", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not _partly_written(out_dir):
            time.sleep(0.002)
        assert proc.poll() is None, "fix finished before a temporary file was seen"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not final.exists()


def _partly_written(folder: Path) -> bool:
    """A temporary file (or a file in a scratch folder) that holds some bytes already."""
    try:
        return any(p.is_file() and p.stat().st_size > 0 for p in folder.rglob("*")
                   if ".initaudit-tmp" in str(p.relative_to(folder)))
    except OSError:  # renamed or removed while we looked
        return False


# ---------------------------------------------------------------- the final step replaces nothing it did not mean to

def _fix_in_child(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "initaudit.cli", "fix", *map(str, args), *PT], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _meanwhile(monkeypatch, when: str, action) -> list:
    """Run `action` once, at `when`: "reading" (after MODEL is loaded, before fix re-draws anything), or
    "writing" (this run's output complete under its temporary name, before its final step)."""
    from initaudit.repair import fixer, outputs

    module, name = (fixer, "repair") if when == "reading" else (outputs, "_fsync")
    real, done = getattr(module, name), []

    def act_then_go_on(*args, **kwargs):
        if when == "writing":
            real(*args, **kwargs)
        if not done:
            done.append(action())
        return real(*args, **kwargs) if when == "reading" else None

    monkeypatch.setattr(module, name, act_then_go_on)
    return done


def _files(folder: Path, but: str = "\0") -> dict[str, bytes]:
    """Every file under `folder` and its bytes (but those whose path holds `but`)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and but not in str(p)}


@pytest.mark.parametrize("when", ["reading", "writing"])
@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "torchscript", "onnx_external", "hf_folder"])
def test_of_two_runs_writing_the_same_name_the_second_loses_with_one_line(fmt, when, tmp_path, monkeypatch):
    """Another `fix --output-dir OUT` process writes the same name while this one reads the model, or is between
    its temporary file and its final step: the other's file stays, whole; this run exits 2 with one line and
    leaves nothing."""
    model = DETERMINISTIC[fmt](tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    winner = _meanwhile(monkeypatch, when, lambda: (_fix_in_child(model, "--output-dir", out, "--seed", 1),
                                                    _files(out, but=".initaudit-tmp")))
    result = run("fix", model, "--output-dir", out, "--seed", 2, *PT)
    (other, written), = winner
    assert other.returncode == 0 and written, other.stderr
    line = one_stderr_line(result)
    assert result.exit_code == 2
    assert f"{out / model.name}: appeared after initaudit started" in line or \
        (fmt == "onnx_external" and f"{out / model.name}.data: appeared after" in line), line
    assert _files(out) == written  # the winner's output, nothing of the loser's, no temporary file


def test_fix_o_still_replaces_a_file_that_was_there_before(tmp_path):
    model = save_as(models.zero_layer(), "state_dict", tmp_path)[0]
    out = tmp_path / "fixed.pt"
    out.write_bytes(b"an older fix")
    assert run("fix", model, "-o", out, "--seed", 0, *PT).exit_code == 0
    assert set(torch.load(out, weights_only=True)) == set(torch.load(model, weights_only=True))


def _rewrite_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    with open(path, "r+b") as f:  # same file, same size: only its modification time tells
        f.write(data)
    time.sleep(0.02)  # past the file system's timestamp granularity


def _replace_by_rename(path: Path) -> None:
    shutil.copy(path, path.with_name("copy"))
    os.replace(path.with_name("copy"), path)


CHANGES = {"rewritten in place": _rewrite_same_size, "replaced by a rename": _replace_by_rename}


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "hf_folder"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_in_place_refuses_an_input_changed_since_it_was_read(change, fmt, tmp_path, monkeypatch):
    """Another program writes MODEL after fix read it and before fix replaces it: its version stays."""
    from initaudit.repair import fixer

    model = DETERMINISTIC[fmt](tmp_path)
    changed = model / "model.safetensors" if model.is_dir() else model
    theirs, repair = [], fixer.repair

    def change_then_repair(*args, **kwargs):
        CHANGES[change](changed)
        theirs.append(changed.read_bytes())
        return repair(*args, **kwargs)

    monkeypatch.setattr(fixer, "repair", change_then_repair)
    result = run("fix", model, "--in-place", "--seed", 0, *PT)
    assert result.exit_code == 2 and one_stderr_line(result) == (
        f"initaudit: error: {changed}: changed after initaudit started (another program wrote it); not replaced, "
        "run initaudit again")
    assert [changed.read_bytes()] == theirs
    assert not [p for p in changed.parent.iterdir() if ".initaudit-tmp" in p.name]


def test_without_hard_links_the_name_is_claimed_and_the_race_still_lost(tmp_path, monkeypatch):
    """On a file system without hard links (link(2) fails with EPERM, as on FAT), a new file still never replaces
    one that appeared meanwhile; with no competitor it is written as usual."""
    def no_hard_links(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    model = save_as(models.zero_layer(), "state_dict", tmp_path)[0]
    assert run("fix", model, "-o", tmp_path / "alone.pt", "--seed", 0, *PT).exit_code == 0
    assert set(torch.load(tmp_path / "alone.pt", weights_only=True)) == set(torch.load(model, weights_only=True))
    out = tmp_path / "out"
    out.mkdir()
    winner = _meanwhile(monkeypatch, "writing", lambda: (_fix_in_child(model, "--output-dir", out, "--seed", 1),
                                                         _files(out, but=".initaudit-tmp")))
    result = run("fix", model, "--output-dir", out, "--seed", 2, *PT)
    (other, written), = winner
    assert other.returncode == 0 and result.exit_code == 2
    assert "model.pt: appeared after initaudit started" in one_stderr_line(result)
    assert _files(out) == written
