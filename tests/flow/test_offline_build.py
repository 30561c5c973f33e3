"""A model built from config.json never reaches the network, runs code from elsewhere or reads outside its folder.

Whatever config.json says (attention implementations that load hub kernels, at the top or in sub-configs, timm
names on the Hub or in another folder, timm `model_args` that load checkpoints), `check` builds the architecture
with sockets that refuse to connect (and record every attempt), opening only files inside the model folder.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import initaudit
from helpers import zoo
from initaudit.flow import meta_model
from initaudit.judge.report import Report

transformers = pytest.importorskip("transformers", reason="transformers is in the `arch` extra")
timm = pytest.importorskip("timm", reason="timm is in the `arch` extra")


@pytest.fixture
def network(monkeypatch) -> list[str]:
    """Every attempt to reach the network (a connect, a name lookup), recorded and refused."""
    attempts: list[str] = []

    def refused(name: str):
        def refuse(*args, **kwargs):
            attempts.append(f"{name}{args!r}"[:200])
            raise OSError(f"network blocked by the test ({name})")
        return refuse
    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refused(name))
    return attempts


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every file opened through open(), io.open() or os.open() while a model is built from config.json."""
    paths: list[Path] = []
    building = []
    real_open, real_os_open, real_from_config = builtins.open, os.open, meta_model.from_config

    def recording_open(file, *args, **kwargs):
        if building and isinstance(file, (str, bytes, os.PathLike)):
            paths.append(Path(os.fsdecode(file)).resolve())
        return real_open(file, *args, **kwargs)

    def recording_os_open(path, *args, **kwargs):
        if building:
            paths.append(Path(os.fsdecode(path)).resolve())
        return real_os_open(path, *args, **kwargs)

    def recorded_from_config(*args, **kwargs):
        building.append(True)
        try:
            return real_from_config(*args, **kwargs)
        finally:
            building.pop()
    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(os, "open", recording_os_open)
    monkeypatch.setattr(meta_model, "from_config", recorded_from_config)
    return paths


def process_or_library(path: Path) -> bool:
    """/proc (memory accounting), or an installed library's own files (transformers reads its modules' source)."""
    return path.is_relative_to("/proc") or any(path.is_relative_to(Path(prefix).resolve())
                                               for prefix in (sys.prefix, sys.base_prefix))


