"""torch distributed checkpoints (DCP folders): read without a process group, the same verdicts as
the state_dict they hold, optimizer state left out but taken as evidence of training, and the
metadata pickle read with an allowlist (no code from the folder runs)."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import initaudit
from initaudit.cli import main
from initaudit.errors import InputError
from initaudit.loaders import load

dcp = pytest.importorskip("torch.distributed.checkpoint")


def net(zeroed: int | None = None) -> torch.nn.Sequential:
    torch.manual_seed(3)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(96, 96), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.zeros_(m.bias)
    if zeroed is not None:
        torch.nn.init.zeros_(model[zeroed].weight)
    return model


def save_dcp(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled…"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_dcp_folder_reads_like_its_state_dict(tmp_path):
    model = net(zeroed=4)
    folder = save_dcp({"model": model.state_dict()}, tmp_path / "ckpt")
    assert (folder / ".metadata").is_file() and any(folder.glob("__*_*.distcp"))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    from_dcp, from_pt = initaudit.audit(folder), initaudit.audit(tmp_path / "m.pt")
    assert from_dcp.format == "torch-dcp" and from_dcp.model == str(folder)
    assert [(r.name, r.std) for r in from_dcp.layers] == [(r.name, r.std) for r in from_pt.layers]
    assert from_dcp.by_rule() == from_pt.by_rule() and ("zero-weights", "4") in from_dcp.by_rule()


def test_optimizer_state_is_skipped_and_is_evidence_of_training(tmp_path):
    model = net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 96)).sum().backward()
    opt.step()
    folder = save_dcp({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt")
    loaded = load(folder)
    assert list(loaded.tensors) == list(model.state_dict())  # no optimizer tensor, the wrapper key stripped
    assert any("optimizer state" in n for n in loaded.notes)
    report = initaudit.audit(folder)
    assert any("optimizer state under 'optim'" in s for s in report.state_evidence["file_signs"])
    with_opt = load(folder, optimizer_state=True)  # asked for: audited under their own names
    assert torch.equal(with_opt.tensors["optim.state.0.exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_optimizer_state_asked_for_on_the_command_line_is_audited_for_nan_and_inf_only(tmp_path):
    """A NaN in Adam's second moment poisons the next step: --optimizer-state finds it. Zero moments (a
    parameter that got no gradient) and constant step counters are not init faults: no finding."""
    model = net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 96)).sum().backward()
    opt.step()
    state = opt.state_dict()
    state["state"][2]["exp_avg_sq"][3, 5] = float("nan")
    state["state"][0]["exp_avg"].zero_()
    folder = save_dcp({"model": model.state_dict(), "optim": state}, tmp_path / "ckpt")
    plain = CliRunner().invoke(main, ["check", str(folder), "--format", "json"])
    assert plain.exit_code == 0, plain.output
    assert not any(f["tensor"].startswith("optim.") for f in json.loads(plain.stdout)["findings"])
    asked = CliRunner().invoke(main, ["check", str(folder), "--format", "json", "--optimizer-state"])
    assert asked.exit_code == 1, asked.output
    report = json.loads(asked.stdout)
    on_optim = [(f["rule"], f["tensor"]) for f in report["findings"] if f["tensor"].startswith("optim.")]
    assert on_optim == [("non-finite", "optim.state.2.exp_avg_sq")]
    assert report["summary"]["layers"] == len(model) // 2  # optimizer tensors are not layers
    assert any("audited for NaN/Inf only" in n for n in report["notes"])
    assert ("non-finite", "optim.state.2") in initaudit.audit(folder, optimizer_state=True).by_rule()
    assert not any(layer.startswith("optim.") for _, layer in initaudit.audit(folder).by_rule())


def test_metadata_that_would_run_code_is_refused(tmp_path):
    folder = save_dcp({"model": net().state_dict()}, tmp_path / "ckpt")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError, match="not a distributed checkpoint's metadata") as err:
        load(folder)
    assert "\n" not in str(err.value) and not marker.exists()


def test_a_shard_file_outside_the_folder_is_refused(tmp_path):
    folder = save_dcp({"model": net().state_dict()}, tmp_path / "ckpt")
    from initaudit.loaders.dcp import read_metadata

    metadata = read_metadata(folder)
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(InputError, match="outside the model's folder|leads outside"):
        load(folder)


def test_a_tensor_saved_in_pieces_is_assembled(tmp_path):
    """Two ranks' row halves of one weight (as FSDP or tensor parallelism write them), merged by DCP's reader."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    folder = tmp_path / "ckpt"
    folder.mkdir()
    weight = torch.randn(64, 32) * (2 / 32) ** 0.5
    weight[40:48] = 0  # dead units in the second rank's half
    chunks, storage = [], {}
    for rank, rows in enumerate((slice(0, 32), slice(32, 64))):
        piece = weight[rows].clone()
        path = folder / f"__{rank}_0.distcp"
        torch.save(piece, path)
        offsets = torch.Size([rows.start, 0])
        chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=piece.shape))
        storage[MetadataIndex("fc.weight", offsets, rank)] = _StorageInfo(path.name, 0, path.stat().st_size)
    head = torch.randn(10, 64) * (1 / 64) ** 0.5  # fc is then a hidden layer, not the output
    torch.save(head, folder / "__2_0.distcp")
    storage[MetadataIndex("head.weight", torch.Size([0, 0]), 0)] = _StorageInfo(
        "__2_0.distcp", 0, (folder / "__2_0.distcp").stat().st_size)
    entries = {"fc.weight": TensorStorageMetadata(TensorProperties(dtype=torch.float32), weight.shape, chunks),
               "head.weight": TensorStorageMetadata(TensorProperties(dtype=torch.float32), head.shape,
                                                    [ChunkStorageMetadata(torch.Size([0, 0]), head.shape)])}
    (folder / ".metadata").write_bytes(pickle.dumps(Metadata(entries, storage_data=storage)))
    loaded = load(folder)
    assert torch.equal(loaded.tensors["fc.weight"], weight)
    assert ("dead-units", "fc") in initaudit.audit(folder, activation="relu").by_rule()


