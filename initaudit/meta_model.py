"""The architecture a model folder's config.json describes, built on the meta device and traced.

Hugging Face folders (`model_type`) are built with transformers' own classes, timm folders
(`architecture`, as timm's `push_to_hub` writes) with `timm.create_model`. Nothing is downloaded,
no code from the folder runs (never `trust_remote_code`), and the weights take no memory: the
parameters live on the meta device and the one forward pass runs on fake tensors. The flow then
speaks in the file's tensor names (a `bert.` prefix or a missing head does not matter).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import torch

from . import trace
from .dynamic_trace import dynamic_flow, example_inputs
from .flow import Flow
from .graph import ModuleInfo, split_key


class NotBuilt(Exception):
    """The config names no architecture that can be built here; the message says why."""


@dataclass
class Context:
    """What the built architecture says about the file's layers."""

    flow: Flow
    modules: dict[str, ModuleInfo]   # file layer name -> kind
    architecture: str
    unmatched: int                   # the file's tensors the built model does not hold


def from_config(config: dict, shapes: dict[str, tuple[int, ...]]) -> Context:
    """The flow and module kinds of the architecture `config` describes, in the names of `shapes`' keys."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        module, inputs = _build(config)
        keys = _key_map(module, shapes)
        if len(keys) < len(shapes) / 2:
            raise NotBuilt(f"{type(module).__name__} built from config.json holds only {len(keys)} of the file's "
                           f"{len(shapes)} tensors")
        infos = trace.module_infos(module)
        flow = trace.fx_flow(module, infos)
        if flow is None:
            flow = _fake_flow(module, infos, inputs)
    if flow is None:
        raise NotBuilt(f"a forward pass of {type(module).__name__} on fake tensors failed")
    layers: dict[str, list[str]] = {}  # model layer -> the file layers whose tensors it holds
    for file_key, own_key in keys.items():
        names = layers.setdefault(split_key(own_key)[0], [])
        if split_key(file_key)[0] not in names:
            names.append(split_key(file_key)[0])
    modules = {name: infos[own] for own, names in layers.items() if own in infos for name in names}
    return Context(_renamed(flow, layers), modules, type(module).__name__, len(shapes) - len(keys))


def _renamed(flow: Flow, layers: dict[str, list[str]]) -> Flow:
    """The flow with the model's layer names replaced by the file's; a model layer held in several file
    tensors (fused projections) becomes one node per file layer, in parallel; one the file lacks, unnamed."""
    producers: dict[int, list[int]] = {}
    for idx, node in enumerate(flow.nodes):
        for user in node.users:
            producers.setdefault(user, []).append(idx)
    for idx, node in enumerate(list(flow.nodes)):
        if node.layer is None:
            continue
        first, *more = layers.get(node.layer) or [None]
        node.layer = first
        for name in more:
            twin = flow.add(node.role, name, node.activation)
            for user in node.users:
                flow.link(twin, user)
            for producer in producers.get(idx, []):
                flow.link(producer, twin)
    return flow


def _key_map(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """File key -> the model's key for the same tensor, for the keys the model holds (with the same shape,
    unless a conversion reshapes it): transformers' own checkpoint renamings where it has them, else the
    prefix (a head model's 'bert.', or its absence) that matches most keys."""
    own = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    found = _transformers_keys(module, own, shapes)
    if found:
        return found
    strip, add = _prefixes(own, shapes)
    return {k: strip + k[len(add):] for k, s in shapes.items()
            if k.startswith(add) and own.get(strip + k[len(add):]) == tuple(s)}


def _transformers_keys(module: torch.nn.Module, own: dict[str, tuple], shapes: dict[str, tuple]) -> dict[str, str]:
    """How transformers itself renames this checkpoint's keys when it loads them (legacy names, fused
    projections); {} where the model is not a transformers model or the API is not there."""
    if not type(module).__module__.startswith("transformers."):
        return {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(module)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = module.base_model_prefix
        found = {}
        for key, shape in shapes.items():
            renamed, converted = rename_source_key(key, renamings, converters, prefix, own)
            if renamed not in own and key in own:
                renamed, converted = rename_source_key(key, [], [], prefix, own)
            if renamed in own and (converted is not None or own[renamed] == tuple(shape)):
                found[key] = renamed
        return found
    except Exception:  # noqa: BLE001 - private API: any change in it means falling back to prefixes
        return {}


def _build(config: dict, device: str = "meta") -> tuple[torch.nn.Module, object]:
    """The module on the meta device (`probe`: on the CPU, with its own init), and a maker of its example input
    (or None: from the module itself)."""
    if isinstance(config.get("architecture"), str):
        return _build_timm(config, device)
    if isinstance(config.get("model_type"), str):
        return _build_transformers(config, device), None
    raise NotBuilt("config.json names neither a model_type (transformers) nor an architecture (timm)")


def _build_transformers(config: dict, device: str = "meta") -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise NotBuilt("transformers is not installed") from None
    settings = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
    if config["model_type"] not in transformers.CONFIG_MAPPING:
        raise NotBuilt(f"transformers {transformers.__version__} knows no model_type {config['model_type']!r}")
    try:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **settings)
    except Exception as exc:  # noqa: BLE001 - malformed settings raise anything
        raise NotBuilt(f"transformers cannot read it ({_first_line(exc)})") from None
    names = config.get("architectures") or []
    classes = [getattr(transformers, n, None) for n in names if isinstance(n, str)]
    cls = next((c for c in classes if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)), None)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device(device):
            if cls is not None:
                return cls(cfg)
            return transformers.AutoModel.from_config(cfg, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - model code raises anything on an odd config
        raise NotBuilt(f"transformers could not build {config['model_type']!r} ({_first_line(exc)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_timm(config: dict, device: str = "meta") -> tuple[torch.nn.Module, object]:
    try:
        import timm
    except ImportError:
        raise NotBuilt("timm is not installed") from None
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    if isinstance(config.get("num_classes"), int):
        args = {"num_classes": config["num_classes"], **args}
    try:
        with torch.device(device):
            module = timm.create_model(config["architecture"], pretrained=False, **args)
    except Exception as exc:  # noqa: BLE001 - unknown names and bad arguments alike
        raise NotBuilt(f"timm could not build {config['architecture']!r} ({_first_line(exc)})") from None
    size = (config.get("pretrained_cfg") or {}).get("input_size") or module.pretrained_cfg.get("input_size")

    def inputs():
        return ((torch.randn(1, *size),), {}) if size else example_inputs(module)
    return module, inputs


def _fake_flow(module: torch.nn.Module, infos: dict[str, ModuleInfo], inputs) -> Flow | None:
    """One forward pass on fake tensors (shapes only; libraries skip data-dependent checks on them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with torch.device("meta"), FakeTensorMode(allow_non_fake_inputs=True):
            example = inputs() if inputs is not None else example_inputs(module)
            return dynamic_flow(module, infos, example) if example is not None else None
    except Exception:  # noqa: BLE001 - an input the model does not take: no flow
        return None


def _prefixes(own: dict[str, tuple], file: dict[str, tuple]) -> tuple[str, str]:
    """(strip, add): file key = add + (model key less strip), the pair that matches most keys
    (a head model's 'bert.' that the file lacks, or the other way round)."""
    candidates = {("", "")}
    for keys, other, side in ((list(file)[:64], own, 1), (list(own)[:64], file, 0)):
        for key in keys:
            parts = key.split(".")
            for i in range(1, len(parts)):
                if ".".join(parts[i:]) in other:
                    prefix = ".".join(parts[:i]) + "."
                    candidates.add(("", prefix) if side else (prefix, ""))

    def score(pair: tuple[str, str]) -> int:
        strip, add = pair
        return sum(own.get(strip + k[len(add):]) == tuple(s) for k, s in file.items() if k.startswith(add))
    return max(sorted(candidates), key=score)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__

