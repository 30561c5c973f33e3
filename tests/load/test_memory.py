"""Bounded memory: `check` and `fix` on a checkpoint a hundred times larger than its largest tensor
hold about one tensor at a time, not the file (mapped pages are handed back as tensors are
measured or written). Peak RSS is measured in a child process (getrusage(RUSAGE_CHILDREN)) against
the same command on a small file of the same format, so imports and start-up cancel out."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT

LAYERS, WIDTH = 100, 1024          # 100 fp32 weights of 4 MiB: a 400 MiB file
LARGEST = WIDTH * WIDTH * 4
SLACK = 96 << 20                    # working memory beyond the tensors in flight (stats, reports, allocator)
RSS_PROBE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def state(layers: int, width: int, zeroed: int | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    out = {}
    for i in range(layers):
        out[f"blocks.{i}.weight"] = torch.randn(width, width, generator=gen) * (2 / width) ** 0.5
        out[f"blocks.{i}.bias"] = torch.zeros(width)
    if zeroed is not None:
        out[f"blocks.{zeroed}.weight"].zero_()
    return out


def write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".pt":
        torch.save(tensors, path)
    elif path.suffix == ".safetensors":
        save_file(tensors, path)
    else:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(tensors, checkpoint_id=str(path), no_dist=True)
    return path


def peak_rss(*args: str) -> int:
    """Peak RSS in bytes of `python -m initaudit.cli ARGS` run in a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "initaudit.cli", *args]
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], env=env, capture_output=True, text=True)
    code, peak = out.stdout.split()
    assert code in ("0", "1"), out.stderr[-2000:]  # clean, or findings (the planted zeroed layer)
    return int(peak) * 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small and a large checkpoint per format, written once for the module."""
    folder = tmp_path_factory.mktemp("memory")
    large, made = state(LAYERS, WIDTH, zeroed=LAYERS // 2), {}

    def get(suffix: str) -> tuple[Path, Path]:
        if suffix not in made:
            made[suffix] = (write(state(2, 64, zeroed=1), folder / f"small{suffix}"), write(large, folder / f"large{suffix}"))
        return made[suffix]
    return get


def _growth(files, suffix: str, command: str, *flags: str) -> int:
    """How much more the command's peak RSS is on the large file than on the small one."""
    peaks = []
    for model in files(suffix):
        out = ["-o", str(model.with_name(f"{model.stem}-fixed{suffix}"))] if command == "fix" else []
        peaks.append(peak_rss(command, str(model), *out, *flags))
    return peaks[1] - peaks[0]


@pytest.mark.parametrize("suffix", [".safetensors", pytest.param(".pt", marks=pytest.mark.slow),
                                    pytest.param(".dcp", marks=pytest.mark.slow)])
def test_check_holds_one_tensor_not_the_file(files, suffix):
    grown = _growth(files, suffix, "check", "--format", "json")
    limit = (2 if suffix == ".dcp" else 1) * LARGEST + SLACK  # DCP reads a tensor, then copies it into place
    assert grown < limit, f"{grown >> 20} MiB more than on a small file (the file is {LAYERS * LARGEST >> 20} MiB)"


@pytest.mark.parametrize("suffix", [".pt", pytest.param(".safetensors", marks=pytest.mark.slow)])
def test_fix_holds_the_replaced_tensors_and_one_more(files, suffix):
    grown = _growth(files, suffix, "fix", "--seed", "0")
    assert grown < 2 * LARGEST + SLACK, f"{grown >> 20} MiB more than on a small file"
    fixed = files(suffix)[1].with_name(f"large-fixed{suffix}")
    assert fixed.stat().st_size > LAYERS * LARGEST
