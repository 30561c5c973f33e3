"""The shipped pre-commit hook and GitHub Action, run as a user pastes them. The README's pre-commit snippet goes
into a fresh repository whose `repo:` is a local git repository holding the shipped `.pre-commit-hooks.yaml`
(committed: pre-commit clones it at `rev:` like the published one) and pre-commit itself runs it, offline:
PRE_COMMIT_HOME in a temp folder, an `initaudit` first on PATH that runs this checkout's CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import FIXTURES, ROOT
from helpers.readme_snippets import action_step, precommit_repo

MANIFEST = ROOT / ".pre-commit-hooks.yaml"
BAD_FINDING = "models/bad.pt:4: IA101 zero-weights error: all 16384 weights are zero"
QUIET_GIT = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def pre_commit() -> str:
    found = shutil.which("pre-commit") or str(Path(sys.executable).with_name("pre-commit"))
    if not Path(found).exists():
        pytest.skip("pre-commit is not installed (it comes with the `test` extra: pip install -e '.[test]')")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: pre-commit needs a git repository")
    return found


def env(home: Path, path: str | None = None) -> dict:
    return {**os.environ, "PRE_COMMIT_HOME": str(home / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            **QUIET_GIT, "NO_COLOR": "1", "PATH": path or os.environ.get("PATH", "")}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          env={**os.environ, **QUIET_GIT}, check=True, capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def hook_repository(where: Path) -> tuple[Path, str]:
    """A git repository standing in for the published one: the shipped manifest, committed. Returns its path and
    HEAD. With `language: system` pre-commit needs nothing else from it (it installs nothing)."""
    where.mkdir()
    shutil.copy(MANIFEST, where / MANIFEST.name)
    git(where, "init", "-q")
    git(where, "add", ".")
    git(where, "commit", "-q", "-m", "hooks")
    return where, git(where, "rev-parse", "HEAD")


def consumer_repository(where: Path, hooks: Path, rev: str) -> Path:
    """A fresh repository with the README's pre-commit snippet (its `repo:` and `rev:` pointed at `hooks`), a good
    and a bad checkpoint and a script the hook must not read, all committed."""
    entry = {**precommit_repo(), "repo": str(hooks), "rev": rev}
    (where / "models").mkdir(parents=True)
    (where / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [entry]}))
    shutil.copy(FIXTURES / "resnet_kaiming.pt", where / "models" / "good.pt")
    shutil.copy(FIXTURES / "zero_layer_mlp.pt", where / "models" / "bad.pt")
    (where / "train.py").write_text("print('not a model')\n")
    git(where, "init", "-q")
    git(where, "add", ".")
    git(where, "commit", "-q", "-m", "models")
    return where


def initaudit_shim(folder: Path) -> Path:
    """An `initaudit` executable that runs this checkout's CLI with this interpreter (what `pip install` puts on
    PATH)."""
    folder.mkdir()
    shim = folder / "initaudit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m initaudit.cli "$@"\n')
    shim.chmod(0o755)
    return folder


def run_all(exe: str, repo: Path, home: Path, path: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "run", "--all-files", "--color", "never"], cwd=repo, env=env(home, path),
                          capture_output=True, text=True, timeout=300)


def test_the_manifest_is_valid(tmp_path):
    done = subprocess.run([pre_commit(), "validate-manifest", str(MANIFEST)], capture_output=True, text=True,
                          env=env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (hook,) = yaml.safe_load(MANIFEST.read_text())
    assert hook["id"] == "initaudit" and hook["entry"] == "initaudit check" and hook.get("pass_filenames", True)
    # pre-commit builds no environment of its own (a `python` hook would pip-install torch into it).
    assert hook["language"] == "system" and "additional_dependencies" not in hook
    pattern = re.compile(hook["files"])
    assert all(pattern.search(n) for n in ("m.pt", "a/b.safetensors", "x.onnx", "c.ckpt", "w.bin", "m.pth"))
    assert not any(pattern.search(n) for n in ("train.py", "README.md", "m.pt.txt"))


def test_the_readme_snippet_runs_the_shipped_hook(tmp_path):
    exe = pre_commit()
    hooks, rev = hook_repository(tmp_path / "hooks")
    repo = consumer_repository(tmp_path / "repo", hooks, rev)
    path = f"{initaudit_shim(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}"

    both = run_all(exe, repo, tmp_path, path)
    assert both.returncode == 1, both.stdout + both.stderr
    assert re.search(r"initaudit\.+Failed", both.stdout)
    assert BAD_FINDING in both.stdout
    assert "2 files, " in both.stdout and "train.py" not in both.stdout.split("Failed", 1)[1]

    git(repo, "rm", "-q", "models/bad.pt")
    git(repo, "commit", "-q", "-m", "drop the bad model")
    good = run_all(exe, repo, tmp_path, path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"initaudit\.+Passed", good.stdout)


def test_without_initaudit_installed_the_hook_says_so(tmp_path):
    """The trade-off of `language: system`: the hook runs the `initaudit` on PATH, and says so when there is none."""
    exe = pre_commit()
    path = str(Path(shutil.which("git")).parent)
    if shutil.which("initaudit", path=path):
        pytest.skip(f"an initaudit is installed beside git ({path}): cannot run without one on PATH")
    hooks, rev = hook_repository(tmp_path / "hooks")
    repo = consumer_repository(tmp_path / "repo", hooks, rev)
    done = run_all(exe, repo, tmp_path, path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Executable `initaudit` not found" in done.stdout


def run_check_step(where: Path, inputs: dict) -> subprocess.CompletedProcess:
    """action.yml's last step, run by bash in `where` as the runner would, with `initaudit` this checkout's CLI."""
    check = yaml.safe_load((ROOT / "action.yml").read_text())["runs"]["steps"][-1]
    shim = f'initaudit() {{ "{sys.executable}" -m initaudit.cli "$@"; }}\n'
    return subprocess.run(["bash", "-c", shim + check["run"]], cwd=where, capture_output=True, text=True,
                          env={**env(where), **inputs}, timeout=300)


def test_the_readme_workflow_runs_the_action(tmp_path):
    """The README's workflow step, its `with:` inputs over action.yml's defaults, fails on a bad model."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    given = {**{k: v.get("default", "") for k, v in action["inputs"].items()}, **action_step().get("with", {})}
    (tmp_path / "models").mkdir()
    shutil.copy(FIXTURES / "zero_layer_mlp.pt", tmp_path / "models" / "bad.pt")
    shutil.copy(FIXTURES / "resnet_kaiming.pt", tmp_path / "models" / "good.pt")
    done = run_check_step(tmp_path, {"PATHS": given["paths"], "ARGS": given["args"], "FORMAT": given["format"]})
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("::error file=models/bad.pt,title=IA101 zero-weights (4)::")


