"""Running a model is running code: `probe` and `fix --probe` run a TorchScript or ONNX file's graph only with
--trust-code, and then in a spawned child within a time and a memory limit, its output captured. The attacks
of issue 20, each on a real file; the CLI runs as a real process wherever the attack aims at file descriptors
1 and 2 (a scripted print, onnxruntime's C++ log) or could hang or exhaust the machine without the fix."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import List

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers import ROOT

# tests/ and this folder too: the CLI process unpickles a module whose class is defined here
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [ROOT, ROOT / "tests", Path(__file__).parent])),
       "OMP_NUM_THREADS": "1"}
ENV.pop("INITAUDIT_DEBUG", None)
SAFETY_NET = 4 << 30  # the data segment each CLI process gets here: without the fix, an attack fails, never the machine


class Writes(torch.nn.Module):
    """Its scripted forward maps `target` shared and writes 65s into it (it creates the file if need be)."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        mapped = torch.from_file(self.target, True, 16)
        mapped.fill_(65.0)
        return self.fc(x + mapped.sum() * 0.0)


class Loops(torch.nn.Module):
    """Its scripted forward never ends (the count feeds the layer, so no pass drops the loop)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        i = 0
        while i >= 0:
            i += 1
        return self.fc(x + float(i))


class Prints(torch.nn.Module):
    """Its forward prints a forged report (scripted: C++ std::cout; pickled: Python's print)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        print('{"forged": 1}')
        return self.fc(x)


class LogsCalls(torch.nn.Module):
    """Its forward appends the process id and the batch size to a file."""

    def __init__(self, log: str):
        super().__init__()
        self.log = log
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {x.shape[0]}\n")
        return self.fc(x)


class Hoards(torch.nn.Module):
    """Its scripted forward keeps 100 tensors of 50 MB each (5 GB), one after the other."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        kept: List[torch.Tensor] = []
        for _ in range(100):
            kept.append(torch.ones(12_500_000) + x.sum())
        return self.fc(x + kept[-1][0])


def scripted(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


def onnx_model(path: Path, nodes: list, inputs: list, initializers: dict[str, np.ndarray]) -> Path:
    """A graph ending in a Gemm layer `fc` (8 -> 8) whose input is `r`."""
    rng = np.random.default_rng(0)
    initializers = {**initializers, "fc.weight": rng.normal(0, 0.3, (8, 8)).astype(np.float32),
                    "fc.bias": np.zeros(8, np.float32)}
    graph = helper.make_graph(nodes + [helper.make_node("Gemm", ["r", "fc.weight", "fc.bias"], ["y"], transB=1)], "g",
                              inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def onnx_endless_loop(path: Path) -> Path:
    """An ONNX Loop of 10^15 iterations (each an Identity) before the layer."""
    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []),
                 value("v_in", TensorProto.FLOAT, [1, 8])],
        [value("cond_out", TensorProto.BOOL, []), value("v_out", TensorProto.FLOAT, [1, 8])])
    return onnx_model(path, [helper.make_node("Loop", ["trips", "go", "x"], ["r"], body=body)],
                      [value("x", TensorProto.FLOAT, [1, 8])],
                      {"trips": np.array(10**15, dtype=np.int64), "go": np.array(True)})


def onnx_failing_gather(path: Path) -> Path:
    """A Gather whose index is out of range at run time: onnxruntime logs a coloured error line to fd 2."""
    return onnx_model(path, [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "idx"], ["g"]),
                             helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
                             helper.make_node("Add", ["x", "gf"], ["r"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                      {"idx": np.array([5], dtype=np.int64)})


def safety_net() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (SAFETY_NET, SAFETY_NET))


def initaudit(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI as a real process (its own file descriptors 1 and 2), within the safety net; `.pid` is its id."""
    command = [sys.executable, "-m", "initaudit.cli", *map(str, args)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                          preexec_fn=safety_net) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            process.kill()
    done = subprocess.CompletedProcess(command, process.returncode, out, err)
    done.pid = process.pid
    return done


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- trust

def test_torchscript_graph_runs_only_with_trust_code(cli, tmp_path):
    target = tmp_path / "victim"
    model = scripted(Writes(str(target)), tmp_path / "writes.pt")
    config = tmp_path / "initaudit.toml"
    config.write_text("trust-code = true\n")
    for extra in ([], ["--trust-pickle"]):
        result = cli("probe", model, *extra)
        assert result.exit_code == 2
        assert "--trust-code" in one_line(result.stderr) and "writes.pt" in result.stderr
    refused = cli("probe", model, "--config", config)
    assert refused.exit_code == 2 and "trust-code" in one_line(refused.stderr)  # a config file cannot grant it
    assert not target.exists()
    trusted = cli("probe", model, "--trust-code", "--format", "json")
    assert trusted.exit_code == 0, trusted.output
    assert target.read_bytes() == b"\x00\x00\x82\x42" * 16  # the attack is real: trusted, it ran (65.0 as float32)


def test_fix_probe_refuses_a_torchscript_file_before_writing_anything(cli, tmp_path):
    target, out = tmp_path / "victim", tmp_path / "fixed.pt"
    target.write_bytes(b"precious")
    model = scripted(Writes(str(target)), tmp_path / "writes.pt")
    result = cli("fix", model, "-o", out, "--all", "--probe")
    assert result.exit_code == 2
    assert "--trust-code" in one_line(result.stderr)
    assert target.read_bytes() == b"precious" and not out.exists()


def test_onnx_graph_runs_only_with_trust_code(cli, tmp_path):
    model = onnx_failing_gather(tmp_path / "gather.onnx")
    result = cli("probe", model)
    assert result.exit_code == 2 and "ONNX" in one_line(result.stderr) and "--trust-code" in result.stderr


# ---------------------------------------------------------------- limits

@pytest.mark.parametrize("make", [lambda folder: scripted(Loops(), folder / "loops.pt"),
                                  lambda folder: onnx_endless_loop(folder / "loop.onnx")],
                         ids=["scripted-while", "onnx-loop"])
def test_a_hung_graph_ends_at_the_time_limit_in_one_line(tmp_path, make):
    started = time.monotonic()
    result = initaudit("probe", make(tmp_path), "--trust-code", "--time-limit", 2, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    line = one_line(result.stderr)
    assert "2 s time limit" in line and "--time-limit" in line
    assert time.monotonic() - started < 60  # start-up (torch, twice) and 2 s, not the loop's end


def test_a_graph_that_hoards_memory_ends_at_the_memory_limit_in_one_line(tmp_path):
    result = initaudit("probe", scripted(Hoards(), tmp_path / "hoards.pt"), "--trust-code", "--memory-limit", "200MB")
    assert result.returncode == 2 and result.stdout == ""
    line = one_line(result.stderr)
    assert "200 MB memory limit" in line and "--memory-limit" in line


# ---------------------------------------------------------------- output

def test_a_scripted_print_never_reaches_stdout(tmp_path):
    model = scripted(Prints(), tmp_path / "prints.pt")
    result = initaudit("probe", model, "--trust-code", "--format", "json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout)  # the report and nothing else
    assert report["tool"] == "initaudit" and "forged" not in result.stdout and report["layers"][0]["scale"]
    shown = initaudit("probe", model, "--trust-code", "--format", "json", "--debug")
    assert json.loads(shown.stdout) == report
    assert '{"forged": 1}' in shown.stderr  # what the child printed, shown on stderr with --debug only


def test_a_pickled_module_runs_in_the_child_too(tmp_path):
    """--trust-pickle loads the module (and the loader traces it here); probe's batch runs in the child."""
    log = tmp_path / "calls"
    model = tmp_path / "logs.pt"
    torch.save(LogsCalls(str(log)), model)
    result = initaudit("probe", model, "--trust-pickle", "--batch", 64, "--format", "json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout)["layers"][0]["grad_norm"]  # forward and backward ran
    probed = [pid for pid, batch in (line.split() for line in log.read_text().splitlines()) if batch == "64"]
    assert probed and int(probed[0]) != result.pid


def test_onnxruntime_log_lines_never_precede_the_error(tmp_path):
    result = initaudit("probe", onnx_failing_gather(tmp_path / "gather.onnx"), "--trust-code")
    assert result.returncode == 2 and result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("initaudit: error:") and "onnxruntime failed" in line and "\x1b" not in result.stderr


# ---------------------------------------------------------------- building from config.json

def huge_vocabulary_folder(folder: Path, vocab_size: int) -> Path:
    """A 20 kB BERT folder whose config.json asks for `vocab_size` x 8 embeddings."""
    import contextlib
    import io

    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=16, max_position_embeddings=16)
    with contextlib.redirect_stderr(io.StringIO()):
        transformers.BertModel(config).save_pretrained(folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "vocab_size": vocab_size}))
    return folder


def test_a_config_asking_for_more_than_the_build_budget_is_refused(cli, tmp_path):
    folder = huge_vocabulary_folder(tmp_path / "bert", 400_000_000)  # 12.8 GB of embeddings
    result = cli("probe", folder, "--max-build-memory", "1GB")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "config.json" in line and "3,200,000,864 values" in line and "--max-build-memory" in line


def test_the_default_build_budget_is_a_share_of_the_ram(tmp_path):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    folder = huge_vocabulary_folder(tmp_path / "bert", ram // 8 // 4 * 2)  # twice the RAM, in float32
    result = initaudit("probe", folder)
    assert result.returncode == 2
    assert "--max-build-memory" in one_line(result.stderr)  # counted on the meta device: nothing was allocated


# ---------------------------------------------------------------- the flags

@pytest.mark.parametrize("text, size", [("512MB", 512 << 20), ("4GB", 4 << 30), ("1.5G", 3 << 29), ("800", 800 << 20),
                                        ("2GiB", 2 << 30), ("64k", 64 << 10)])
def test_memory_sizes_read_as_people_write_them(text, size):
    from initaudit.cli.options import Size

    assert Size().convert(text, None, None) == size


@pytest.mark.parametrize("flag, value", [("--memory-limit", "0"), ("--memory-limit", "lots"),
                                         ("--max-build-memory", "-1GB")])
def test_a_size_that_means_nothing_is_a_usage_error(cli, flag, value):
    result = cli("probe", "--model", "fixtures.depth_models:relu_kaiming", flag, value)
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert flag in line and "give a size such as 512MB or 4GB" in line
