"""`probe --input-batch FILE`: the user's batch (a tensor, or a dict of tensors: keyword inputs, `labels` kept
apart) instead of the synthetic one, read with weights_only (a pickled object is refused, never run), handed to
the child process that runs a TorchScript or ONNX file's graph."""

from __future__ import annotations

import json
import pathlib
import warnings

import pytest
import torch

from fixtures import depth_models
from helpers.cli import one_stderr_line
from helpers.formats import export_onnx

SCALE = 100.0  # the given batch's RMS: tanh saturates, so what the second layer puts out is about 1/SCALE of it


def rows(result) -> dict[str, dict]:
    assert result.exit_code in (0, 1), result.output
    return {row["name"]: row for row in json.loads(result.stdout)["layers"]}


def loud_batch(path: pathlib.Path, n: int = 16) -> pathlib.Path:
    torch.save(SCALE * torch.randn(n, depth_models.INPUTS, generator=torch.Generator().manual_seed(1)), path)
    return path


@pytest.fixture(scope="module")
def synthetic():
    from helpers.cli import run

    return rows(run("probe", "--model", "fixtures.depth_models:tanh_xavier", "--format", "json"))


def assert_loud(measured: dict[str, dict], synthetic: dict[str, dict]) -> None:
    """The given batch was the one measured: the first tanh saturated, the second layer's RMS ~1/SCALE of it."""
    assert measured["0"]["saturated_fraction"] > 0.9 > 0.05 > synthetic["0"]["saturated_fraction"]
    assert measured["2"]["scale"] < 3 / SCALE < synthetic["2"]["scale"]


def test_a_tensor_is_the_one_positional_input(cli, tmp_path, synthetic):
    result = cli("probe", "--model", "fixtures.depth_models:tanh_xavier", "--format", "json",
                 "--input-batch", loud_batch(tmp_path / "batch.pt"))
    assert_loud(rows(result), synthetic)
    assert json.loads(result.stdout)["inputs"] == f"(16, {depth_models.INPUTS}) from {tmp_path / 'batch.pt'}"


def test_a_dict_is_keyword_inputs_with_labels_kept_apart(cli, tmp_path):
    """tiny_bert (a transformers BertModel, whose forward takes no `labels`): eight copies of one sentence are one
    input eight times, so every layer's outputs point one way."""
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(2)).repeat(8, 1)
    path = tmp_path / "tokens.pt"
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(8, dtype=torch.long)},
               path)
    result = cli("probe", "--model", "fixtures.depth_models:tiny_bert", "--format", "json", "--input-batch", path)
    data = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert data["inputs"] == f"(8, 12), (8, 12) from {path}" and data["input_cosine"] is None
    assert all(row["cosine"] == pytest.approx(1.0, abs=1e-6) for row in data["layers"])
    synthetic = json.loads(cli("probe", "--model", "fixtures.depth_models:tiny_bert", "--format", "json").stdout)
    assert min(row["cosine"] for row in synthetic["layers"]) < 0.9  # different sentences point different ways


class Touch:
    """Unpickling this creates a file: the proof that the file's code ran."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.mark.parametrize("payload, says", [
    (lambda tmp: Touch(tmp / "ran"), "read without running code"),
    (lambda tmp: {"input_ids": torch.zeros(4, 3), "note": "hello"}, "'note': str"),
    (lambda tmp: [torch.zeros(4, 3)], "a list"),
    (lambda tmp: {"labels": torch.zeros(4)}, "only 'labels'"),
    (lambda tmp: {"input_ids": torch.zeros(4, 3), "attention_mask": torch.ones(5, 3)}, "differ"),
    (lambda tmp: torch.zeros(1, 64), "at least 2"),
])
def test_what_is_not_a_batch_of_tensors_is_refused_in_one_line(cli, tmp_path, payload, says):
    path = tmp_path / "batch.pt"
    torch.save(payload(tmp_path), path)
    result = cli("probe", "--model", "fixtures.depth_models:tanh_xavier", "--input-batch", path)
    assert result.exit_code == 2
    line = one_stderr_line(result)
    assert str(path) in line and says in line
    assert not (tmp_path / "ran").exists()


def test_the_batch_is_the_files_so_shape_and_size_flags_do_not_go_with_it(cli, tmp_path):
    path = loud_batch(tmp_path / "batch.pt")
    for flags in (("--batch", "8"), ("--input-shape", "64")):
        result = cli("probe", "--model", "fixtures.depth_models:tanh_xavier", "--input-batch", path, *flags)
        assert result.exit_code == 2 and "--input-batch is the batch" in one_stderr_line(result)


def test_a_torchscript_files_graph_gets_the_batch_in_its_child_process(cli, tmp_path, synthetic):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(depth_models.tanh_xavier()).save(str(path))
    result = cli("probe", path, "--trust-code", "--format", "json", "--input-batch", loud_batch(tmp_path / "b.pt"))
    assert_loud(rows(result), synthetic)


def test_an_onnx_model_of_fixed_batch_takes_the_batch_in_runs(cli, tmp_path, synthetic):
    """Exported at a batch of 2: the 16 samples run as 8 batches; 15 do not split."""
    path = export_onnx(depth_models.tanh_xavier(), tmp_path / "model.onnx")
    result = cli("probe", path, "--trust-code", "--format", "json", "--input-batch", loud_batch(tmp_path / "b.pt"))
    assert_loud(rows(result), synthetic)
    assert json.loads(result.stdout)["inputs"].endswith("in 8 runs")
    odd = cli("probe", path, "--trust-code", "--input-batch", loud_batch(tmp_path / "odd.pt", n=15))
    assert odd.exit_code == 2 and "not a multiple" in one_stderr_line(odd)