def saved(model: torch.nn.Module, folder: Path) -> Path:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100)
    return saved(transformers.LlamaForCausalLM(config), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A model of two sub-configs (text_config, vision_config)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(text_config=dict(vocab_size=100, **sizes),
                                     vision_config=dict(image_size=32, patch_size=8, **sizes))
    return saved(transformers.CLIPModel(config), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """A mixture of experts (its experts implementation may be a hub kernel)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        num_local_experts=4, num_experts_per_tok=2)
    return saved(transformers.MixtralForCausalLM(config), tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory) -> Path:
    from timm.models import save_for_hf

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("timm")
    save_for_hf(timm.create_model("test_vit", pretrained=False), folder, safe_serialization=True)
    return folder


def with_config(folder: Path, tmp_path: Path, **changes) -> Path:
    """A copy of `folder` whose config.json has `changes` (a dict value merged into the config's dict there)."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def built_offline(folder: Path, network: list[str], architecture: str = "") -> Report:
    """The audit of `folder`, asserting nothing reached for the network and its architecture was built: traced, or
    (`architecture`: one whose forward pass on fake tensors fails, as MoE routing and CLIP's two inputs do) built."""
    report = initaudit.audit(folder)
    assert network == []
    traced = report.notes[0].startswith(f"activations traced from {architecture}")
    assert traced or architecture and f"a forward pass of {architecture} on fake tensors failed" in report.notes[0], \
        report.notes[0]
    return report


# ---------------------------------------------------------------- attention, experts and kernel settings

KERNEL_ATTENTION = [
    "flash_attention_2", "flash_attention_3", "FLASH_ATTENTION_2", "flex_attention",
    "kernels-community/flash-attn2", "kernels-community/flash-attn2@main", "Kernels-Community/Flash-Attn2",
    "kernels-community/flash-attn2:flash_attn_varlen_func", "paged|kernels-community/flash-attn2",
    "paged|flash_attention_2", "attacker/evil-kernel", "attacker/evil-kernel@v1:forward",
]


@pytest.mark.parametrize("value", KERNEL_ATTENTION)
def test_attention_is_the_built_in_one_whatever_the_config_asks(value, llama, tmp_path, network):
    built_offline(with_config(llama, tmp_path, attn_implementation=value), network)


def test_attention_per_sub_config_is_the_built_in_one(llama, tmp_path, network):
    built_offline(with_config(llama, tmp_path, attn_implementation={"": "kernels-community/flash-attn2"}), network)


@pytest.mark.parametrize("text, vision", [
    ("kernels-community/flash-attn2", "flash_attention_2"),
    ("flash_attention_2", "kernels-community/flash-attn2@main"),
])
def test_attention_in_sub_configs_is_the_built_in_one(text, vision, clip, tmp_path, network):
    """CLIP is built (its forward on fake tensors then fails, as on a folder that asks for nothing)."""
    folder = with_config(clip, tmp_path, text_config={"attn_implementation": text},
                         vision_config={"_attn_implementation": vision}, attn_implementation=vision)
    built_offline(folder, network, "CLIPModel")


def implementations(module: torch.nn.Module) -> set[tuple[str, str]]:
    """(attention, experts) of every transformers model inside `module`."""
    return {(m.config._attn_implementation, m.config._experts_implementation)
            for m in module.modules() if isinstance(m, transformers.PreTrainedModel)}


@pytest.mark.parametrize("experts", ["sonicmoe", "deepgemm", "kernels-community/sonic-moe"])
def test_probe_builds_the_built_in_attention_and_experts_whatever_the_config_asks(experts, mixtral, network):
    """`probe` builds on the CPU and runs the model: its implementations are those of a config that asks for none
    (sonic-moe and deep-gemm are hub kernels on a GPU), and its forward pass reaches for nothing."""
    plain = json.loads((mixtral / "config.json").read_text())
    config = {**plain, "experts_implementation": experts, "attn_implementation": "kernels-community/flash-attn2",
              "use_kernels": True,
              "kernel_config": {"kernel_mapping": {"RMSNorm": "kernels-community/liger_kernels:LigerRMSNorm"}}}
    module, _ = meta_model.build_module(config, device="cpu")
    assert implementations(module) == implementations(meta_model.build_module(plain, device="cpu")[0])
    assert implementations(module) <= {("sdpa", "grouped_mm"), ("sdpa", "eager"), ("eager", "grouped_mm"),
                                       ("eager", "eager")}
    module(input_ids=torch.randint(0, 100, (1, 4)))
    assert network == []


def test_a_backbone_is_never_looked_up_on_the_hub(llama, tmp_path, network):
    """A backbone named without a backbone_config makes transformers ask the Hub whether such a repository exists."""
    folder = with_config(llama, tmp_path, model_type="upernet", architectures=["UperNetForSemanticSegmentation"],
                         backbone="resnet50", use_timm_backbone=False)
    report = initaudit.audit(folder)
    assert network == [] and "not built" in report.notes[0]


def test_no_code_named_in_a_sub_config_runs(clip, tmp_path, network):
    """Guard: auto_map and trust_remote_code, at any level, never make a build import the folder's code."""
    marker = tmp_path / "ran"
    evil = {"auto_map": {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"},
            "trust_remote_code": True, "name_or_path": str(tmp_path / "clip")}
    folder = with_config(clip, tmp_path, text_config=evil, vision_config=evil, **evil)
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    built_offline(folder, network, "CLIPModel")
    assert not marker.exists()


# ---------------------------------------------------------------- timm names and model_args

HUB_OR_PATH = ["hf-hub:timm/test_vit", "HF-HUB:timm/test_vit", "hf_hub:timm/test_vit", "hf-hub:timm/test_vit@main",
               "local-dir:/tmp/elsewhere", "local-dir:../elsewhere", "LOCAL-DIR:elsewhere", "timm/test_vit",
               "..\\elsewhere"]


@pytest.mark.parametrize("name", HUB_OR_PATH)
def test_a_timm_architecture_on_the_hub_or_in_a_folder_is_refused(name, timm_vit, tmp_path, network, cli):
    result = cli("check", with_config(timm_vit, tmp_path, architecture=name))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "config.json" in lines[0] and repr(name) in lines[0] and "Hub repository or a path" in lines[0]
    assert network == []


@pytest.mark.parametrize("where", ["timm_wrapper", "backbone", "backbone_config"])
def test_a_timm_name_on_the_hub_inside_a_transformers_config_is_refused(where, llama, tmp_path, network, cli):
    configs = {
        "timm_wrapper": dict(model_type="timm_wrapper", architectures=["TimmWrapperModel"],
                             architecture="hf-hub:timm/test_vit"),
        "backbone": dict(model_type="detr", architectures=["DetrModel"], backbone="hf_hub:timm/resnet18"),
        "backbone_config": dict(model_type="detr", architectures=["DetrModel"],
                                backbone_config={"model_type": "timm_backbone", "backbone": "local-dir:/tmp/x"}),
    }
    result = cli("check", with_config(llama, tmp_path, **configs[where]))
    assert result.exit_code == 2 and "Hub repository or a path" in result.stderr, result.output
    assert network == []


LOADER_ARGS = {
    "pretrained": {"pretrained": True},
    "pretrained_cfg": {"pretrained_cfg": {"hf_hub_id": "timm/vit_tiny_patch16_224.augreg_in21k", "source": "hf-hub"}},
    "pretrained_cfg_overlay file": {"pretrained_cfg_overlay": {"file": "{elsewhere}/x.pth"}},
    "pretrained_cfg_overlay hub": {"pretrained_cfg_overlay": {"hf_hub_id": "timm/test_vit.r160_in1k"}},
    "cache_dir": {"cache_dir": "{elsewhere}"},
    "features_only": {"features_only": True},
    "a layer named by a path": {"act_layer": "{elsewhere}/act"},
    "a mapping": {"block_kwargs": {"file": "{elsewhere}/x.pth"}},
    "device": {"device": "cpu"},
}


@pytest.mark.parametrize("case", sorted(LOADER_ARGS))
def test_timm_model_args_outside_the_allowlist_are_left_out(case, timm_vit, tmp_path, network):
    args = json.loads(json.dumps(LOADER_ARGS[case]).replace("{elsewhere}", str(tmp_path / "elsewhere")))
    report = built_offline(with_config(timm_vit, tmp_path, model_args=args), network)
    left_out = next(n for n in report.notes if n.startswith("model_args left out"))
    assert sorted(left_out.rsplit(": ", 1)[1].split(", ")) == sorted(args)


def test_timm_model_args_in_the_allowlist_are_used(timm_vit, tmp_path, network):
    """The folder holds test_vit's 6 blocks; model_args asks for 4: the build has 4 (2 blocks' tensors unmatched)."""
    args = {"depth": 4, "act_layer": "gelu", "qkv_bias": True, "img_size": [160, 160], "global_pool": "token"}
    assert meta_model.timm_model_args(args) == (args, [])
    report = built_offline(with_config(timm_vit, tmp_path, model_args=args), network)
    with safe_open(timm_vit / "model.safetensors", "pt") as file:
        unmatched = sum(key.startswith(("blocks.4.", "blocks.5.")) for key in file.keys())
    assert report.notes[1].startswith(f"{unmatched} tensors are not in VisionTransformer"), report.notes


@pytest.mark.parametrize("via", ["timm", "transformers' TimmWrapper"])
def test_a_checkpoint_path_outside_the_folder_is_never_opened(via, timm_vit, llama, tmp_path, network, opened):
    """timm loads `checkpoint_path` after building the model (with torch.load, unpickling where weights_only fails)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save(timm.create_model("test_vit").state_dict(), elsewhere / "x.pth")
    args = {"checkpoint_path": str(elsewhere / "x.pth"), "pretrained_cfg_overlay": {"file": str(elsewhere / "x.pth")}}
    folder = with_config(timm_vit, tmp_path, model_args=args) if via == "timm" else \
        with_config(llama, tmp_path, model_type="timm_wrapper", architectures=["TimmWrapperModel"], model_args=args)
    report = initaudit.audit(folder)
    outside = [p for p in opened if not p.is_relative_to(folder.resolve()) and not process_or_library(p)]
    assert outside == [] and network == []
    if via == "timm":
        assert report.notes[1].endswith("checkpoint_path, pretrained_cfg_overlay")


# ---------------------------------------------------------------- the Hub offline while a build runs

def test_the_hub_is_offline_during_a_build_and_restored_after(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("LOCAL_KERNELS", "kernels-community/flash-attn2=/tmp/evil")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    seen = {}

    def create_model(name, **kwargs):
        seen.update({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "USE_HUB_KERNELS",
                                                    "LOCAL_KERNELS")}, constant=hub.HF_HUB_OFFLINE)
        raise RuntimeError("seen")
    monkeypatch.setattr(timm, "create_model", create_model)
    before = hub.HF_HUB_OFFLINE
    with pytest.raises(meta_model.NotBuilt):
        meta_model.from_config({"architecture": "test_vit"}, {"w": (1,)})
    assert seen == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "NO",
                    "LOCAL_KERNELS": None, "constant": True}
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "USE_HUB_KERNELS" not in os.environ
    assert os.environ["LOCAL_KERNELS"] == "kernels-community/flash-attn2=/tmp/evil" and hub.HF_HUB_OFFLINE == before


@pytest.mark.parametrize("nest", [lambda inner: {"a": inner}, lambda inner: [inner]], ids=["dicts", "lists"])
def test_a_config_nested_past_any_recursion_limit_is_not_built(nest):
    deep: object = 1
    for _ in range(sys.getrecursionlimit() + 10):
        deep = nest(deep)
    with pytest.raises(meta_model.NotBuilt, match="nests deeper than"):
        meta_model.from_config({"model_type": "llama", "text_config": deep}, {"w": (1,)})


@pytest.mark.parametrize("fixture, huge", [("llama", {"num_hidden_layers": 5000}),
                                            ("timm_vit", {"model_args": {"depth": 5000}})])
def test_a_config_asking_for_far_more_layers_than_the_file_holds_is_not_built(fixture, huge, request, tmp_path):
    """5000 layers beside a file of 2 (6) took minutes to build and trace on the meta device; 10^5, hours."""
    start = time.monotonic()
    report = initaudit.audit(with_config(request.getfixturevalue(fixture), tmp_path, **huge))
    assert "tensors, far more than the file: config.json describes a larger model" in report.notes[0], report.notes
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------- every stock config of the sweep

STOCK = {stock.name: stock for stock in zoo.ZOO if stock.library in ("timm", "transformers")}
FAST = {"timm/vit_tiny_patch16_224", "timm/resnet26d", "transformers/bert", "transformers/llama", "transformers/t5",
        "transformers/clip"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in STOCK])
def test_every_stock_config_is_built_with_sockets_blocked(name, network):
    """Each stock model of the sweep, from the config.json its folder carries: built and traced on the meta device
    (or built, where a forward pass on fake tensors fails), and nothing reaches for the network."""
    config = zoo.config_json(STOCK[name])
    module, _ = meta_model.build_module(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    try:
        assert meta_model.from_config(config, shapes).unmatched == 0
    except meta_model.NotBuilt as exc:
        assert str(exc).startswith(f"a forward pass of {type(module).__name__} on fake tensors failed")
    assert network == []