def test_the_github_action_runs_its_check_step(tmp_path):
    """action.yml is a composite action whose inputs reach the shell as variables (never pasted into the
    script); its check step, run here by bash, annotates findings (--format github) and leaves globs to initaudit."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite" and action["inputs"]["format"]["default"] == "github"
    steps = action["runs"]["steps"]
    assert all("${{" not in step["run"] for step in steps)  # no expression expanded into shell code
    check = steps[-1]
    assert check["shell"] == "bash" and "initaudit check" in check["run"]
    models = tmp_path / "models"
    (models / "deep").mkdir(parents=True)
    shutil.copy(FIXTURES / "zero_layer_mlp.pt", models / "deep" / "bad.pt")
    shutil.copy(FIXTURES / "resnet_kaiming.pt", models / "good.pt")
    inputs = {"PATHS": "models/**/*.pt", "ARGS": "--fail-on error", "FORMAT": action["inputs"]["format"]["default"]}
    done = run_check_step(tmp_path, inputs)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        "::error file=models/deep/bad.pt,title=IA101 zero-weights (4)::4: all 16384 weights are zero; every unit "
        "computes the same thing",
        "::notice file=models/good.pt,title=IA401 nonzero-bias (head)::head.bias: bias is not zero (|b| up to 0.161); "
        "the guide initializes biases to zero"]