def test_optimizer_state_saved_by_fqn_with_scalar_steps_and_alone(tmp_path):
    """torch.distributed.checkpoint.state_dict.get_state_dict keys the state by parameter name
    (optim.state.0.weight.exp_avg) and keeps Adam's step as a 0-d tensor: an Inf step is found, on its
    tensor; a checkpoint of optimizer state alone is one clear error without the flag and audited with it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 96)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, state = get_state_dict(model, opt)
    state["state"]["0.weight"]["step"] = torch.tensor(float("inf"))
    folder = save_dcp({"model": weights, "optim": state}, tmp_path / "ckpt")
    report = initaudit.audit(folder, optimizer_state=True)
    assert [(f.rule, f.tensor) for f in report.findings if f.tensor.startswith("optim.")] == \
        [("non-finite", "optim.state.0.weight.step")]
    alone = save_dcp({"optim": state}, tmp_path / "alone")
    plain = CliRunner().invoke(main, ["check", str(alone)])
    assert plain.exit_code == 2 and "--optimizer-state" in plain.stderr and "Traceback" not in plain.output
    asked = CliRunner().invoke(main, ["check", str(alone), "--optimizer-state", "--format", "sarif"])
    assert asked.exit_code == 1 and [r["ruleId"] for r in json.loads(asked.stdout)["runs"][0]["results"]] == ["IA001"]
    text = CliRunner().invoke(main, ["check", str(alone), "--optimizer-state"]).stdout
    assert "(optimizer state under 'optim'" in text and "0 of 0 layers" not in text  # no layers to count


def test_optimizer_state_asked_of_a_file_that_is_not_a_distributed_checkpoint_says_so(tmp_path):
    """--optimizer-state reads a DCP folder's optimizer state; on a .pt holding an optimizer dict the note says
    it was not audited rather than leaving the user to think it was clean."""
    model = net()
    opt = torch.optim.Adam(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    result = CliRunner().invoke(main, ["check", str(tmp_path / "ckpt.pt"), "--optimizer-state", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert any(n.startswith("--optimizer-state audits a distributed checkpoint's optimizer state")
               for n in json.loads(result.stdout)["notes"])
    plain = CliRunner().invoke(main, ["check", str(tmp_path / "ckpt.pt"), "--format", "json"])
    assert not any("--optimizer-state" in n for n in json.loads(plain.stdout)["notes"])


def test_optimizer_state_under_a_training_loops_wrapper_is_optimizer_state(tmp_path):
    """Training loops save their state under a key of their own ({"app": {"model": ..., "optim": ...}}): the
    optimizer's tensors (app.optim.state.…) are still optimizer state, skipped, evidence of training and,
    asked for, audited for NaN/Inf only; its constant step counters and zero moments are no init finding."""
    model = net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 96)).sum().backward()
    opt.step()
    state = opt.state_dict()
    state["state"][0]["exp_avg"].zero_()
    state["state"][2]["exp_avg_sq"][0, 0] = float("inf")
    folder = save_dcp({"app": {"model": model.state_dict(), "optim": state}}, tmp_path / "ckpt")
    plain = initaudit.audit(folder)
    assert not any(".optim." in f.tensor for f in plain.findings)
    assert plain.state_evidence["file_signs"] == [f"optimizer state under 'optim' ({len(state['state'])} parameters)"]
    asked = initaudit.audit(folder, optimizer_state=True)
    assert [(f.rule, f.tensor) for f in asked.findings if ".optim." in f.tensor] == \
        [("non-finite", "app.optim.state.2.exp_avg_sq")]
