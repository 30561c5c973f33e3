"""The pre-commit hook: the manifest validates, and a hook built from it runs through pre-commit itself on a
temporary git repository holding a good and a bad checkpoint (offline: PRE_COMMIT_HOME in a temp folder,
a `repo: local` hook with `language: system` running this checkout's CLI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

FIXTURES = ROOT / "fixtures"
MANIFEST = ROOT / ".pre-commit-hooks.yaml"


def pre_commit() -> str:
    found = shutil.which("pre-commit") or str(Path(sys.executable).with_name("pre-commit"))
    if not Path(found).exists():
        pytest.skip("pre-commit is not installed (it comes with the `test` extra: pip install -e '.[test]')")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: pre-commit needs a git repository")
    return found


def env(home: Path) -> dict:
    return {**os.environ, "PRE_COMMIT_HOME": str(home / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "NO_COLOR": "1"}


def test_the_manifest_is_valid(tmp_path):
    done = subprocess.run([pre_commit(), "validate-manifest", str(MANIFEST)], capture_output=True, text=True,
                          env=env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (hook,) = yaml.safe_load(MANIFEST.read_text())
    assert hook["id"] == "initaudit" and hook["entry"] == "initaudit check" and hook.get("pass_filenames", True)
    pattern = re.compile(hook["files"])
    assert all(pattern.search(n) for n in ("m.pt", "a/b.safetensors", "x.onnx", "c.ckpt", "w.bin", "m.pth"))
    assert not any(pattern.search(n) for n in ("train.py", "README.md", "m.pt.txt"))


def test_the_hook_runs_through_pre_commit(tmp_path):
    exe = pre_commit()
    (hook,) = yaml.safe_load(MANIFEST.read_text())
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    shutil.copy(FIXTURES / "resnet_kaiming.pt", repo / "models" / "good.pt")
    shutil.copy(FIXTURES / "zero_layer_mlp.pt", repo / "models" / "bad.pt")
    (repo / "train.py").write_text("print('not a model')\n")
    # The published hook, as a local one: its entry run by this interpreter, its files pattern and settings.
    local = {**{k: hook[k] for k in ("id", "name", "files", "types", "require_serial")},
             "entry": f"{sys.executable} -m initaudit.cli {hook['entry'].split(' ', 1)[1]}", "language": "system"}
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [{"repo": "local", "hooks": [local]}]}))
    e = env(tmp_path)

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, env=e, check=True, capture_output=True, timeout=60)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")

    def hook_run(*files):
        return subprocess.run([exe, "run", "--color", "never", "--files", *files], cwd=repo, env=e,
                              capture_output=True, text=True, timeout=300)

    good = hook_run("models/good.pt", "train.py")
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"initaudit\.+Passed", good.stdout)
    both = hook_run("models/good.pt", "models/bad.pt", "train.py")
    assert both.returncode == 1, both.stdout + both.stderr
    assert re.search(r"initaudit\.+Failed", both.stdout)
    assert "models/bad.pt:4: IA101 zero-weights error: all 16384 weights are zero" in both.stdout
    assert "2 files, " in both.stdout and "train.py" not in both.stdout.split("Failed", 1)[1]


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
    shim = f'initaudit() {{ "{sys.executable}" -m initaudit.cli "$@"; }}\n'
    inputs = {"PATHS": "models/**/*.pt", "ARGS": "--fail-on error", "FORMAT": action["inputs"]["format"]["default"]}
    done = subprocess.run(["bash", "-c", shim + check["run"]], cwd=tmp_path, capture_output=True, text=True,
                          env={**env(tmp_path), **inputs}, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        "::error file=models/deep/bad.pt,title=IA101 zero-weights (4)::4: all 16384 weights are zero; every unit "
        "computes the same thing",
        "::notice file=models/good.pt,title=IA401 nonzero-bias (head)::head.bias: bias is not zero (|b| up to 0.161); "
        "the guide initializes biases to zero"]
