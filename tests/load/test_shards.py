"""Sharded checkpoints: torch `.bin` shards with pytorch_model.bin.index.json (beside config.json or
not), a path to the index itself, and `fix` rewriting only the shards it must, streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import initaudit
from initaudit.repair import writers
from initaudit.pipeline import analyse, make_options
from initaudit.common.errors import InputError
from initaudit.repair.fixer import repair
from initaudit.load.dispatch import load

RNG = torch.Generator().manual_seed(41)


def mlp(zeroed: int | None = None, layers: int = 6) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(layers):
        state[f"blocks.{i}.weight"] = torch.randn(48, 48, generator=RNG) * (2 / 48) ** 0.5
        state[f"blocks.{i}.bias"] = torch.zeros(48)
    if zeroed is not None:
        state[f"blocks.{zeroed}.weight"].zero_()
    return state


def shard(state: dict[str, torch.Tensor], folder: Path, fmt: str, parts: int = 3) -> Path:
    """`state` split into `parts` shards with an index, as transformers' save_pretrained writes them."""
    folder.mkdir(exist_ok=True)
    keys = list(state)
    weight_map, ext = {}, "bin" if fmt == "bin" else "safetensors"
    for p in range(parts):
        name = f"{'pytorch_model' if fmt == 'bin' else 'model'}-{p + 1:05d}-of-{parts:05d}.{ext}"
        part = {k: state[k] for k in keys[p::parts]}
        torch.save(part, folder / name) if fmt == "bin" else save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    index = folder / ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded_folder_reads_like_one_file(tmp_path, fmt):
    state = mlp(zeroed=2)
    index = shard(state, tmp_path / "m", fmt)
    torch.save(state, tmp_path / "whole.pt")
    whole = initaudit.audit(tmp_path / "whole.pt")
    (index.parent / "config.json").write_text("{}")  # a folder is a model with its config.json
    for target in (index.parent, index):  # the folder, or the index itself
        report = initaudit.audit(target)
        assert [(r.name, r.std) for r in report.layers] == [(r.name, r.std) for r in whole.layers]
        assert report.by_rule() == whole.by_rule() and ("zero-weights", "blocks.2") in report.by_rule()
        assert report.format == "hf-folder"


def test_bin_shards_keep_their_prefixes(tmp_path):
    """A shard whose keys all start with 'model.' (LLaMA's) is read under the index's names."""
    state = {f"model.{k}": v for k, v in mlp().items()}
    index = shard(state, tmp_path / "m", "bin")
    assert sorted(load(index).tensors) == sorted(state)


def test_a_folder_holding_a_shard_index_is_one_model_to_walking_and_loading_alike(tmp_path):
    """The one model-folder rule (load/paths.folder_kind): a folder of shards and their index, without
    config.json, is read as its index names them, whether named itself, named by its index or met in a walk."""
    from initaudit.load import discover

    (tmp_path / "runs").mkdir()
    index = shard(mlp(), tmp_path / "runs" / "m", "bin")
    named = load(index.parent)
    assert sorted(named.tensors.shapes) == sorted(load(index).tensors.shapes) == sorted(mlp())
    assert discover.expand([str(tmp_path / "runs")]) == [index.parent]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="a folder without config.json, a shard index or a distributed checkpoint"):
        load(tmp_path / "empty")


def test_bin_shard_that_pickles_code_is_refused(tmp_path):
    index = shard(mlp(), tmp_path / "m", "bin")
    first = json.loads(index.read_text())["weight_map"]["blocks.0.weight"]
    torch.save({"blocks.0.weight": torch.nn.Linear(2, 2)}, tmp_path / "m" / first)
    with pytest.raises(InputError, match="loading it would run code"):
        initaudit.audit(index)


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    index = shard(mlp(), tmp_path / "m", "bin")
    torch.save({"x.weight": torch.randn(4, 4)}, tmp_path / "outside.bin")
    index.write_text(json.dumps({"weight_map": {"x.weight": "../outside.bin"}}))
    with pytest.raises(InputError, match="outside the model's folder"):
        initaudit.audit(index)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_fix_rewrites_only_the_shard_it_must(tmp_path, fmt):
    state = mlp(zeroed=4)
    index = shard(state, tmp_path / "m", fmt)
    (index.parent / "config.json").write_text("{}")
    analysis = analyse(load(index.parent), make_options())
    result = repair(analysis, seed=0)
    assert set(result.tensors) == {"blocks.4.weight"}
    out = tmp_path / "fixed"
    writers.write(analysis.loaded, result.tensors, out)
    weight_map = json.loads(index.read_text())["weight_map"]
    touched = weight_map["blocks.4.weight"]
    for name in set(weight_map.values()):
        before, after = index.parent / name, out / name
        if name != touched:
            assert after.read_bytes() == before.read_bytes()
            continue
        read = (lambda p: torch.load(p, weights_only=True)) if fmt == "bin" else load_file
        new, old = read(after), read(before)
        assert set(new) == set(old) and float(new["blocks.4.weight"].std()) > 0.05
        assert all(torch.equal(new[k], old[k]) for k in old if k != "blocks.4.weight")
    assert not initaudit.audit(out).by_rule() & {("zero-weights", "blocks.4")}
