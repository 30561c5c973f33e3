"""Where models are found and which links are followed: Hugging Face cache snapshots (files linking into the
repository's blobs/) are read, links leaving the cached repository are refused; globs never follow folder
links and audit each file once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from helpers import ROOT
from helpers.cli import one_stderr_line, run
from initaudit.load.dispatch import load

REVISION = "0123456789abcdef0123456789abcdef01234567"
TENSORS = 41  # the glob test's file count: one per tensor a link used to multiply


def tiny_bert(folder: Path) -> Path:
    """A BERT of two layers as `save_pretrained` writes it (config.json and model.safetensors), one layer zeroed."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    model = BertModel(config)
    torch.nn.init.zeros_(model.encoder.layer[0].intermediate.dense.weight)
    model.save_pretrained(folder)
    return folder


def blob_name(data: bytes, lfs: bool) -> str:
    """The name huggingface_hub gives a blob: its ETag, the sha256 of an LFS file, the git blob sha1 of others."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """`source`'s files laid out as huggingface_hub caches them; returns the snapshot folder.

    models--org--name/blobs/<etag> holds the bytes, snapshots/<revision>/<file> is a relative link to
    its blob, refs/main names the revision."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / REVISION
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / blob_name(data, lfs=file.suffix == ".safetensors")
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / file.relative_to(source)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def snapshot(tmp_path) -> Path:
    """A cached tiny BERT, checked to be a layout huggingface_hub itself recognises."""
    cache = tmp_path / "hub"
    found = hub_cache(cache, "org/tiny-bert", tiny_bert(tmp_path / "saved"))
    (repo,) = scan_cache_dir(cache).repos
    assert (repo.repo_id, repo.nb_files) == ("org/tiny-bert", 2)
    assert [r.commit_hash for r in repo.revisions] == [REVISION] and not scan_cache_dir(cache).warnings
    return found


def report(*args) -> dict:
    """The JSON report of `check`, without the model's own name."""
    result = run("check", *args, "--format", "json")
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.stdout)
    data.pop("model")
    return data


# ---------------------------------------------------------------- Hugging Face cache snapshots

def test_a_cache_snapshot_is_read_like_the_folder_it_caches(snapshot, tmp_path):
    storage = snapshot.parents[1]
    loaded = load(snapshot)
    blobs = sorted(p.resolve() for p in (storage / "blobs").iterdir())
    assert sorted(loaded.files[1:]) == blobs  # config.json and the weights, read through their links
    assert report(snapshot) == report(tmp_path / "saved")
    assert report(snapshot / "model.safetensors") == report(tmp_path / "saved" / "model.safetensors")


def test_fix_reads_a_snapshot_and_copies_its_linked_files(snapshot, tmp_path):
    out = tmp_path / "fixed"
    result = run("fix", snapshot, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "config.json").read_bytes() == (snapshot / "config.json").read_bytes()
    zeroed = "encoder.layer.0.intermediate.dense.weight"
    assert [f["tensor"] for f in report(snapshot)["findings"] if f["rule"] == "zero-weights"] == [zeroed]
    assert not [f for f in report(out)["findings"] if f["rule"] == "zero-weights"]


def redirect(pointer: Path, target: Path) -> Path:
    pointer.unlink()
    pointer.symlink_to(os.path.relpath(target, pointer.parent))
    return pointer


def sibling_repo(snapshot: Path) -> Path:
    """The snapshot of another cached repository beside this one (models--other--repo)."""
    return hub_cache(snapshot.parents[2], "other/repo", snapshot.parents[3] / "saved")


LINKS_OUT = {  # which snapshot file is redirected, and to what
    "weights into another cached repo": ("model.safetensors", lambda s: sibling_repo(s) / "model.safetensors"),
    "weights outside the cache": ("model.safetensors", lambda s: shutil.copy(
        s / "model.safetensors", s.parents[3] / "elsewhere.safetensors")),
    "config into another cached repo": ("config.json", lambda s: sibling_repo(s) / "config.json"),
    "config to /etc/passwd": ("config.json", lambda s: Path("/etc/passwd")),
}


@pytest.mark.parametrize("case, typed", [(case, "folder") for case in LINKS_OUT]
                         + [(case, "file") for case in LINKS_OUT if case.startswith("weights")])
def test_a_snapshot_link_leaving_its_repo_is_refused_naming_it(case, typed, snapshot):
    name, target = LINKS_OUT[case]
    pointer = snapshot / name
    real = target(snapshot).resolve()
    pointer.unlink()
    pointer.symlink_to(os.path.relpath(real, pointer.parent))  # relative, as huggingface_hub links
    result = run("check", snapshot if typed == "folder" else pointer)
    line = one_stderr_line(result)
    assert result.exit_code == 2
    assert f"{pointer}: leads outside the cached model's folder {snapshot.parents[1].resolve()};" in line


