"""torch distributed checkpoints (DCP folders): read without a process group, the same verdicts as
the state_dict they hold, optimizer state left out but taken as evidence of training, and the
metadata pickle read with an allowlist (no code from the folder runs)."""

from __future__ import annotations

import json
import math
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import initaudit
from initaudit.cli.main import main
from initaudit.common.errors import InputError
from initaudit.load.dispatch import load

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
    from initaudit.load.dcp import read_metadata

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


# ---------------------------------------------------------------- hostile metadata, damaged shards, many tensors

def _hostile(tmp_path: Path, change) -> Path:
    """A real DCP folder whose metadata `change(metadata, first_tensor_entry)` rewrote before it was pickled."""
    from initaudit.load.dcp import read_metadata

    folder = save_dcp({"model": net().state_dict()}, tmp_path / "ckpt")
    metadata = read_metadata(folder)
    change(metadata, metadata.state_dict_metadata["model.0.weight"])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


def _set(name: str, value):
    return lambda metadata, md: setattr(md, name, value)


def _chunk(**fields):
    def change(metadata, md):
        for name, value in fields.items():
            setattr(md.chunks[0], name, value)
    return change


def _storage(change):
    def rewrite(metadata, md):
        index = next(i for i in metadata.storage_data if i.fqn == "model.0.weight")
        change(metadata.storage_data, index)
    return rewrite


def _moved(storage: dict, index) -> None:
    """The piece's record filed under another offset: the piece itself is stored nowhere."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage[MetadataIndex(index.fqn, (1, 0))] = storage.pop(index)


HOSTILE = {  # how the metadata lies -> what the one line says
    "a size of 2^50": (_set("size", torch.Size([2 ** 50])), "model.0.weight claims 4,503,599,627,370,496 bytes, "
                                                            "more than this machine's memory"),
    "a negative size": (_set("size", torch.Size([-1, 96])), "its shape is not a list of at most 64 non-negative sizes"),
    "a string dtype": (lambda m, md: setattr(md.properties, "dtype", "float32"),
                       "its dtype is of type 'str', not a torch dtype"),
    "a hundred dimensions": (_set("size", torch.Size([1] * 100)), "its shape is not a list of at most 64"),
    "a shape of strings": (_set("size", ["96", "96"]), "its shape is not a list"),
    "a piece outside the shape": (_chunk(offsets=torch.Size([90, 0])), "a piece of it lies outside its shape (96, 96)"),
    "pieces that are no list": (_set("chunks", 5), "its pieces are not a list of at most its 1 storage records"),
    "a piece listed 100,000 times": (lambda m, md: setattr(md, "chunks", md.chunks * 100_000),
                                     "its pieces are not a list of at most its 1 storage records"),
    "a piece stored nowhere": (_storage(_moved), "a piece of it is stored nowhere"),
    "a piece longer than its storage": (_storage(lambda storage, index: setattr(storage[index], "length", 10)),
                                        "a piece of it claims more bytes than its 10 stored"),
    "storage past the end of its file": (_storage(lambda storage, index: setattr(storage[index], "offset", 10 ** 9)),
                                         "model.0.weight is stored past the end of __0_0.distcp"),
    "a negative storage offset": (_storage(lambda storage, index: setattr(storage[index], "offset", -5)),
                                  "malformed storage records"),
    "storage records that are no dict": (lambda m, md: setattr(m, "storage_data", [1, 2]), "malformed storage records"),
    "a shape far beyond its pieces": (_set("size", torch.Size([5000, 5000])), "more than its shard files hold"),
    "a compressed piece": (_storage(lambda storage, index: setattr(storage[index], "transform_descriptors",
                                                                   ["stream.zstd/1"])),
                           "model.0.weight is stored compressed or transformed"),
    "an entry named by a number": (lambda m, md: m.state_dict_metadata.update({5: md}),
                                   "an entry's name is of type 'int'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_metadata_claims_are_checked_before_anything_is_allocated(case, tmp_path):
    change, fragment = HOSTILE[case]
    folder = _hostile(tmp_path, change)
    result = CliRunner().invoke(main, ["check", str(folder)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"initaudit: error: {folder / '.metadata'}: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr and "internal error" not in result.stderr


def test_a_damaged_shard_is_one_line_not_dcps_traceback(tmp_path):
    """DCP wraps the failure in its CheckpointException, a BaseException that `except Exception` misses."""
    folder = save_dcp({"model": net().state_dict()}, tmp_path / "ckpt")
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[100:-100] = bytes(len(data) - 200)  # same length: the metadata's offsets still hold
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["check", str(folder)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"initaudit: error: {folder}: model.") and result.stderr.count("\n") == 1
    assert " cannot be read (UnpicklingError: " in result.stderr and "weights_only" not in result.stderr  # torch's
    # advice to load without weights_only never reaches the user


def test_an_interrupt_inside_dcp_is_still_an_interrupt(tmp_path, monkeypatch):
    """DCP turns a KeyboardInterrupt raised while it reads into a CheckpointException: initaudit gives it back."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = save_dcp({"model": net().state_dict()}, tmp_path / "ckpt")

    def interrupted(self, plan, planner):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    result = CliRunner().invoke(main, ["check", str(folder)])
    assert result.exit_code == 130 and result.stderr.split() == ["initaudit:", "aborted"]  # click's word for ^C


