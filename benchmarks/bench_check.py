"""How fast `initaudit check` reads large checkpoints, against a bare read of the same tensors, in one run.

    make bench                                   # or: python benchmarks/bench_check.py
    python benchmarks/bench_check.py --sizes 1 --repeat 3 --dir /scratch --keep

Writes transformer-shaped checkpoints (a GPT-like stack: token embedding, per block qkv / proj /
fc1 / fc2 and LayerNorms, normal(0, 0.02) weights) into a scratch folder: fp32 and bf16
safetensors, a torch .pt, a DCP folder and a sharded safetensors folder with its index, of 1 and
4 GB. For each it prints the best wall time of `--repeat` runs of `initaudit check` (page cache warm),
its MB/s gross and net of start-up (`check` of a tiny file of the same format), its peak RSS, the
ratio to a bare read (mmap every tensor and sum it once; DCP: dcp.load into place and sum), and
the time of weightlens (`lens analyze --num-workers auto`, one run) where it is installed (the
`bench` extra). initaudit's bytecode is compiled first, as installing it does (with
PYTHONDONTWRITEBYTECODE set, every run would compile it again). Nothing is asserted: the figures go
in the README's performance section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

VOCAB, WIDTH = 32000, 2048
PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def layout(gigabytes: float, dtype: torch.dtype, width: int = WIDTH,
           vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a GPT-like model of about `gigabytes` GB in `dtype` (at least one block)."""
    size = torch.empty(0, dtype=dtype).element_size()
    per_block = 12 * width * width + 13 * width
    blocks = max(1, round((gigabytes * 1e9 / size - vocab * width) / per_block))
    names = [("wte.weight", (vocab, width))]
    for b in range(blocks):
        p = f"h.{b}."
        names += [(p + "ln_1.weight", (width,)), (p + "ln_1.bias", (width,)),
                  (p + "attn.qkv.weight", (3 * width, width)), (p + "attn.qkv.bias", (3 * width,)),
                  (p + "attn.proj.weight", (width, width)), (p + "attn.proj.bias", (width,)),
                  (p + "ln_2.weight", (width,)), (p + "ln_2.bias", (width,)),
                  (p + "mlp.fc1.weight", (4 * width, width)), (p + "mlp.fc1.bias", (4 * width,)),
                  (p + "mlp.fc2.weight", (width, 4 * width)), (p + "mlp.fc2.bias", (width,))]
    return names + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


def draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if ".ln" in name or name.startswith("ln"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


_CODES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_safetensors(path: Path, names: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int) -> None:
    """A safetensors file written tensor by tensor (the header first), so no more than one tensor is in memory."""
    size = torch.empty(0, dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in names:
        n = size * int(torch.Size(shape).numel())
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in names:
            f.write(draw(name, shape, dtype, gen).reshape(-1).view(torch.uint8).numpy().tobytes())


def write_sharded(folder: Path, names, dtype: torch.dtype, shards: int) -> Path:
    """Shards and their index (returned: a folder without config.json is checked through its index)."""
    folder.mkdir()
    weight_map = {}
    for i in range(shards):
        part = names[i::shards] if i else [n for n in names[0::shards]]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / name, part, dtype, seed=i)
        weight_map.update({k: name for k, _ in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def write_torch(path: Path, names, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.save({n: draw(n, s, dtype, gen) for n, s in names}, path)


def write_dcp(folder: Path, names, dtype: torch.dtype) -> None:
    import torch.distributed.checkpoint as dcp

    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {n: draw(n, s, dtype, gen) for n, s in names}}, checkpoint_id=str(folder), no_dist=True)


BARE = {  # mmap every tensor and sum it once (DCP: read into place through DCP, then sum)
    "safetensors": """
import json, mmap, sys, torch
from pathlib import Path
p = Path(sys.argv[1]); files = sorted(p.glob('*.safetensors')) if p.is_dir() else [p]
dt = {'F32': torch.float32, 'BF16': torch.bfloat16}
total = 0.0
for f in files:
    with open(f, 'rb') as fh:
        n = int.from_bytes(fh.read(8), 'little'); header = json.loads(fh.read(n)); m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    for k, e in header.items():
        if k == '__metadata__': continue
        b, end = e['data_offsets']; d = dt[e['dtype']]
        total += float(torch.frombuffer(m, dtype=d, count=(end - b) // d.itemsize, offset=8 + n + b).sum())
print(total)
""",
    "pt": """
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
print(sum(float(t.sum()) for t in sd.values()))
""",
    "dcp": """
import sys, warnings, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
warnings.simplefilter('ignore')
md = FileSystemReader(sys.argv[1]).read_metadata()
sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items() if hasattr(v, 'size')}
dcp.load(sd, checkpoint_id=sys.argv[1], no_dist=True)
print(sum(float(t.sum()) for t in sd.values()))
""",
}

PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
         "s = time.perf_counter() - t; sys.stderr.write(code.stderr.decode()[-500:]); "
         "print(code.returncode, s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed(cmd: list[str], repeat: int) -> tuple[float, float]:
    """The best wall seconds of `repeat` runs and the largest peak RSS (MB) of a command, each in a fresh parent."""
    best, rss = float("inf"), 0.0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(repeat):
        done = subprocess.run([PYTHON, "-c", PROBE, *cmd], capture_output=True, text=True, check=True, env=env)
        code, seconds, peak_kib = done.stdout.split()
        if code not in ("0", "1"):  # 1: findings; anything else is a failed run, not a figure
            raise SystemExit(f"{' '.join(cmd)} failed (exit {code}): {done.stderr.strip()}")
        best, rss = min(best, float(seconds)), max(rss, int(peak_kib) / 1024)
    return best, rss


def size_mb(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 1e6


def cases(folder: Path, sizes: list[float]) -> list[tuple[str, str, Path, float]]:
    """(label, kind, path, largest tensor in MB) of every checkpoint, written into `folder`."""
    out = []
    for gb in sizes:
        tag = f"{gb:g}gb"
        f32, b16 = layout(gb, torch.float32), layout(gb, torch.bfloat16)
        largest = max(torch.Size(s).numel() for _, s in f32) * 4 / 1e6
        write_safetensors(folder / f"gpt-{tag}-fp32.safetensors", f32, torch.float32, 0)
        out.append((f"{tag} fp32 safetensors", "safetensors", folder / f"gpt-{tag}-fp32.safetensors", largest))
        write_safetensors(folder / f"gpt-{tag}-bf16.safetensors", b16, torch.bfloat16, 0)
        out.append((f"{tag} bf16 safetensors", "safetensors", folder / f"gpt-{tag}-bf16.safetensors", largest / 2))
        if gb <= 1:
            write_torch(folder / f"gpt-{tag}-fp32.pt", f32, torch.float32)
            out.append((f"{tag} fp32 .pt", "pt", folder / f"gpt-{tag}-fp32.pt", largest))
            write_dcp(folder / f"gpt-{tag}-fp32-dcp", f32, torch.float32)
            out.append((f"{tag} fp32 DCP", "dcp", folder / f"gpt-{tag}-fp32-dcp", largest))
        else:
            index = write_sharded(folder / f"gpt-{tag}-fp32-sharded", f32, torch.float32, shards=max(2, round(gb)))
            out.append((f"{tag} fp32 sharded", "safetensors", index, largest))
    tiny = layout(0, torch.float32, width=64, vocab=512)  # the same layers, 64 wide: 0.3 MB
    write_safetensors(folder / "tiny.safetensors", tiny, torch.float32, 0)
    write_torch(folder / "tiny.pt", tiny, torch.float32)
    write_dcp(folder / "tiny-dcp", tiny, torch.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4], help="checkpoint sizes in GB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run still deletes its checkpoints
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="initaudit-bench-", dir=args.dir))
    lens = shutil.which("lens") or (str(Path(PYTHON).parent / "lens") if (Path(PYTHON).parent / "lens").exists() else None)
    try:
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "initaudit")], stdout=subprocess.DEVNULL, check=True)
        print(f"writing checkpoints into {folder} …", flush=True)
        todo = cases(folder, args.sizes)
        print(f"cores: {len(os.sched_getaffinity(0))}, load average at start: {os.getloadavg()[0]:.2f}; best of "
              f"{args.repeat} interleaved runs each, page cache warm", flush=True)
        tiny = {"safetensors": folder / "tiny.safetensors", "pt": folder / "tiny.pt", "dcp": folder / "tiny-dcp"}
        check = [PYTHON, "-m", "initaudit.cli", "check"]
        head = (f"{'checkpoint':22} {'MB':>5} {'check s':>7} {'MB/s':>5} {'net MB/s':>8} {'RSS MB':>6} "
                f"{'+RSS':>5} {'largest':>7} {'bare s':>6} {'net MB/s':>8} {'ratio':>5} {'start s':>7} {'lens s':>6}")
        print(head + "\n" + "-" * len(head), flush=True)
        for label, kind, path, largest in todo:
            where = path.parent if path.name.endswith(".index.json") else path
            mb = size_mb(where)
            subprocess.run(["cat", *[str(p) for p in ([where] if where.is_file() else where.rglob("*")) if p.is_file()]],
                           stdout=subprocess.DEVNULL)  # warm the page cache
            runs = {"bare": [PYTHON, "-c", BARE[kind], str(where)], "check": [*check, str(path), "--format", "json"],
                    "start": [*check, str(tiny[kind]), "--format", "json"], "torch": [PYTHON, "-c", "import torch"]}
            best = {k: (float("inf"), 0.0) for k in runs}
            for _ in range(args.repeat):  # interleaved: every command sees the same load
                for k, cmd in runs.items():
                    seconds, rss = timed(cmd, 1)
                    best[k] = (min(best[k][0], seconds), max(best[k][1], rss))
            (bare_s, _), (check_s, rss), (start_s, start_rss), (torch_s, _) = (best[k] for k in runs)
            lens_s = "-"
            if lens:
                lens_s = f"{timed([lens, 'analyze', str(path), '--num-workers', 'auto'], 1)[0]:.2f}"
            print(f"{label:22} {mb:5.0f} {check_s:7.2f} {mb / check_s:5.0f} {_net(mb, check_s, start_s):>8} "
                  f"{rss:6.0f} {rss - start_rss:5.0f} {largest:7.0f} {bare_s:6.2f} {_net(mb, bare_s, torch_s):>8} "
                  f"{check_s / bare_s:5.2f} {start_s:7.2f} {lens_s:>6}", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        if not lens:
            print("lens s: weightlens is not installed (`pip install weightlens`, or the `bench` extra), not compared")
        print("net MB/s: size / (time - start-up), start-up being `check` of a tiny file of the same format for check and "
              "`import torch` for the bare read; +RSS: peak RSS above that tiny check; ratio: check / bare read")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _net(mb: float, seconds: float, start: float) -> str:
    """MB/s net of start-up ("-" where the difference is lost in the noise)."""
    return f"{mb / (seconds - start):.0f}" if seconds - start > 0.02 else "-"


if __name__ == "__main__":
    main()
