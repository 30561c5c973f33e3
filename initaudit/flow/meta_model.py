"""The architecture a model folder's config.json describes, built on the meta device and traced.

Hugging Face folders (`model_type`) are built with transformers' own classes, timm folders
(`architecture`, as timm's `push_to_hub` writes) with `timm.create_model`. The weights take no
memory: the parameters live on the meta device and the one forward pass runs on fake tensors. The
flow then speaks in the file's tensor names (a `bert.` prefix or a missing head does not matter).

A build never reaches the network, runs code from elsewhere or reads a file outside the folder,
whatever config.json says: attention and MoE experts are transformers' built-in defaults, as in a
model built from code (torch's scaled_dot_product_attention, else eager; grouped_mm, else eager),
never what the config asks (flash attention and `org/kernel` names fetch a kernel from the Hub
through the `kernels` package); kernel switches, `auto_map`, `trust_remote_code` and `name_or_path`
are left out, at every level of the config; the Hub is offline while the build runs; a timm name
that points at the Hub or a path (`hf-hub:`, `local-dir:`) is refused; timm `model_args` pass an
allowlist (see `timm_model_args`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import os
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from initaudit.flow import trace
from initaudit.flow.family_init import declared_init
from initaudit.flow.dynamic_trace import dynamic_flow, example_inputs
from initaudit.common.errors import InputError, first_line
from initaudit.flow.dataflow import Flow
from initaudit.flow.layers import ModuleInfo, split_key
from initaudit.flow.ties import module_ties

# Settings that choose how a model runs, not what it is: an attention or experts implementation can name a kernel
# that transformers loads from the Hub (its `kernels` integration); the others switch kernels on, name code to
# import or the path it would come from. Left out wherever they appear: transformers' defaults are built.
RUN_SETTINGS = frozenset({
    "attn_implementation", "_attn_implementation", "_attn_implementation_internal", "experts_implementation",
    "_experts_implementation", "_experts_implementation_internal", "use_kernels", "kernel_config", "auto_map",
    "trust_remote_code", "name_or_path", "_name_or_path"})
# Keys whose value timm resolves as a model name (a timm config's and TimmWrapper's architecture, a backbone).
TIMM_NAMES = ("architecture", "backbone")
# timm resolves "source:id" names (hf-hub:, hf_hub:, local-dir:, any case) and refuses paths; none is built here.
NOT_A_TIMM_NAME = re.compile(r"[:/\\]")
# A string timm may take in model_args: a layer or pooling name ("gelu", "avg"), never a path or a URL.
BARE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_NESTING = 32  # real configs nest a handful of levels
# A build may hold this many times the file's tensors (heads, buffers, tied copies), plus this many, before it is
# stopped: a config.json asking for 10^5 layers beside a small file would take hours to build and trace.
TENSORS_PER_FILE_TENSOR, SPARE_TENSORS = 4, 1024


def most_tensors(in_file: int) -> int:
    """The most tensors a build from config.json may make beside a file of `in_file` tensors: a config describing
    a far larger model than its weights is not built."""
    return TENSORS_PER_FILE_TENSOR * in_file + SPARE_TENSORS
# What tells the libraries the Hub is offline, and turns hub kernels and local kernel overrides off (None: unset).
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "NO",
                       "LOCAL_KERNELS": None}
_ONE_BUILD_AT_A_TIME = threading.RLock()  # the environment is the process's


class NotBuilt(Exception):
    """The config names no architecture that can be built here; the message says why."""


class Refused(InputError):
    """The config names an architecture that lives elsewhere (the Hub, another folder): nothing is built."""


@dataclass
class Context:
    """What the built architecture says about the file's layers."""

    flow: Flow
    modules: dict[str, ModuleInfo]   # file layer name -> kind
    architecture: str
    unmatched: int                   # the file's tensors the built model does not hold
    left_out: list[str] = field(default_factory=list)  # model_args the build did not use
    init: dict[str, str] = field(default_factory=dict)  # file key -> the recipe the family's own init declares
    ties: list[tuple[str, str]] = field(default_factory=list)  # the file's tensor names the architecture ties


