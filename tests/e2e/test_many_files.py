"""Many models in one run: files, walked folders (model files found by content), globs, exclusions; one
combined report in every format, and the worst exit code. `fix` over several files."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from fixtures import models
from helpers import FIXTURES, SARIF_SCHEMA
from helpers.cli import one_stderr_line, run
from helpers.formats import save_as
from initaudit.common.errors import InputError
from initaudit.load import discover
ZERO, CLEAN, XAVIER = (FIXTURES / n for n in ("zero_layer_mlp.pt", "deep_relu_mlp_kaiming.pt", "deep_relu_mlp_xavier.pt"))


def tree(tmp_path):
    """models/: a bad state_dict under an odd name, a clean safetensors, an HF folder, an excluded folder, a README
    and a zip that is no model; loose/: two files for a glob."""
    root = tmp_path / "models"
    (root / "runs" / "old").mkdir(parents=True)
    shutil.copy(ZERO, root / "runs" / "zero.weights")  # no model suffix: found by its content
    shutil.copy(ZERO, root / "runs" / "old" / "zero_old.pt")  # inside an excluded folder
    (root / ".git").mkdir()
    shutil.copy(ZERO, root / ".git" / "packed.pt")  # excluded by default, like ruff
    save_file({k: v.contiguous() for k, v in torch.load(CLEAN, weights_only=True).items()}, str(root / "clean.safetensors"))
    (root / "README.md").write_text("# models\n")
    with zipfile.ZipFile(root / "data.zip", "w") as z:
        z.writestr("x.txt", "not a model")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mlp", "hidden_act": "relu"}))
    save_file({k: v.contiguous() for k, v in models.zero_layer().state_dict().items()}, str(hf / "model.safetensors"))
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(XAVIER, loose / "a_xavier.pt")
    shutil.copy(CLEAN, loose / "b_clean.pt")
    (tmp_path / "ci.toml").write_text('[tool.initaudit]\nactivation = "relu"\nextend-exclude = ["old"]\n')
    return root, loose


def test_files_folders_and_globs_in_one_run(tmp_path, monkeypatch):
    root, loose = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["check", "models", "loose/*.pt", str(CLEAN), "--config", "ci.toml"]
    expected = [str(CLEAN), "loose/a_xavier.pt", "loose/b_clean.pt", "models/clean.safetensors", "models/hf",
                "models/runs/zero.weights"]

    data = json.loads(run(*args, "--format", "json").stdout)
    assert set(data) == {"tool", "version", "files", "unreadable", "skipped", "summary"}
    assert sorted(f["model"] for f in data["files"]) == sorted(expected)
    assert all({"model", "format", "layers", "findings", "summary"} <= set(f) for f in data["files"])
    errors = {f["model"]: f["summary"]["errors"] for f in data["files"]}
    assert errors["models/runs/zero.weights"] == errors["models/hf"] == 1
    # Xavier into a 12-layer ReLU run: the selection guide at its own word, an error on each of 11 layers
    assert errors["loose/a_xavier.pt"] == 11
    assert sum(errors.values()) == data["summary"]["errors"] == 13 and data["summary"]["files"] == 6
    assert data["summary"]["warnings"] == 0

    text = run(*args)
    assert text.exit_code == 1  # the worst: errors in three of the files
    lines = text.stdout.splitlines()
    assert "models/runs/zero.weights:4: IA101 zero-weights error: all 16384 weights are zero" in text.stdout
    assert sum(line.startswith("loose/a_xavier.pt:") and " IA" in line for line in lines) == 11
    assert sum(line.startswith(f"{model}: coverage: ") for model in expected for line in lines) == 6  # one a model
    assert lines[-1] == "6 files, 72 layers: 13 errors, 0 warnings, 0 infos"

    full = run(*args, "--format", "full").stdout
    assert all(f"{model} (" in full for model in expected)  # one table per model, titled by its path

    sarif = json.loads(run(*args, "--format", "sarif").stdout)
    (sarif_run,) = sarif["runs"]
    uris = [a["location"]["uri"] for a in sarif_run["artifacts"]]
    assert sorted(uris) == sorted(expected)
    for result in sarif_run["results"]:
        location = result["locations"][0]["physicalLocation"]["artifactLocation"]
        assert uris[location["index"]] == location["uri"]
    assert sorted({r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in sarif_run["results"]}) == \
        ["loose/a_xavier.pt", "models/hf", "models/runs/zero.weights"]
    if SARIF_SCHEMA.exists():  # the official schema lies in ../shared beside the main checkout
        pytest.importorskip("jsonschema").validate(sarif, json.loads(SARIF_SCHEMA.read_text()))

    assert run(*args, "--fail-on", "never").exit_code == 0
    assert run("check", "loose/b_clean.pt", "models/clean.safetensors", "--config", "ci.toml").exit_code == 0


def test_one_model_keeps_the_single_report_shape(tmp_path, monkeypatch):
    root, _ = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = json.loads(run("check", "models/hf", "--format", "json").stdout)
    assert data["model"] == "models/hf" and "files" not in data
    (only,) = discover.expand(["models/runs"], discover.Excluder(extend=["old"]))  # a folder holding one model
    assert str(only) == "models/runs/zero.weights"


def test_exclusions_replace_or_extend_the_defaults(tmp_path):
    root, _ = tree(tmp_path)
    found = {p.relative_to(root).as_posix() for p in discover.expand([root])}
    assert found == {"clean.safetensors", "hf", "runs/zero.weights", "runs/old/zero_old.pt"}
    found = {p.relative_to(root).as_posix() for p in discover.expand([root], discover.Excluder(["hf", "*.safetensors"]))}
    assert found == {".git/packed.pt", "runs/zero.weights", "runs/old/zero_old.pt"}
    explicit = root / "runs" / "old" / "zero_old.pt"  # a file named outright is checked even where excluded
    assert discover.expand([explicit], discover.Excluder(extend=["old"])) == [explicit]
    pattern = str(root / "runs" / "**" / "*.pt")
    assert discover.expand([pattern]) == [root / "runs" / "old" / "zero_old.pt"]
    with pytest.raises(InputError, match="no file matches it"):
        discover.expand([pattern], discover.Excluder(extend=["old"]))  # glob results are filtered too


def test_urls_pass_untouched_and_dcp_folders_are_one_model(tmp_path):
    urls = ["s3://bucket/run/*.pt", "hf://org/model", "https://example.org/m.safetensors?x=[1]"]
    assert discover.expand(urls) == urls
    dcp = tmp_path / "ckpt" / "step_100"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"\x80\x04meta")
    (dcp / "__0_0.distcp").write_bytes(b"\x00" * 16)
    assert discover.expand([tmp_path / "ckpt"]) == [dcp]
    assert discover.expand([dcp]) == [dcp]
    sharded = tmp_path / "sharded"  # shards with their index but no config.json: parts of one model, not models
    sharded.mkdir()
    for i in (1, 2):
        save_file({f"l{i}.weight": torch.randn(4, 4)}, str(sharded / f"model-0000{i}-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert discover.expand([tmp_path]) == [dcp, sharded]


def test_an_unreadable_model_is_reported_and_the_run_goes_on(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02not really a checkpoint")
    result = run("check", bad, CLEAN, "--format", "json")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("initaudit: error: ") and str(bad) in line
    data = json.loads(result.stdout)
    assert [f["model"] for f in data["files"]] == [str(CLEAN)]
    assert [e["path"] for e in data["unreadable"]] == [str(bad)] and data["summary"]["unreadable"] == 1
    assert run("check", tmp_path / "missing" / "*.pt").exit_code == 2
    missing = run("check", CLEAN, tmp_path / "missing.pt", "--format", "json")  # one PATH names nothing: the rest run
    assert missing.exit_code == 2 and "missing.pt: no such file" in missing.stderr
    assert [f["model"] for f in json.loads(missing.stdout)["files"]] == [str(CLEAN)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model files" in run("check", empty).stderr


def test_fix_several_files_beside_their_inputs_or_into_a_folder(tmp_path):
    a = save_as(models.zero_layer(), "state_dict", tmp_path)[0].rename(tmp_path / "a.pt")
    b = save_as(models.deep_relu_kaiming(), "state_dict", tmp_path)[0].rename(tmp_path / "b.pt")
    result = run("fix", a, b, "--activation", "relu", "--seed", 0)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fixed.pt", "a.pt", "b.pt"]  # b: nothing to fix, no file
    fixed = torch.load(tmp_path / "a.fixed.pt", weights_only=True)
    assert fixed["4.weight"].std() > 0.05
    assert run("check", tmp_path / "a.fixed.pt", "--activation", "relu").exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    assert run("fix", a, b, "--activation", "relu", "--seed", 0, "--output-dir", out).exit_code == 0
    assert [p.name for p in out.iterdir()] == ["a.pt"]
    assert (out / "a.pt").read_bytes() == (tmp_path / "a.fixed.pt").read_bytes()
    assert "--output-dir" in run("fix", a, b, "-o", tmp_path / "x.pt").stderr
    # the names fix chooses never replace a file: a second run refuses before writing anything
    before = {str(p): p.read_bytes() for p in (*tmp_path.glob("*.pt"), *out.iterdir())}
    for extra in ([], ["--output-dir", out]):
        again = run("fix", a, b, "--activation", "relu", "--seed", 1, *extra)
        assert again.exit_code == 2 and "already exists" in one_stderr_line(again)
    assert {str(p): p.read_bytes() for p in (*tmp_path.glob("*.pt"), *out.iterdir())} == before


def test_a_broken_checkpoint_in_a_walked_folder_is_reported_not_skipped(tmp_path):
    """A file named like a model whose bytes are no model (truncated, overwritten) fails the run: skipping it
    would let a corrupt checkpoint pass CI. Files without a model suffix are still judged by their bytes."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(CLEAN, folder / "good.pt")
    (folder / "truncated.pt").write_bytes(CLEAN.read_bytes()[:1000])  # a torch zip cut short
    (folder / "junk.safetensors").write_text("overwritten by a report")
    (folder / "notes.txt").write_text("not a model, not named like one")
    result = run("check", folder, "--format", "json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert [f["model"] for f in data["files"]] == [str(folder / "good.pt")]
    assert sorted(e["path"] for e in data["unreadable"]) == [str(folder / "junk.safetensors"), str(folder / "truncated.pt")]


def test_a_glob_takes_its_files_as_a_walk_does(tmp_path):
    """`models/*` is `models/` one level deep: a README beside the checkpoints is no unreadable model."""
    root, _ = tree(tmp_path)
    found = {p.relative_to(root).as_posix() for p in discover.expand([str(root / "*")])}
    assert found == {"clean.safetensors", "hf", "runs/zero.weights", "runs/old/zero_old.pt"}
    with pytest.raises(InputError, match="no model file matches"):
        discover.expand([str(root / "*.md")])


def test_a_checkpoint_folders_leftovers_without_weights_are_skipped_with_a_note(tmp_path):
    """A training run's folder holds optimizer and scheduler state and metadata beside the weights: in a run
    over several files they are noted and skipped, not failures; named alone, such a file is still an error."""
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "model.pt")
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save({"epoch": 3, "best": 0.5}, ckpt / "meta.pt")
    result = run("check", ckpt, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [f["model"] for f in data["files"]] == [str(ckpt / "model.pt")]
    assert sorted(e["path"] for e in data["skipped"]) == [str(ckpt / "meta.pt"), str(ckpt / "optimizer.pt")]
    assert data["summary"]["skipped"] == 2 and data["summary"]["unreadable"] == 0
    assert all(line.startswith("initaudit: note: skipped ") for line in result.stderr.splitlines())
    alone = run("check", ckpt / "optimizer.pt")
    assert alone.exit_code == 2 and "no state_dict found" in one_stderr_line(alone)
