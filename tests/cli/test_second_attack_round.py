"""The second attack round on issue 20's surfaces, each break a test: a TorchScript archive whose scripted
`__setstate__` runs on load, outputs over devices, FIFOs and links, a sandboxed run outliving its parent, config
pattern floods and ONNX node floods. Each test fails on the code before its fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from helpers import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str, cwd: Path = ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "initaudit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


class Marks(torch.nn.Module):
    """A scripted submodule whose __setstate__ writes 65s into `target` when torch.jit.load restores it."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.marker = 0

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[int, str, bool]:
        return (self.marker, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, str, bool]) -> None:
        self.target = state[1]
        self.marker = state[0] + int(torch.from_file(self.target, True, 16, dtype=torch.uint8).fill_(65).sum())
        self.training = state[2]


def setstate_archive(path: Path, target: Path) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), Marks(str(target)), torch.nn.Linear(16, 16))
    torch.jit.script(model).save(str(path))
    target.unlink(missing_ok=True)  # scripting ran nothing, saving ran __getstate__ only; be sure
    return path


@pytest.mark.parametrize("command", [["check"], ["fix", "--dry-run"], ["probe", "--trust-code"]])
def test_a_torchscript_archive_whose_setstate_runs_on_load_is_never_loaded(tmp_path, command):
    target = tmp_path / "written-by-the-archive"
    archive = setstate_archive(tmp_path / "model.pth", target)
    done = cli(*command, archive)
    assert done.returncode == 2 and "__setstate__" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not target.exists()


def test_a_plain_scripted_model_still_loads(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))).save(str(path))
    assert cli("check", path, "--format", "json").returncode == 0


def special_outputs(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    elsewhere = tmp_path / "report.json"
    elsewhere.write_text("kept")
    link = tmp_path / "link.json"
    link.symlink_to(elsewhere)
    found = {"fifo": fifo, "link": link, "descriptor link": tmp_path / "stdout"}
    found["descriptor link"].symlink_to("/proc/self/fd/1")
    try:
        os.mknod(tmp_path / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
        found["device"] = tmp_path / "null"
    except (PermissionError, OSError):
        pass  # not root: the FIFO and the links still stand for what -o must never replace
    return found


def test_an_output_never_replaces_a_device_a_fifo_or_a_link(tmp_path):
    model = ROOT / "fixtures" / "resnet_kaiming.pt"
    for name, target in special_outputs(tmp_path).items():
        before = os.lstat(target)
        done = cli("check", model, "-o", target, "--format", "json", timeout=120)
        after = os.lstat(target)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (name, done.stderr)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), name
    assert (tmp_path / "report.json").read_text() == "kept"


LOOP = """
import torch
class Spin(torch.nn.Module):
    def forward(self, x):
        while bool(x.sum() > -1.0):
            x = x + 1.0
        return x
torch.jit.script(Spin()).save({path!r})
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child ends with its parent on Linux")
def test_a_sandboxed_run_ends_with_the_initaudit_that_started_it(tmp_path):
    path = tmp_path / "spin.pt"
    script = tmp_path / "make_spin.py"  # TorchScript compiles from source: a file, not `python -c`
    script.write_text(LOOP.format(path=str(path)))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    parent = subprocess.Popen([sys.executable, "-m", "initaudit.cli", "probe", "--trust-code", "--input-shape", "4",
                               "--time-limit", "600", str(path)], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.monotonic() + 120
    while not children and time.monotonic() < deadline:  # the spawned child, once it runs
        time.sleep(0.5)
        children = [int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    assert children, "probe started no child"
    time.sleep(3)
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=60)
    time.sleep(2)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []


def test_a_flood_of_per_layer_patterns_is_refused_in_one_line(tmp_path):
    patterns = "".join(f'"blocks.{i}.*" = ["IA101"]\n' for i in range(5000))
    (tmp_path / "pyproject.toml").write_text(f"[tool.initaudit.per-layer-ignores]\n{patterns}")
    done = cli("check", ROOT / "fixtures" / "zero_layer_mlp.pt", cwd=tmp_path)
    assert done.returncode == 2 and "5,000 patterns" in done.stderr and len(done.stderr.splitlines()) == 1


def test_an_onnx_graph_of_more_nodes_than_the_cap_is_refused_before_the_checker(tmp_path, monkeypatch):
    from initaudit.common.errors import InputError
    from initaudit.load import onnx_file

    nodes = [helper.make_node("Identity", [f"x{i}"], [f"x{i + 1}"]) for i in range(60)]
    inner = helper.make_graph(nodes[:10], "body", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x10", TensorProto.FLOAT, [1])])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([*nodes[10:], branch], "g", [helper.make_tensor_value_info("x10", TensorProto.FLOAT, [1]),
                                                            helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("x60", TensorProto.FLOAT, [1])])
    path = tmp_path / "wide.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_file.node_count(onnx.load(str(path)).graph) == 50 + 1 + 2 * 10
    monkeypatch.setattr(onnx_file, "MAX_NODES", 70)
    with pytest.raises(InputError, match="71 graph nodes, more than the 70"):
        onnx_file.read(path)
