"""Hugging Face model folders: config.json + model.safetensors (or shards with an index), no code from the folder.

The flow comes from the architecture config.json describes, built without weights, offline and traced
(see `meta_model`: transformers' classes for `model_type`, timm for `architecture`; an architecture on the
Hub or in another folder is refused, settings that would download or read elsewhere are left out). Where that
cannot be built (an unknown model type, the library missing, a forward pass that fails), the folder
is read as a bare safetensors file is (names and shapes order the layers: `key_order`), and the
config names the activation (`hidden_act`, `activation_function`, T5's `feed_forward_proj`) that
follows the layers every transformer family names alike: the first projection of a feed-forward
block feeds it, the pooler feeds tanh; every other layer's activation stays unknown.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from initaudit.flow import meta_model
from initaudit.flow.activations import Activation, canonical
from initaudit.load.bounded import MAX_JSON_BYTES, loads_json, read_regular
from initaudit.common.errors import InputError, first_line
from initaudit.load.files import inside
from initaudit.flow.dataflow import Flow
from initaudit.flow.layers import ModuleInfo, split_key
from initaudit.flow.ties import config_ties
from initaudit.load.source import Loaded, TensorSource, check_count, natural_key
from initaudit.load.paths import index_of, sniff
from initaudit.load.safetensors_file import SafetensorsFile, open_file

# The layer that feeds a transformer block's activation, across families
# (BERT/ViT/RoBERTa, GPT-2, OPT/CLIP, LLaMA/Mistral/Qwen/Gemma, T5, GPT-NeoX/Falcon, GPT-J, Mixtral;
# BERT's masked-LM head transform).
FFN_IN = ("*intermediate.dense", "*mlp.c_fc", "*.fc1", "*mlp.gate_proj", "*DenseReluDense.wi", "*DenseReluDense.wi_0",
          "*mlp.dense_h_to_4h", "*mlp.fc_in", "*feed_forward.w1", "*predictions.transform.dense")
POOLER = ("*pooler.dense",)
# Model types whose projections are HF's Conv1D, stored [in, out].
CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

NO_CONFIG = ("no config.json beside the weights: activations are unknown; pass --activation (or --model "
             "package.module:factory) to check scales against them")


def _json(path: Path, name: str, files: list[Path]) -> object:
    """A JSON file of the model folder, through the file policy; the real path is added to `files`."""
    real = inside(path, name, path)
    files.append(real)
    try:
        return loads_json(read_regular(real, MAX_JSON_BYTES, "a JSON file", path / name))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{path / name}: not readable JSON ({first_line(exc)})") from None


def read_config(path: Path, files: list[Path]) -> dict:
    config = _json(path, "config.json", files)
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'}: not a JSON object")
    return config


def activation_of(config: dict) -> Activation | None:
    """The feed-forward activation a config names."""
    for key in ("hidden_act", "activation_function", "hidden_activation", "feed_forward_proj", "activation"):
        value = config.get(key)
        if isinstance(value, str):
            name = canonical(value.replace("gated-", ""))
            if name:
                return Activation(name)
    return None


class _TorchShard:
    """A torch `.bin` shard: a state_dict mmapped, its pages handed back tensor by tensor."""

    def __init__(self, path: Path, shown: Path):
        from initaudit.load.pages import MappedFile
        from initaudit.load.torch_files import check_pickle_size, read

        check_pickle_size(path)
        state = read(path, trust_pickle=False)
        if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in state.items()):
            raise InputError(f"{shown}: not a shard of named tensors (a torch state_dict)")
        self.tensors = dict(state)  # the index's names as they are: no prefix stripped
        self.pages = MappedFile(path)
        self.metadata: dict = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def nbytes(self, key: str) -> int:
        return self.tensors[key].numel() * self.tensors[key].element_size()

    def get(self, key: str):
        return self.tensors[key]

    def release(self, key: str) -> None:
        self.pages.release(self.tensors[key])


def open_shard(real: Path, shown: Path):
    """A weight file of a folder, by its first bytes (else its name): safetensors, or a torch state_dict (.bin...)."""
    return SafetensorsFile(real, shown) if sniff(real) == "safetensors" or shown.suffix == ".safetensors" \
        else _TorchShard(real, shown)


def _shards(path: Path, files: list[Path], index: str | None) -> tuple[dict[str, str], dict[str, Path]]:
    """Tensor name -> the weight file holding it, and each weight file's real path (inside the folder)."""
    if index is not None:
        weight_map = _json(path, index, files)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise InputError(f"{path / index}: not a shard index (its \"weight_map\" must map tensor names to file names)")
        check_count(len(weight_map), path / index)
        real = {shard: inside(path, shard, path / index) for shard in sorted(set(weight_map.values()))}
        files.extend(real.values())
        return dict(weight_map), real
    names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        raise InputError(f"{path}: a model folder without .safetensors weights or a shard index (check the weight "
                         "file itself)")
    shards, real = {}, {}
    for name in names:
        real[name] = inside(path, name, path)
        files.append(real[name])
        with open_file(real[name], path / name) as f:
            shards.update((k, name) for k in f.keys())
        check_count(len(shards), path)
    return shards, real


