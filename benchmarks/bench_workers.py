"""`check --distributed` on 1, 2 and 4 torchrun workers: net throughput and each worker's bytes read, fp32 and bf16,
one process and weightlens beside, in one run.

    python benchmarks/bench_workers.py                   # 0.5 GB checkpoints, best of 2 runs
    python benchmarks/bench_workers.py --size 1 --repeat 3 --workers 1,2,4 --dir /scratch

Writes the GPT-like checkpoint of bench_check.py as a sharded fp32 safetensors folder (with its index), the same in
bf16 (twice the values in the same bytes), and an fp32 DCP folder, plus a tiny one of each. For each checkpoint it
prints a row for `initaudit check` in one process and one per worker count of `torchrun --nproc-per-node W -m
initaudit --debug check --distributed` (each rank logs the bytes it read): the best wall time, MB/s net of start-up
(the same command on the tiny checkpoint), CPU seconds of every process, the fewest and most bytes a worker read as
a share of the checkpoint's tensor bytes, and whether rank 0's JSON report is the one-process report byte for byte.
weightlens (`lens analyze --num-workers auto`, the `bench` extra) is timed beside, net of its own start-up, where it
is installed. On a machine of C cores, W > C workers share them: the figures then show the split's overhead, not a
speed-up. Nothing is asserted: the figures go in docs/scale.md#workers.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bf16 import lens_command, net  # noqa: E402
from bench_check import PYTHON, ROOT, layout, size_mb, write_dcp, write_sharded  # noqa: E402

CHECK = ["-m", "initaudit", "--debug", "check", "--format", "json"]


def write(folder: Path, gigabytes: float) -> dict[str, tuple[Path, Path]]:
    """label -> (checkpoint, tiny checkpoint of the same format and dtype)."""
    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        big = write_sharded(folder / f"gpt-{label}", layout(gigabytes, dtype), dtype, shards=4)
        tiny = write_sharded(folder / f"tiny-{label}", layout(0, dtype, width=64, vocab=512), dtype, shards=2)
        out[f"{label} sharded safetensors"] = (big, tiny)
    write_dcp(folder / "gpt-dcp", layout(gigabytes, torch.float32), torch.float32)
    write_dcp(folder / "tiny-dcp", layout(0, torch.float32, width=64, vocab=512), torch.float32)
    out["fp32 DCP"] = (folder / "gpt-dcp", folder / "tiny-dcp")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(path: Path, workers: int) -> list[str]:
    """`check` in this process's Python (workers 0), or under torchrun with `workers` ranks."""
    if workers == 0:
        return [PYTHON, *CHECK, str(path)]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *CHECK, "--distributed", str(path)]


def run(cmd: list[str]) -> tuple[float, float, str, dict[int, int]]:
    """Wall seconds, CPU seconds of every process it started, its stdout, and each rank's bytes read."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):  # 1: findings; anything else is a failed run, not a figure
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    read = {int(line.split()[1]): int(line.split()[5]) for line in done.stderr.splitlines()
            if line.startswith("rank ") and " read " in line}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout, read


def best(cmd: list[str], repeat: int) -> tuple[float, float, str, dict[int, int]]:
    """The best wall and CPU time of `repeat` runs; the last run's output and bytes (the same in every run)."""
    runs = [run(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[-1][2], runs[-1][3]


def lens_seconds(lens: str, path: Path, tiny: Path, repeat: int) -> tuple[float, float]:
    """weightlens's best wall time on the checkpoint and on the tiny one (its start-up)."""
    def timed(target: Path) -> float:
        walls = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run([lens, "analyze", "--num-workers", "auto", str(target)], capture_output=True)
            walls.append(time.perf_counter() - start)
        return min(walls)
    return timed(path), timed(tiny)


def tensor_mb(path: Path) -> float:
    """The checkpoint's bytes on disk (MB), its index or metadata included."""
    return size_mb(path.parent if path.name.endswith(".index.json") else path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=0.5, help="each checkpoint's size in GB")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", default="1,2,4", help="torchrun worker counts, comma-separated")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--without-lens", action="store_true", help="do not time weightlens, even where installed")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run still deletes its checkpoints
    folder = Path(tempfile.mkdtemp(prefix="initaudit-workers-", dir=args.dir))
    try:
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "initaudit")], stdout=subprocess.DEVNULL, check=True)
        files = write(folder, args.size)
        subprocess.run(["cat", *(str(p) for p in folder.rglob("*") if p.is_file())], stdout=subprocess.DEVNULL)
        lens = None if args.without_lens else lens_command()
        print(f"cores: {len(os.sched_getaffinity(0))}, load average at start: {os.getloadavg()[0]:.2f}; best of "
              f"{args.repeat} runs each, page cache warm")
        head = (f"{'checkpoint':24} {'MB':>6} {'run':>10} {'wall s':>7} {'start s':>7} {'net MB/s':>8} {'cpu s':>6} "
                f"{'bytes/worker (min-max share)':>28} {'report':>9}")
        print(head + "\n" + "-" * len(head), flush=True)
        for label, (path, tiny) in files.items():
            mb = tensor_mb(path)
            wall, cpu, alone, _ = best(command(path, 0), args.repeat)
            start = best(command(tiny, 0), args.repeat)[0]
            print(f"{label:24} {mb:6.0f} {'1 process':>10} {wall:7.2f} {start:7.2f} {_rate(net(mb, wall, start)):>8} "
                  f"{cpu:6.2f} {'-':>28} {'-':>9}", flush=True)
            for w in counts:
                wall, cpu, out, read = best(command(path, w), args.repeat)
                start = best(command(tiny, w), args.repeat)[0]
                total = sum(read.values()) or 1
                shares = f"{min(read.values()) / total:.2f}-{max(read.values()) / total:.2f} of {total / 1e6:.0f} MB"
                same = "identical" if out == alone else "DIFFERS"
                print(f"{'':24} {'':6} {f'{w} workers':>10} {wall:7.2f} {start:7.2f} {_rate(net(mb, wall, start)):>8} "
                      f"{cpu:6.2f} {shares:>28} {same:>9}", flush=True)
            if lens:
                lens_s, lens_start = lens_seconds(lens, path, tiny, args.repeat)
                print(f"{'':24} {'':6} {'weightlens':>10} {lens_s:7.2f} {lens_start:7.2f} "
                      f"{_rate(net(mb, lens_s, lens_start)):>8}", flush=True)
        if not lens:
            print("weightlens: not compared (--without-lens, or not installed: `pip install weightlens`, the `bench` extra)")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rate(rate: float | None) -> str:
    return f"{rate:.0f}" if rate is not None else "-"


if __name__ == "__main__":
    main()