def adapter_repo(cache: Path) -> Path:
    """A cached PEFT adapter: adapter_config.json and adapter_model.safetensors, no config.json."""
    saved = cache.parent / "adapter"
    saved.mkdir()
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"base_model.model.fc.lora_A.weight": torch.randn(4, 32) * 0.1,
               "base_model.model.fc.lora_B.weight": torch.zeros(32, 4)}, str(saved / "adapter_model.safetensors"))
    return hub_cache(cache, "org/lora", saved)


def test_walking_a_cache_audits_each_snapshot_once_and_no_blob_or_marker(snapshot):
    """`check ~/.cache/huggingface/hub`: the snapshots' models, through their links; not the blobs they name
    (hash-named copies of the same bytes) nor the empty files huggingface_hub leaves in .no_exist/."""
    cache = snapshot.parents[2]
    adapter = adapter_repo(cache)
    marker = adapter.parents[1] / ".no_exist" / REVISION / "model.safetensors"  # looked for, not on the Hub
    marker.parent.mkdir(parents=True)
    marker.touch()
    weights = adapter / "adapter_model.safetensors"
    assert audited(cache.parent, "hub") == sorted(str(p.relative_to(cache.parent)) for p in (snapshot, weights))
    assert audited(cache.parent, "hub/**/*.safetensors") == sorted(
        str(p.relative_to(cache.parent)) for p in (snapshot / "model.safetensors", weights))


def test_only_links_may_reach_the_blobs_not_names_in_an_index(snapshot):
    """A shard index naming ../../blobs/<hash> (a path, not a link) leaves the snapshot: refused."""
    blob = (snapshot / "model.safetensors").resolve()
    index = {"weight_map": {k: f"../../blobs/{blob.name}" for k in load(snapshot).tensors}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    (snapshot / "model.safetensors").unlink()
    result = run("check", snapshot)
    line = one_stderr_line(result)
    assert result.exit_code == 2
    assert f"index.json: refers to '../../blobs/{blob.name}', outside the model's folder" in line


# ---------------------------------------------------------------- globs: no folder links, each file once

def linked_tree(tmp: Path, *links: tuple[str, str]) -> Path:
    """d/m.pt and d/sub/n.pt (a small state_dict each), plus the links given as (name in d, target)."""
    (tmp / "d" / "sub").mkdir(parents=True)
    for name in ("m.pt", "sub/n.pt"):
        torch.save({"fc.weight": torch.randn(8, 8) * 0.5}, tmp / "d" / name)
    for name, target in links:
        (tmp / "d" / name).symlink_to(target)
    return tmp / "d"


def audited(tmp: Path, *args: str) -> list[str]:
    """The models `check` audits, in a child process (a glob that loops must not hang the test run)."""
    done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", *args, "--format", "json"], cwd=tmp,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode in (0, 1) and not done.stderr, done.stderr
    data = json.loads(done.stdout)
    return sorted(f["model"] for f in data["files"]) if "files" in data else [data["model"]]


def test_a_glob_with_two_links_back_to_its_folder_ends(tmp_path):
    linked_tree(tmp_path, ("a", "."), ("b", "."))
    assert audited(tmp_path, "d/**/*.pt") == ["d/m.pt", "d/sub/n.pt"]


def test_a_glob_audits_a_file_once_through_a_link_back(tmp_path):
    linked_tree(tmp_path, ("again", "."))
    assert audited(tmp_path, "d/**/*.pt") == ["d/m.pt", "d/sub/n.pt"]
    assert audited(tmp_path, "d/*/*.pt") == ["d/sub/n.pt"]


def test_a_glob_does_not_follow_a_link_out_of_its_tree(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"fc.weight": torch.randn(8, 8)}, elsewhere / "secret.pt")
    linked_tree(tmp_path, ("out", "../elsewhere"), ("file.pt", "../elsewhere/secret.pt"))
    assert audited(tmp_path, "d/**/*.pt") == ["d/m.pt", "d/sub/n.pt"]
    assert audited(tmp_path, "d/*") == ["d/m.pt", "d/sub/n.pt"]
    result = run("check", tmp_path / "d" / "out" / "*.pt")  # the pattern's own fixed folders may be links
    assert result.exit_code in (0, 1) and "secret.pt" in result.stdout
    assert one_stderr_line(run("check", tmp_path / "d" / "o*" / "*.pt")).endswith("no file matches it as a pattern)")


def test_a_file_named_twice_is_audited_once(tmp_path):
    linked_tree(tmp_path, ("alias.pt", "m.pt"))
    (tmp_path / "top.pt").symlink_to("d/m.pt")
    assert audited(tmp_path, "d/m.pt", "top.pt", "d/*.pt") == ["d/m.pt"]
    assert audited(tmp_path, "top.pt", "d") == ["d/sub/n.pt", "top.pt"]
