"""bf16 against fp32: `initaudit check`'s net throughput on the same model stored in each, and their ratio, in one run.

    python benchmarks/bench_bf16.py                      # 0.5 GB files, best of 5 interleaved runs
    python benchmarks/bench_bf16.py --size 1 --repeat 3 --dir /scratch

Writes the GPT-like checkpoint of bench_check.py as fp32 and as bf16 safetensors of about `--size` GB each (bytes
on disk, so the bf16 file holds twice the values), and a tiny one of each. For each it prints the best wall time of
`initaudit check` (page cache warm; the commands interleaved, so each sees the same load), MB/s net of start-up
(`check` of the tiny file of the same dtype), the same per CPU second (user + system time of every core: what a
busy machine hardly changes), peak RSS above that start-up and the largest tensor (the memory bound is start-up +
largest tensor + 300 MB), then the bf16/fp32 ratios of both net rates. Where numba (the `fast` extra) is
installed, the bf16 file is also checked with numba hidden (`bf16-f32`: the float32 pass it falls back to), so the
compiled pass's gain is measured in the same run. weightlens (`lens analyze`, the
`bench` extra) is timed beside, net of its own start-up, where it is installed; where not, the run says so.
Nothing is asserted: the figures go in docs/scale.md#performance.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_check import PYTHON, ROOT, layout, size_mb, write_safetensors  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
         "s = time.perf_counter() - t; sys.stderr.write(code.stderr.decode()[-500:]); "
         "use = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "print(code.returncode, s, use.ru_utime + use.ru_stime, use.ru_maxrss)")


def write(folder: Path, gigabytes: float) -> dict[str, tuple[Path, Path, float]]:
    """dtype label -> (checkpoint, tiny checkpoint, largest tensor in MB)."""
    out = {}
    for label, dtype in DTYPES.items():
        names = layout(gigabytes, dtype)
        largest = max(torch.Size(s).numel() for _, s in names) * dtype.itemsize / 1e6
        write_safetensors(folder / f"gpt-{label}.safetensors", names, dtype, 0)
        write_safetensors(folder / f"tiny-{label}.safetensors", layout(0, dtype, width=64, vocab=512), dtype, 0)
        out[label] = (folder / f"gpt-{label}.safetensors", folder / f"tiny-{label}.safetensors", largest)
    return out


def lens_command() -> str | None:
    found = shutil.which("lens") or str(Path(PYTHON).parent / "lens")
    return found if Path(found).exists() else None


def hide_numba(folder: Path) -> Path:
    """A folder whose `numba` package fails to import: first on PYTHONPATH, it makes initaudit fall back to the
    float32 pass."""
    (folder / "numba").mkdir(parents=True)
    (folder / "numba" / "__init__.py").write_text("raise ImportError('numba hidden by bench_bf16.py')\n")
    return folder


def measured(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system, every core) and peak RSS (MB) of one run of a command (a first
    item `HIDDEN=<folder>` puts that folder first on PYTHONPATH)."""
    path = [str(ROOT)]
    if cmd[0].startswith("HIDDEN="):
        path, cmd = [cmd[0].removeprefix("HIDDEN="), *path], cmd[1:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([PYTHON, "-c", PROBE, *cmd], capture_output=True, text=True, check=True, env=env)
    code, wall, cpu, peak_kib = done.stdout.split()
    if code not in ("0", "1"):  # 1: findings; anything else is a failed run, not a figure
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code}): {done.stderr.strip()}")
    return float(wall), float(cpu), int(peak_kib) / 1024


def best_of(commands: dict[str, list[str]], repeat: int) -> dict[str, tuple[float, float, float]]:
    """Best wall and CPU seconds and largest peak RSS (MB) of each command, the commands run in turn `repeat`
    times. The CPU time hardly depends on what else the machine runs; the wall time does."""
    best = {k: (float("inf"), float("inf"), 0.0) for k in commands}
    for _ in range(repeat):
        for key, cmd in commands.items():
            wall, cpu, rss = measured(cmd)
            best[key] = (min(best[key][0], wall), min(best[key][1], cpu), max(best[key][2], rss))
    return best


