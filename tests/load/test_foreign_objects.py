"""Training checkpoints whose hyper-parameters pickle objects of classes initaudit does not import (OmegaConf
configs, argparse namespaces, dataclasses, enums, numpy scalars, Lightning's AttributeDict) are audited without
--trust-pickle: those objects are read as inert placeholders, never imported and never called, and named in a
note; their weights are audited as any state_dict's. A pickle naming callables only code execution needs is still
refused, naming every one of them.

The checkpoints are written in a subprocess from real classes in a temporary folder: an `omegaconf` package
whose DictConfig pickles the globals and opcodes omegaconf 2.3's does (NEWOBJ and BUILD of DictConfig,
ContainerMetadata, AnyNode and Metadata, a REDUCE of `collections.defaultdict(dict)`, `typing.Any` and `dict` as
values; compared with the real package's pickletools disassembly), and a `trainlib` of a user's own classes.
Importing either package, or running any of their code, writes a file into that folder: the tests' proof that
nothing of the checkpoint was imported or run. The folder stays importable while initaudit reads."""

from __future__ import annotations

import json
import pickletools
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from initaudit.load import foreign, torch_files

# Every file the checkpoint's classes write when their module is imported or their code runs.
TRACES = ("imported-omegaconf", "imported-trainlib", "setstate-ran", "reduce-ran", "init-ran")

OMEGACONF = {
    "__init__.py": """
        from pathlib import Path
        (Path(__file__).parents[1] / "imported-omegaconf").write_text("imported")
        from omegaconf.dictconfig import DictConfig
    """,
    "base.py": """
        from collections import defaultdict
        from dataclasses import dataclass, field
        from typing import Any, Optional

        @dataclass
        class Metadata:
            ref_type: Any
            object_type: Any
            optional: bool
            key: Any
            flags: Optional[dict] = None
            flags_root: bool = False
            resolver_cache: dict = field(default_factory=lambda: defaultdict(dict))

        @dataclass
        class ContainerMetadata(Metadata):
            key_type: Any = None
            element_type: Any = None
    """,
    "nodes.py": """
        from typing import Any
        from omegaconf.base import Metadata

        class AnyNode:
            def __init__(self, value, key):
                self._metadata = Metadata(Any, Any, True, key, {})
                self._parent = None
                self._val = value
    """,
    "dictconfig.py": """
        from pathlib import Path
        from typing import Any
        from omegaconf.base import ContainerMetadata
        from omegaconf.nodes import AnyNode

        class DictConfig:
            def __init__(self, content):
                self.__dict__["_metadata"] = ContainerMetadata(Any, dict, True, None, {}, key_type=Any,
                                                               element_type=Any)
                self.__dict__["_parent"] = None
                self.__dict__["_content"] = {k: AnyNode(v, k) for k, v in content.items()}

            def __getstate__(self):
                return dict(self.__dict__)

            def __setstate__(self, state):
                (Path(__file__).parents[1] / "setstate-ran").write_text("ran")
                self.__dict__.update(state)
    """,
}

TRAINLIB = {
    "__init__.py": """
        import enum
        from dataclasses import dataclass
        from pathlib import Path

        HERE = Path(__file__).parents[1]
        (HERE / "imported-trainlib").write_text("imported")

        class Stage(enum.Enum):
            FIT = "fit"
            TEST = "test"

        @dataclass
        class Optim:
            lr: float = 3e-4
            betas: tuple = (0.9, 0.999)

        class AttributeDict(dict):  # Lightning's hyper-parameter container
            pass

        def leave_a_trace(name):
            (HERE / name).write_text("ran")

        class RebuiltByCall:
            \"\"\"An object whose unpickling calls a function of this module.\"\"\"
            def __reduce__(self):
                return (leave_a_trace, ("reduce-ran",))

        class InitOnLoad:
            \"\"\"An object rebuilt by calling its class.\"\"\"
            def __init__(self, width):
                (HERE / "init-ran").write_text("ran")
                self.width = width

            def __reduce__(self):
                return (InitOnLoad, (self.width,))
    """,
}