def from_config(config: dict, shapes: dict[str, tuple[int, ...]]) -> Context:
    """The flow and module kinds of the architecture `config` describes, in the names of `shapes`' keys."""
    with offline(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        module, inputs = build_module(config, most_tensors=most_tensors(len(shapes)))
        keys = key_map(module, shapes)
        if len(keys) < len(shapes) / 2:
            raise NotBuilt(f"{type(module).__name__} built from config.json holds only {len(keys)} of the file's "
                           f"{len(shapes)} tensors")
        infos = trace.module_infos(module)
        flow = trace.fx_flow(module, infos)
        if flow is None:
            flow = fake_flow(module, infos, inputs)
        declared = declared_init(module)
    if flow is None:
        raise NotBuilt(f"a forward pass of {type(module).__name__} on fake tensors failed")
    layers: dict[str, list[str]] = {}  # model layer -> the file layers whose tensors it holds
    for file_key, own_key in keys.items():
        names = layers.setdefault(split_key(own_key)[0], [])
        if split_key(file_key)[0] not in names:
            names.append(split_key(file_key)[0])
    for layer, held in tied_layers(module, keys).items():  # a head the file holds as the table it is tied to
        if layer in infos:
            layers.setdefault(layer, [layer])
            infos[layer] = replace(infos[layer], tied_to=held)
    modules = {name: infos[own] for own, names in layers.items() if own in infos for name in names}
    left_out = timm_model_args(config.get("model_args"))[1] if _is_timm(config) else []
    init = {file_key: declared[own] for file_key, own in keys.items() if own in declared}
    file_key = {own: name for name, own in keys.items()}
    ties = [(file_key[a], file_key[b]) for a, b in module_ties(module) if a in file_key and b in file_key]
    return Context(_renamed(flow, layers), modules, type(module).__name__, len(shapes) - len(keys), left_out, init, ties)


def family_init(module: torch.nn.Module) -> dict[str, str]:
    """A live transformers model's tensor names -> the recipe its family's own init declares (from a copy built on
    the meta device from its config, offline); {} for any other module."""
    to_dict = getattr(getattr(module, "config", None), "to_dict", None)
    if not type(module).__module__.startswith("transformers.") or not callable(to_dict):
        return {}
    shapes = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    with offline(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            replica, _ = build_module(to_dict(), most_tensors=most_tensors(len(shapes)))
        except (NotBuilt, Refused):
            return {}
        declared = declared_init(replica)
        return {key: declared[own] for key, own in key_map(replica, shapes).items() if own in declared}


def tied_layers(module: torch.nn.Module, keys: dict[str, str]) -> dict[str, str]:
    """Layers of `module` whose weight the file holds only under another name, the tensor being tied (transformers
    saves a head tied to its token table once): layer -> the file key that holds its weight."""
    file_of = {own: file for file, own in keys.items()}
    users: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    tied = {}
    for names in users.values():
        held = next((file_of[n] for n in names if n in file_of), None)
        tied.update({split_key(n)[0]: held for n in names if held and n not in file_of and n.endswith(".weight")})
    return tied


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


def key_map(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
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


def build_module(config: dict, device: str = "meta", most_tensors: int | None = None) -> tuple[torch.nn.Module, object]:
    """The module on the meta device (`probe`: on the CPU, with its own init), and a maker of its example input
    (or None: from the module itself). Offline, whatever the config says (see the module's docstring); stopped
    once it registers more than `most_tensors` parameters and buffers."""
    with offline(), _tensors_at_most(most_tensors):
        if _is_timm(config):
            return _build_timm(config, device)
        if isinstance(config.get("model_type"), str):
            return _build_transformers(config, device), None
    raise NotBuilt("config.json names neither a model_type (transformers) nor an architecture (timm)")


@contextlib.contextmanager
def _tensors_at_most(limit: int | None) -> Iterator[None]:
    """While a module is built: an error as soon as it registers more than `limit` parameters and buffers."""
    from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                         register_module_parameter_registration_hook)

    registered = 0

    def count(*_) -> None:
        nonlocal registered
        registered += 1
        if registered > limit:
            raise NotBuilt(f"the architecture holds more than {limit} tensors, far more than the file: config.json "
                           "describes a larger model than the weights")
    if limit is None:
        yield
        return
    handles = [register_module_parameter_registration_hook(count), register_module_buffer_registration_hook(count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_timm(config: dict) -> bool:
    return isinstance(config.get("architecture"), str)


def _build_transformers(config: dict, device: str = "meta") -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise NotBuilt("transformers is not installed") from None
    settings = {k: v for k, v in offline_settings(config).items() if k != "model_type"}
    if config["model_type"] not in transformers.CONFIG_MAPPING:
        raise NotBuilt(f"transformers {transformers.__version__} knows no model_type {config['model_type']!r}")
    try:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **settings)
    except Exception as exc:  # noqa: BLE001 - malformed settings raise anything
        raise NotBuilt(f"transformers cannot read it ({first_line(exc)})") from None
    default_implementations(cfg, transformers.PretrainedConfig)
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
        raise NotBuilt(f"transformers could not build {config['model_type']!r} ({first_line(exc)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_timm(config: dict, device: str = "meta") -> tuple[torch.nn.Module, object]:
    check_timm_name("architecture", config["architecture"])
    try:
        import timm
    except ImportError:
        raise NotBuilt("timm is not installed") from None
    args = timm_model_args(config.get("model_args"))[0]
    if isinstance(config.get("num_classes"), int):
        args = {"num_classes": config["num_classes"], **args}
    try:
        with torch.device(device):
            module = timm.create_model(config["architecture"], pretrained=False, **args)
    except Exception as exc:  # noqa: BLE001 - unknown names and bad arguments alike
        raise NotBuilt(f"timm could not build {config['architecture']!r} ({first_line(exc)})") from None
    size = _input_size(config.get("pretrained_cfg")) or _input_size(module.pretrained_cfg)

    def inputs():
        return ((torch.randn(1, *size),), {}) if size else example_inputs(module)
    return module, inputs


def _input_size(pretrained_cfg: object) -> tuple[int, ...] | None:
    """A pretrained_cfg's `input_size` (channels, height, width), where it is one."""
    size = pretrained_cfg.get("input_size") if isinstance(pretrained_cfg, dict) else None
    if isinstance(size, (list, tuple)) and len(size) == 3 and all(type(n) is int and n > 0 for n in size):
        return tuple(size)
    return None


# ---------------------------------------------------------------- offline, whatever config.json says

@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face Hub offline, hub kernels off and no local kernel overrides while a build runs (the
    environment, and huggingface_hub's own constant, which it reads once at import); all restored after."""
    with _ONE_BUILD_AT_A_TIME:
        saved = {name: os.environ.get(name) for name in OFFLINE_ENVIRONMENT}
        hub = _hub_constants()
        was_offline = hub.HF_HUB_OFFLINE if hub else None
        try:
            _set_environment(OFFLINE_ENVIRONMENT)
            if hub:
                hub.HF_HUB_OFFLINE = True
            yield
        finally:
            _set_environment(saved)
            if hub:
                hub.HF_HUB_OFFLINE = was_offline


def _hub_constants():
    try:
        import huggingface_hub.constants
    except ImportError:
        return None
    return huggingface_hub.constants if hasattr(huggingface_hub.constants, "HF_HUB_OFFLINE") else None


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def offline_settings(node: object, depth: int = 0) -> object:
    """config.json (or a part of it) without the settings of RUN_SETTINGS, at every level, and with every
    `model_args` through the timm allowlist; Refused where a timm name points at the Hub or a path."""
    if depth > MAX_NESTING:
        raise NotBuilt(f"config.json nests deeper than {MAX_NESTING} levels")
    if isinstance(node, list):
        return [offline_settings(item, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    kept = {}
    for key, value in node.items():
        if key in TIMM_NAMES:
            check_timm_name(key, value)
        if key == "model_args":
            kept[key] = timm_model_args(value)[0]
        elif key not in RUN_SETTINGS:
            kept[key] = offline_settings(value, depth + 1)
    return kept


def default_implementations(config, config_class: type) -> None:
    """Attention and experts left to transformers' built-in defaults on `config` and on every config inside it
    (sub-configs, backbones), whatever a config class set itself."""
    seen, stack = set(), [config]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, config_class):
            node._attn_implementation = None
            node._experts_implementation = None
            stack.extend(vars(node).values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())


def check_timm_name(key: str, name: object) -> None:
    """Refused: a timm model name that points at the Hub or a path (timm would download or read it)."""
    if isinstance(name, str) and NOT_A_TIMM_NAME.search(name):
        raise Refused(f"{key} {name[:200]!r} names a Hub repository or a path (hf-hub:, local-dir:); only "
                      "architectures timm itself defines are built, so that nothing is downloaded and nothing "
                      "outside the model folder is read")


def timm_model_args(args: object) -> tuple[dict, list[str]]:
    """(kept, left out): the model_args that a timm model class's constructor takes, with plain values (numbers,
    booleans, null, bare names such as "gelu", and lists of them). Left out: what timm's loader takes (pretrained,
    checkpoint_path, pretrained_cfg(_overlay), cache_dir, features_only...), `device`/`dtype` (the build's own),
    and any value naming a path, a URL or holding a mapping."""
    if not isinstance(args, dict):
        return {}, [] if args is None else ["model_args"]
    known = timm_argument_names()
    kept = {key: value for key, value in args.items() if key in known and _plain(value)}
    return kept, sorted(key for key in args if key not in kept)


def _plain(value: object, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return BARE_NAME.fullmatch(value) is not None
    return isinstance(value, (list, tuple)) and depth < 4 and all(_plain(item, depth + 1) for item in value)


@functools.cache
def timm_argument_names() -> frozenset[str]:
    """Every keyword argument the constructor of a model class of timm takes (depth, embed_dim, act_layer...)."""
    import timm

    names: set[str] = set()
    for module_name in timm.list_modules():
        module = importlib.import_module(f"timm.models.{module_name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__.startswith("timm."):
                names.update(_keywords(obj))
    return frozenset(names - {"device", "dtype"})


def _keywords(cls: type) -> list[str]:
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):  # a constructor without a signature
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def fake_flow(module: torch.nn.Module, infos: dict[str, ModuleInfo], inputs) -> Flow | None:
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


