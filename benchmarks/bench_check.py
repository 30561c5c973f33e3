"""How fast `check` reads a large checkpoint, against simply reading its bytes.

    python benchmarks/bench_check.py [--mb 1024] [--format pt|safetensors|onnx] [--fix]

Prints figures and ratios (no assertions): the target is an audit at the speed of reading the
file, with memory bounded by the largest tensor, not by the file. ONNX is written with its
tensors as external data (as models of that size are). `--fix` also times `initaudit fix --all`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_checkpoint(folder: Path, megabytes: int, fmt: str) -> Path:
    """A deep MLP-like state_dict of about `megabytes` MB (float32, 2048-wide layers)."""
    width = 2048
    per_layer = width * width * 4
    layers = max(1, megabytes * 2**20 // per_layer)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"blocks.{i}.weight"] = torch.randn(width, width, generator=gen) * (2 / width) ** 0.5
        state[f"blocks.{i}.bias"] = torch.zeros(width)
    path = folder / f"big.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    elif fmt == "safetensors":
        save_file(state, path)
    else:
        _save_onnx(state, layers, width, path)
    return path


def _save_onnx(state: dict[str, torch.Tensor], layers: int, width: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("Gemm", [prev, f"blocks.{i}.weight", f"blocks.{i}.bias"], [f"h{i}"], transB=1))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        prev = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])],
                              [numpy_helper.from_array(t.numpy(), k) for k, t in state.items()])
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="big.onnx.data")


LOAD_AND_SUM = {
    "pt": "sd = torch.load({path!r}, weights_only=True, mmap=True); sum(float(t.sum()) for t in sd.values())",
    "safetensors": "from safetensors.torch import load_file; sd = load_file({path!r}); sum(float(t.sum()) for t in sd.values())",
    "onnx": "import onnx; from onnx import numpy_helper; m = onnx.load({path!r}); "
            "sum(float(numpy_helper.to_array(t).sum()) for t in m.graph.initializer)",
}


def timed(cmd: list[str], repeat: int = 3) -> tuple[float, float]:
    """The best wall seconds of `repeat` runs, and the peak RSS (MiB), of one command (each measured by a fresh parent)."""
    runs = [_timed_once(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _timed_once(cmd: list[str]) -> tuple[float, float]:
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True).stdout
    seconds, peak_kib = out.split()
    return float(seconds), int(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--format", choices=["pt", "safetensors", "onnx"], default="pt")
    parser.add_argument("--fix", action="store_true", help="also time `initaudit fix --all` (writes a copy)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.mb, args.format)
        files = [str(p) for p in Path(tmp).iterdir()]
        size = sum(Path(f).stat().st_size for f in files) / 2**20
        read_s, _ = timed(["cat", *files])  # warm the page cache, then measure
        read_s, _ = timed(["cat", *files])
        load_s, load_rss = timed([sys.executable, "-c", "import torch, initaudit.cli; " +
                                  LOAD_AND_SUM[args.format].format(path=str(path))])
        start_s, start_rss = timed([sys.executable, "-c", "import torch, initaudit.cli"])
        check_s, check_rss = timed([sys.executable, "-m", "initaudit.cli", "check", str(path), "--format", "json",
                                    "--activation", "relu"])
        print(f"file: {size:.0f} MiB ({args.format})")
        print(f"read bytes (cat, page cache): {read_s:6.2f} s  {size / read_s:8.0f} MiB/s")
        print(f"load + sum every tensor:      {load_s:6.2f} s  {size / load_s:8.0f} MiB/s  peak RSS {load_rss:.0f} MiB")
        print(f"initaudit check:              {check_s:6.2f} s  {size / check_s:8.0f} MiB/s  peak RSS {check_rss:.0f} MiB")
        print(f"start-up (import torch, initaudit): {start_s:.2f} s, {start_rss:.0f} MiB; net of it:")
        net_load, net_check = load_s - start_s, check_s - start_s
        print(f"  load + sum {size / net_load:6.0f} MiB/s, check {size / net_check:6.0f} MiB/s, "
              f"ratio check / load+sum {net_check / net_load:.2f}x")
        print(f"peak RSS above start-up / file size: {(check_rss - start_rss) / size:.2f} "
              "(mmap'ed pages of the file count in RSS)")
        if args.fix:
            fixed = Path(tmp) / f"fixed.{args.format}"
            fix_s, fix_rss = timed(repeat=1, cmd=[sys.executable, "-m", "initaudit.cli", "fix", str(path), "-o", str(fixed),
                                    "--all", "--seed", "0", "--activation", "relu"])
            print(f"initaudit fix --all:          {fix_s:6.2f} s  {size / fix_s:8.0f} MiB/s  peak RSS {fix_rss:.0f} MiB")


if __name__ == "__main__":
    main()
