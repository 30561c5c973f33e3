"""How long a torch distributed checkpoint of many small tensors takes to read, and in how many reads.

    python benchmarks/bench_dcp_metadata.py                       # 200,000 tensors
    python benchmarks/bench_dcp_metadata.py --entries 20000 --audit --dir /scratch --keep

Writes a DCP folder of `--entries` tiny tensors (2x3 float32, as a mixture-of-experts checkpoint's many
norms and biases are) with torch.distributed.checkpoint.save, then prints: the time to read and check its
metadata (`initaudit.load.dispatch.load`), the time to read every tensor through initaudit's batched reader and
the number of reads the storage reader made, and, for comparison, the cost per tensor of one `dcp.load`
per tensor over the whole metadata (what initaudit did before: quadratic in the number of tensors),
measured on `--sample` tensors. `--audit` also times a whole `initaudit check`. Nothing is asserted: the
figures go in the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from initaudit.load.dispatch import load  # noqa: E402 - after the path is set
from initaudit.load.dcp import checked_reader, read_metadata  # noqa: E402


def write(folder: Path, entries: int) -> float:
    state = {f"layers.{i}.norm.weight": torch.full((2, 3), float(i)) for i in range(entries)}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    return time.perf_counter() - start


def count_reads() -> list[int]:
    """Every read of the storage reader, as the number of tensors it read."""
    reads: list[int] = []
    read_data = FileSystemReader.read_data

    def counted(self, plan, planner):
        reads.append(len(plan.items))
        return read_data(self, plan, planner)

    FileSystemReader.read_data = counted
    return reads


def per_tensor_before(folder: Path, sample: int) -> float:
    """Seconds per tensor of one dcp.load per tensor, each planned over the whole metadata."""
    metadata = read_metadata(folder)
    names = list(metadata.state_dict_metadata)[:sample]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            md = metadata.state_dict_metadata[name]
            dcp.load({name: torch.empty(tuple(md.size), dtype=md.properties.dtype)},
                     storage_reader=checked_reader(folder, metadata), no_dist=True)
    return (time.perf_counter() - start) / len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--sample", type=int, default=200, help="tensors timed the old way, one load each")
    parser.add_argument("--audit", action="store_true", help="also time a whole `initaudit check`")
    parser.add_argument("--dir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-dcp-"))
    folder = scratch / "ckpt"
    try:
        print(f"{args.entries:,} tensors written in {write(folder, args.entries):.1f} s")
        reads = count_reads()
        start = time.perf_counter()
        loaded = load(folder)
        checked = time.perf_counter() - start
        start = time.perf_counter()
        for key in loaded.tensors:
            loaded.tensors[key]
        read = time.perf_counter() - start
        print(f"metadata read and checked: {checked:.2f} s")
        print(f"every tensor read: {read:.2f} s ({read / args.entries * 1e6:.0f} us a tensor) in {len(reads)} reads "
              f"of at most {max(reads)} tensors")
        before = per_tensor_before(folder, args.sample)
        print(f"before (one load per tensor over the whole metadata): {before * 1e3:.1f} ms a tensor, "
              f"{before * args.entries / 60:.0f} min for {args.entries:,}")
        if args.audit:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", str(folder), "--quiet"],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            print(f"initaudit check: {time.perf_counter() - start:.1f} s, exit {done.returncode}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch)
        else:
            print(f"kept: {folder}")


if __name__ == "__main__":
    main()