def test_any_base_exception_a_library_raises_is_one_line_but_exits_keep_their_code(tmp_path, monkeypatch):
    """The command line's last net: a library's BaseException that got past every precise handler is one line,
    exit 2; SystemExit keeps its code."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    folder = save_dcp({"model": net().state_dict()}, tmp_path / "ckpt")

    def failing(*args):
        raise CheckpointException("load", {0: (EOFError("shard"), traceback.StackSummary())})

    monkeypatch.setattr("initaudit.load.dcp.check", failing)
    result = CliRunner().invoke(main, ["check", str(folder)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr == ("initaudit: internal error: CheckpointException: CheckpointException ranks:dict_keys([0]) "
                             "(run with --debug for the traceback, and please report it)\n")
    monkeypatch.setattr("initaudit.load.dcp.check", lambda *args: sys.exit(3))
    assert CliRunner().invoke(main, ["check", str(folder)]).exit_code == 3


def _counting_reads(monkeypatch) -> list[int]:
    """Every read the storage reader makes, as the number of storage records the metadata it was given holds."""
    from torch.distributed.checkpoint import FileSystemReader

    records: list[int] = []
    read_data = FileSystemReader.read_data

    def counted(self, plan, planner):
        records.append(len(self.storage_data))
        return read_data(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", counted)
    return records


def test_many_tensors_are_read_in_batches_with_metadata_cut_to_the_batch(tmp_path, monkeypatch):
    """Structural, not timed: 3,000 tensors take ceil(3000 / BATCH_TENSORS) reads, each planned over its batch's
    metadata alone (one read per tensor over the whole metadata was quadratic: minutes for 20,000 tensors)."""
    from initaudit.load.dcp import BATCH_TENSORS

    state = {f"layers.{i}.weight": torch.full((2, 3), float(i)) for i in range(3000)}
    folder = save_dcp(state, tmp_path / "ckpt")
    records = _counting_reads(monkeypatch)
    loaded = load(folder)
    assert all(torch.equal(loaded.tensors[k], state[k]) for k in loaded.tensors)
    assert len(records) == math.ceil(3000 / BATCH_TENSORS) and max(records) <= BATCH_TENSORS
    assert initaudit.audit(folder).summary["layers"] == 3000


def test_read_ahead_stays_within_its_bytes_whatever_order_tensors_are_asked_in(tmp_path, monkeypatch):
    monkeypatch.setattr("initaudit.load.dcp.BATCH_BYTES", 10 * 24)  # ten 2x3 float32 tensors a read...
    monkeypatch.setattr("initaudit.load.dcp.READ_AHEAD_BYTES", 25 * 24)  # ...25 read ahead at most
    state = {f"layers.{i}.weight": torch.full((2, 3), float(i)) for i in range(100)}
    folder = save_dcp(state, tmp_path / "ckpt")
    records = _counting_reads(monkeypatch)
    loaded = load(folder)
    reader = loaded.container.reader
    for key in reversed(list(loaded.tensors)):  # the last first: what is read ahead waits, within its bound
        assert torch.equal(loaded.tensors[key], state[key])
        assert reader.waiting <= 25 * 24
    assert len(records) < 100 and max(records) <= 10
