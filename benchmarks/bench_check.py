"""How fast `check` reads a large checkpoint, against simply reading its bytes.

    python benchmarks/bench_check.py [--mb 1024] [--format pt|safetensors]

Prints figures and ratios (no assertions): the target is an audit at the speed of reading the
file, with memory bounded by the largest tensor, not by the file.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
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
    path = folder / f"big.{'pt' if fmt == 'pt' else 'safetensors'}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    return path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--format", choices=["pt", "safetensors"], default="pt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.mb, args.format)
        size = path.stat().st_size / 2**20
        read_s, _ = timed(["cat", str(path)])  # warm the page cache, then measure
        read_s, _ = timed(["cat", str(path)])
        load_s, load_rss = timed([sys.executable, "-c",
                                  f"import torch; sd = torch.load({str(path)!r}, weights_only=True, mmap=True); "
                                  "sum(float(t.sum()) for t in sd.values())"] if args.format == "pt" else
                                 [sys.executable, "-c", f"from safetensors.torch import load_file; sd = load_file({str(path)!r}); "
                                  "sum(float(t.sum()) for t in sd.values())"])
        check_s, check_rss = timed([sys.executable, "-m", "initaudit.cli", "check", str(path), "--format", "json",
                                    "--activation", "relu"])
        print(f"file: {size:.0f} MiB ({args.format})")
        print(f"read bytes (cat, page cache): {read_s:6.2f} s  {size / read_s:8.0f} MiB/s")
        print(f"load + sum every tensor:      {load_s:6.2f} s  {size / load_s:8.0f} MiB/s  peak RSS {load_rss:.0f} MiB")
        print(f"initaudit check:              {check_s:6.2f} s  {size / check_s:8.0f} MiB/s  peak RSS {check_rss:.0f} MiB")
        print(f"ratio check / load+sum: {check_s / load_s:.2f}x   check RSS / file size: {check_rss / size:.2f}")


if __name__ == "__main__":
    main()