MAKE_CHECKPOINT = """
import argparse, json, os, subprocess, sys
from collections import OrderedDict, defaultdict
from pathlib import Path
import numpy as np
import torch
from omegaconf import DictConfig
import trainlib

class System:
    def __reduce__(self):
        return (os.system, ("touch system-ran",))

class Eval:
    def __reduce__(self):
        return (eval, ("open('eval-ran', 'w')",))

class Popen:
    def __reduce__(self):
        return (subprocess.Popen, (["touch", "popen-ran"],))

ATTACKS = {"system": System, "eval": Eval, "popen": Popen}


def save(path, zero_layer, protocol, attack, weights):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 10))
    for layer in net[::2]:
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        torch.nn.init.zeros_(layer.bias)
    if zero_layer:
        torch.nn.init.zeros_(net[2].weight)
    optimizer = torch.optim.Adam(net.parameters())
    hyper = dict(
        model=DictConfig({"width": 128, "depth": 3}), data=DictConfig({"batch": 64}),
        trainer=DictConfig({"epochs": 2}), args=argparse.Namespace(seed=0, precision="32"), optim=trainlib.Optim(),
        stage=trainlib.Stage.FIT, lr=np.float64(3e-4), warmup=np.int64(100), rebuilt=trainlib.RebuiltByCall(),
        sized=trainlib.InitOnLoad(4), counts=defaultdict(int, {"a": 1}), order=OrderedDict(a=1),
        extra=trainlib.AttributeDict(a=1, b=[2]))
    hyper.update({name: cls() for name, cls in ATTACKS.items() if name in attack})
    checkpoint = {"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0", "hyper_parameters": hyper,
                  "state_dict": OrderedDict((f"model.{k}", v) for k, v in net.state_dict().items()),
                  "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [], "hparams_name": "kwargs"}
    if weights != "state_dict":  # none, or a pickled module
        del checkpoint["state_dict"], checkpoint["optimizer_states"]
        checkpoint.update({"model": net} if weights == "module" else {})
    torch.save(checkpoint, path, pickle_protocol=protocol)


for spec in json.loads(sys.argv[1]):
    save(**spec)
"""

def write_package(folder: Path, name: str, files: dict[str, str]) -> None:
    (folder / name).mkdir()
    for file, source in files.items():
        (folder / name / file).write_text(textwrap.dedent(source))