def load(path: Path, index: str | None = None) -> Loaded:
    """A model folder (config.json optional where a shard index is there), or the shards an index names."""
    files: list[Path] = []
    config = read_config(path, files) if os.path.lexists(path / "config.json") else {}
    shards, real = _shards(path, files, index or index_of(path))
    handles = {name: open_shard(file, path / name) for name, file in real.items()}
    metadata = {name: handle.metadata for name, handle in handles.items()}
    shapes = {}
    for key in sorted(shards, key=natural_key):
        handle = handles[shards[key]]
        if key not in handle.keys():
            raise InputError(f"{path}: the index puts {key!r} in {shards[key]}, which does not hold it")
        shapes[key] = handle.shape(key)
    flow, modules, hints, notes, init, ties = config_context(config, shapes, path / "config.json") if config else (
        None, {}, {}, [NO_CONFIG], {}, [])
    source = TensorSource(shapes, lambda k: handles[shards[k]].get(k), release=lambda k: handles[shards[k]].release(k),
                          nbytes={k: handles[shards[k]].nbytes(k) for k in shapes})
    return Loaded(path, "hf-folder", source, flow=flow, modules=modules, activations=hints,
                  container={"shards": shards, "metadata": metadata, "handles": handles}, notes=notes,
                  files=[path.resolve(), *dict.fromkeys(files)], declared_init=init, ties=ties)


def config_context(config: dict, shapes: dict[str, tuple[int, ...]], where: Path | str
             ) -> tuple[Flow | None, dict[str, ModuleInfo], dict[str, Activation], list[str], dict[str, str],
                        list[tuple[str, str]]]:
    """(flow, module kinds, activation hints, notes, the recipe the family's init declares per tensor, ties): the
    flow from the architecture config.json (at `where`) describes, built without weights and offline; else no flow,
    and the activations the config and the layer names suggest. An architecture that lives elsewhere (the Hub,
    another folder) is refused. `ties`: the tensor names the architecture (else the config's `tie_word_embeddings`
    and the usual names) ties together."""
    try:
        built = meta_model.from_config(config, shapes)
    except meta_model.Refused as exc:
        raise InputError(f"{where}: {exc}") from None
    except meta_model.NotBuilt as exc:
        reason = str(exc)
    else:
        notes = [f"activations traced from {built.architecture}, built from config.json without weights"]
        if built.left_out:
            notes.append(f"model_args left out of the build (not timm model arguments with plain values; nothing is "
                         f"downloaded or read outside the folder): {', '.join(built.left_out)}")
        if built.unmatched:
            notes.append(f"{built.unmatched} tensors are not in {built.architecture}: their activations are unknown")
        return built.flow, built.modules, {}, notes, built.init, built.ties
    transposed = config.get("model_type") in CONV1D_MODELS
    modules = {split_key(k)[0]: ModuleInfo("linear", "Conv1D", True)
               for k, s in shapes.items() if transposed and k.endswith(".weight") and len(s) == 2
               and re.search(r"\.(c_attn|c_proj|c_fc|q_attn)$", split_key(k)[0])}
    act = activation_of(config)
    hints = {}
    for layer in dict.fromkeys(split_key(k)[0] for k in shapes):
        if act is not None and any(fnmatch.fnmatchcase(layer, p) for p in FFN_IN):
            hints[layer] = act
        elif any(fnmatch.fnmatchcase(layer, p) for p in POOLER):
            hints[layer] = Activation("tanh")
    notes = [f"the architecture was not built ({reason}): layers ordered by names and shapes, activations from "
             f"config.json ({act or 'no activation named'}) on the layers the names tell; pass --activation-for to "
             "name the others"]
    return None, modules, hints, notes, {}, config_ties(config, shapes)