def net(mb: float, seconds: float, start: float) -> float | None:
    return mb / (seconds - start) if seconds - start > 0.02 else None


def commands(files: dict[str, tuple[Path, Path, float]], lens: str | None,
             hidden: Path | None) -> dict[str, list[str]]:
    check = [PYTHON, "-m", "initaudit.cli", "check", "--format", "json"]
    runs = {}
    for label, (path, tiny, _) in files.items():
        runs[f"{label} check"], runs[f"{label} start"] = [*check, str(path)], [*check, str(tiny)]
        if label == "bf16" and hidden:
            runs["bf16-f32 check"], runs["bf16-f32 start"] = ([f"HIDDEN={hidden}", *check, str(p)] for p in (path, tiny))
        if lens:
            analyze = [lens, "analyze", "--num-workers", "auto"]
            runs[f"{label} lens"], runs[f"{label} lens start"] = [*analyze, str(path)], [*analyze, str(tiny)]
    return runs


def report(files: dict[str, tuple[Path, Path, float]], best: dict[str, tuple[float, float, float]],
           lens: str | None) -> None:
    head = (f"{'file':8} {'MB':>6} {'check s':>7} {'start s':>7} {'net MB/s':>8} {'cpu s':>6} {'start cpu':>9} "
            f"{'net MB/cpu-s':>12} {'+RSS MB':>7} {'largest':>7}")
    head += f" {'lens s':>6} {'lens net MB/s':>13} {'lens net MB/cpu-s':>17}" if lens else ""
    print(head + "\n" + "-" * len(head))
    rates = {}
    rows = [*files.items()] + ([("bf16-f32", files["bf16"])] if "bf16-f32 check" in best else [])
    for label, (path, _, largest) in rows:
        mb = size_mb(path)
        (check_s, check_cpu, rss), (start_s, start_cpu, start_rss) = best[f"{label} check"], best[f"{label} start"]
        rates[label] = net(mb, check_s, start_s), net(mb, check_cpu, start_cpu)
        line = (f"{label:8} {mb:6.0f} {check_s:7.2f} {start_s:7.2f} {_shown(rates[label][0]):>8} {check_cpu:6.2f} "
                f"{start_cpu:9.2f} {_shown(rates[label][1]):>12} {rss - start_rss:7.0f} {largest:7.0f}")
        if lens and f"{label} lens" in best:
            (lens_s, lens_cpu, _), (lens_start, lens_start_cpu, _) = best[f"{label} lens"], best[f"{label} lens start"]
            line += (f" {lens_s:6.2f} {_shown(net(mb, lens_s, lens_start)):>13} "
                     f"{_shown(net(mb, lens_cpu, lens_start_cpu)):>17}")
        print(line)
    for label in ("bf16", "bf16-f32"):
        for i, what in enumerate(("net throughput (bytes/s)", "net throughput per CPU second")):
            if label in rates and rates["fp32"][i] and rates[label][i]:
                print(f"{label} / fp32 {what}: {rates[label][i] / rates['fp32'][i]:.2f}")
    if not lens:
        print("weightlens: not compared (--without-lens, or not installed: `pip install weightlens`, the `bench` extra)")


def _shown(rate: float | None) -> str:
    return f"{rate:.0f}" if rate is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=0.5, help="each checkpoint's size in GB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--without-lens", action="store_true", help="do not time weightlens, even where installed")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run still deletes its checkpoints
    folder = Path(tempfile.mkdtemp(prefix="initaudit-bf16-", dir=args.dir))
    try:
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "initaudit")], stdout=subprocess.DEVNULL, check=True)
        files = write(folder, args.size)
        subprocess.run(["cat", *(str(p) for p in folder.iterdir())], stdout=subprocess.DEVNULL)  # warm the page cache
        lens = None if args.without_lens else lens_command()
        print(f"cores: {len(os.sched_getaffinity(0))}, load average at start: {os.getloadavg()[0]:.2f}; best of "
              f"{args.repeat} interleaved runs each, page cache warm", flush=True)
        hidden = hide_numba(folder / "no-numba") if importlib.util.find_spec("numba") else None
        best = best_of(commands(files, lens, hidden), args.repeat)
        report(files, best, lens)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