VARIANTS = {"fixed": {}, "zero-layer": {"zero_layer": True}, "attack": {"attack": ["system", "eval", "popen"]},
            "no-weights": {"weights": "none"}, "pickled-module": {"weights": "module"}}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A folder holding the checkpoint's packages and the checkpoints (each variant in protocol 2 and 4), all
    written in one subprocess from the real classes; the traces that writing left are removed."""
    folder = tmp_path_factory.mktemp("foreign")
    write_package(folder, "omegaconf", OMEGACONF)
    write_package(folder, "trainlib", TRAINLIB)
    specs = [{"path": str(folder / f"{name}-p{protocol}.ckpt"), "zero_layer": False, "protocol": protocol,
              "attack": [], "weights": "state_dict", **variant}
             for name, variant in VARIANTS.items() for protocol in (2, 4)]
    subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, json.dumps(specs)], cwd=folder, check=True, timeout=300,
                   env={"PYTHONPATH": str(folder), "PATH": "/usr/bin:/bin"})
    assert (folder / "imported-omegaconf").exists() and (folder / "init-ran").exists()  # the traces work
    for trace in TRACES:
        (folder / trace).unlink(missing_ok=True)
    return folder


@pytest.fixture
def classes(written, monkeypatch) -> Path:
    """The folder, first on sys.path (its packages importable while initaudit reads) and the working folder."""
    monkeypatch.syspath_prepend(str(written))
    monkeypatch.chdir(written)
    return written


def checkpoint(folder: Path, variant: str = "fixed", protocol: int = 2) -> Path:
    return folder / f"{variant}-p{protocol}.ckpt"


def nothing_ran(folder: Path) -> None:
    assert [trace for trace in TRACES if (folder / trace).exists()] == []
    assert "omegaconf" not in sys.modules and "trainlib" not in sys.modules


def globals_in(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("variant", ["fixed", "zero-layer"])
def test_lightning_checkpoint_is_audited_without_running_its_classes(cli, classes, variant, protocol):
    zero_layer = variant == "zero-layer"
    path = checkpoint(classes, variant, protocol)
    result = cli("check", path, "--activation", "relu", "--format", "json")
    nothing_ran(classes)
    assert result.exit_code == (1 if zero_layer else 0), result.output
    report = json.loads(result.stdout)
    errors = {f["layer"] for f in report["findings"] if f["severity"] == "error"}
    assert errors == ({"2"} if zero_layer else set())
    assert {layer["name"] for layer in report["layers"]} == {"0", "2", "4"}  # Lightning's "model." prefix stripped
    note = next(n for n in report["notes"] if "placeholders" in n)
    assert "did not import, read as inert placeholders (never imported, never run" in note
    assert ("audited): omegaconf.dictconfig.DictConfig (3), collections.defaultdict (1), argparse.Namespace (1), "
            "trainlib.Optim (1), trainlib.Stage (1), and 4 more; 7 more classes inside them") in note


def test_placeholders_keep_what_the_pickle_gave_them(classes):
    path = checkpoint(classes)
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.base.ContainerMetadata", "omegaconf.nodes.AnyNode",
            "omegaconf.base.Metadata", "typing.Any", "collections.defaultdict", "argparse.Namespace",
            "trainlib.leave_a_trace", "trainlib.InitOnLoad"} <= globals_in(path)  # what omegaconf 2.3 pickles, too
    loaded = torch_files.load(path, trust_pickle=False)
    hyper = loaded.container.root["hyper_parameters"]
    assert hyper["model"].state["_content"]["width"].state["_val"] == 128
    assert hyper["args"].state == {"seed": 0, "precision": "32"}
    assert hyper["optim"].foreign_name == "trainlib.Optim" and hyper["optim"].state["lr"] == 3e-4
    assert hyper["stage"].args == ("fit",)
    assert hyper["sized"].args == (4,)
    assert hyper["rebuilt"].args == ("reduce-ran",)  # a call of leave_a_trace, kept, not made
    assert hyper["extra"].entries == [("a", 1), ("b", [2])] and hyper["order"] == {"a": 1}
    nothing_ran(classes)


@pytest.mark.parametrize("protocol", [2, 4])
def test_callables_that_run_code_are_refused_and_named(cli, classes, protocol):
    path = checkpoint(classes, "attack", protocol)
    result = cli("check", path)
    line = result.stderr.strip()
    assert result.exit_code == 2 and len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert "(posix.system, builtins.eval, subprocess.Popen)" in line and "--trust-pickle" in line
    assert str(path) in line
    nothing_ran(classes)
    assert not [p for p in classes.iterdir() if p.name.endswith("-ran")]


def test_weights_inside_placeholders_are_refused_and_hyper_parameters_alone_hold_no_weights(cli, classes):
    """A pickled module's weights need its code; a file of hyper-parameters alone holds no weights to audit."""
    line = cli("check", checkpoint(classes, "pickled-module")).stderr.strip()
    assert "pickles Python objects (torch.nn.modules.container.Sequential)" in line and "--trust-pickle" in line
    line = cli("check", checkpoint(classes, "no-weights")).stderr.strip()
    assert "no state_dict found in the checkpoint (top level: epoch, global_step" in line
    nothing_ran(classes)


def test_fix_writes_no_placeholder_back(cli, classes):
    path = checkpoint(classes, "zero-layer")
    out = classes / "repaired.ckpt"
    result = cli("fix", path, "-o", out, "--activation", "relu", "--force")
    assert result.exit_code == 2, result.output
    assert "cannot write them back" in result.stderr and "omegaconf.dictconfig.DictConfig" in result.stderr
    assert not out.exists() and not [p for p in classes.iterdir() if "repaired" in p.name]
    nothing_ran(classes)


def test_a_placeholder_class_written_back_never_imports_its_module(classes):
    path = checkpoint(classes)
    loaded = torch_files.load(path, trust_pickle=False)
    stage = loaded.container.root["hyper_parameters"]["stage"]
    with pytest.raises(Exception, match="cannot write them back"):
        torch.save({"stage_class": type(stage)}, classes / "out.pt")
    nothing_ran(classes)


def test_too_many_foreign_objects_are_refused(cli, classes, monkeypatch):
    monkeypatch.setattr(foreign, "MAX_FOREIGN_OBJECTS", 10)
    path = checkpoint(classes)
    line = cli("check", path).stderr.strip()
    assert "more than 10 objects" in line and "MAX_FOREIGN_OBJECTS" in line
    nothing_ran(classes)
