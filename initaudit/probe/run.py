"""The measured side of the depth analysis: one seeded synthetic batch through the model.

For a torch module (built by a factory, a trusted pickle, a Hugging Face folder built from its config.json
with its own weights) forward hooks record each weighted layer's output and, from one backward pass of
a random projection of the output, the gradient there and on its weight. TorchScript archives and ONNX
models (onnxruntime) run forward only, their layer outputs read as extra graph outputs. Per layer: the
output's RMS relative to the input's, the share of dead ReLU units (never positive on the batch), the
share of saturated tanh/sigmoid inputs, the gradient's RMS (relative to the last hidden layer's, as
predicted), the weight gradient's norm, the mean cosine between different inputs' outputs and the channel mean
(probe/correlation.py). The findings use the same rules as the prediction, and those that ask for
`origin: measured` (signal-collapse), marked `measured`. `--input-batch` (probe/input_batch.py) replaces the
synthetic batch with the user's. The model is left as it was (mode, gradients, the global random state).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from initaudit import __version__
from initaudit.measure import depth
from initaudit.probe import sandbox
from initaudit.judge import rules as rulebook
from initaudit.judge.evaluate import evaluate
from initaudit.judge.facts import collapse_facts, signal_facts
from initaudit.measure.tensors import Measured
from initaudit.pipeline import Analysis, analyse
from initaudit.config import Options
from initaudit.flow.dynamic_trace import example_inputs
from initaudit.common.memory import physical_memory
from initaudit.common.errors import InputError, one_line
from initaudit.flow.layer import Layer
from initaudit.load.source import Loaded
from initaudit.judge.report import Finding, finding_dict
from initaudit.probe.sandbox import Policy
from initaudit.probe.correlation import ChannelSums, CosineSum, channel_axis, input_rows, last_hidden
from initaudit.probe.input_batch import InputBatch

# Inputs of tanh/sigmoid past these |z| sit on the flat tails (|tanh| > 0.99; sigmoid < 0.01 or > 0.99).
SATURATION = {"tanh": math.atanh(0.99), "sigmoid": math.log(99), "hardtanh": 1.0, "hardsigmoid": 3.0}
DEAD_ACTIVATIONS = frozenset({"relu", "relu6"})
MAX_INPUT_VALUES = 1 << 21  # the automatic batch keeps one input under this many values
FILE_GRAPHS = {"torchscript": "TorchScript", "onnx": "ONNX"}  # formats whose graph is code from the file
GB, MB = 1 << 30, 1 << 20


@dataclass
class ProbeRow:
    """One weighted layer: predicted and measured side by side."""

    name: str
    kind: str
    activation: str
    predicted_scale: float | None = None
    predicted_grad_scale: float | None = None
    scale: float | None = None
    grad_scale: float | None = None
    grad_norm: float | None = None
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    constant: bool | None = None  # the output was the same for every input of the batch (None: batch of one)
    cosine: float | None = None   # mean cosine between different inputs' outputs (None: unmeasured, or all zero)
    mean: float | None = None     # the channel mean's RMS, relative to the input's RMS as `scale` is


class Verdicts:
    """The counts and exit code of a measured report from its `layers` and `findings` (probe and coord check)."""

    @property
    def summary(self) -> dict[str, int]:
        return {"layers": len(self.layers), **{f"{s}s": sum(f.severity == s for f in self.findings)
                                               for s in ("error", "warning", "info")}}

    def exit_code(self, fail_on: str = "error") -> int:
        if fail_on == "never":
            return 0
        floor = rulebook.SEVERITIES.index(fail_on)
        return int(any(rulebook.SEVERITIES.index(f.severity) >= floor for f in self.findings))


@dataclass
class ProbeReport(Verdicts):
    model: str
    format: str
    inputs: str
    layers: list[ProbeRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input_cosine: float | None = None  # the batch's own mean cosine between samples (None: token ids)

    def agreement(self) -> float | None:
        """The largest factor between predicted and measured scales (forward and backward) over the layers."""
        ratios = [abs(math.log(m / p)) for row in self.layers
                  for p, m in ((row.predicted_scale, row.scale), (row.predicted_grad_scale, row.grad_scale))
                  if p and m and math.isfinite(p) and math.isfinite(m)]
        return math.exp(max(ratios)) if ratios else None

    def scales(self) -> list[tuple[str, float | None, float | None]]:
        """(layer, measured forward scale, measured gradient scale), in forward order."""
        return [(row.name, row.scale, row.grad_scale) for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "initaudit", "version": __version__, "model": self.model, "format": self.format,
                "origin": "measured", "inputs": self.inputs, "input_cosine": self.input_cosine,
                "agreement": self.agreement(),
                "layers": [asdict(row) for row in self.layers], "findings": [finding_dict(f) for f in self.findings],
                "summary": self.summary, "notes": self.notes}


@dataclass
class _Seen:
    """Running sums over one layer's outputs (a layer called several times counts every call)."""

    squares: float = 0.0
    count: int = 0
    grad_squares: float = 0.0
    grad_count: int = 0
    alive: torch.Tensor | None = None      # per unit: positive somewhere on the batch
    saturated: int = 0
    varies: bool | None = None             # the output differs between two samples of the batch (None: one sample)
    cosine: CosineSum = field(default_factory=CosineSum)
    channels: ChannelSums = field(default_factory=ChannelSums)

    def to_json(self) -> dict[str, Any]:
        return {"squares": self.squares, "count": self.count, "grad_squares": self.grad_squares,
                "grad_count": self.grad_count, "saturated": self.saturated,
                "alive": None if self.alive is None else self.alive.tolist(), "varies": self.varies,
                "cosine": self.cosine.to_json(), "channels": self.channels.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "_Seen":
        alive = data["alive"]
        return cls(float(data["squares"]), int(data["count"]), float(data["grad_squares"]), int(data["grad_count"]),
                   None if alive is None else torch.tensor([bool(a) for a in alive], dtype=torch.bool),
                   int(data["saturated"]), data.get("varies"), CosineSum.from_json(data["cosine"]),
                   ChannelSums.from_json(data["channels"]))


@dataclass
class _Run:
    """What one run of the model measured: each layer's sums (`seen`), its weight's gradient norm, the batch."""

    seen: dict[str, _Seen]
    grad_norms: dict[str, float]
    inputs: str                 # the batch's shapes, in words
    scale_in: float             # the inputs' RMS, which the scales are relative to
    input_cosine: float | None  # the inputs' mean cosine between samples (None: no floating input)

    def to_json(self) -> dict[str, Any]:
        return {"seen": {name: s.to_json() for name, s in self.seen.items()}, "grad_norms": self.grad_norms,
                "inputs": self.inputs, "scale_in": self.scale_in, "input_cosine": self.input_cosine}


def probe(loaded: Loaded, options: Options, input_shape: tuple[int, ...] | None = None, batch: int | None = None,
          seed: int = 0, policy: Policy = Policy(), given: InputBatch | None = None) -> ProbeReport:
    """Predict (as `check` does), then measure on a seeded synthetic batch (or the `given` one); findings from the
    measurement.

    A TorchScript or ONNX file's graph (and, with `policy.pickled`, an unpickled module's forward) runs in a child
    process within the policy's limits, and only when it trusts code; a module built from code or from a Hugging
    Face config runs here."""
    require_trust(loaded, policy)
    analysis = analyse(loaded, options)
    layers = [layer for layer in analysis.graph if layer.weighted]
    if loaded.format == "hf-folder":
        module, names = hf_module(loaded, policy.build_memory)
        run = _run_module(module, layers, input_shape, batch, seed, given, names)
    elif loaded.format in FILE_GRAPHS or (policy.pickled and loaded.format == "torch-module" and loaded.path):
        run = _run_in_child(loaded, layers, input_shape, batch, seed, given, policy)
    elif loaded.module is not None:
        run = _run_module(loaded.module, layers, input_shape, batch, seed, given)
    else:
        raise InputError(f"{loaded.path}: probe runs the model, and a {loaded.format} file holds only weights; give "
                         "the architecture with --model PKG.MOD:FACTORY (or a TorchScript, ONNX or Hugging Face model)")
    rows = _rows(analysis, layers, run)
    findings = _findings(analysis, layers, rows, options, run.input_cosine, given is not None)
    return ProbeReport(analysis.report.model, loaded.format, run.inputs, rows, findings, list(analysis.report.notes),
                       run.input_cosine)


def require_trust(loaded: Loaded, policy: Policy) -> None:
    """Refuse to run a TorchScript or ONNX file's own graph (code that came with the file) unless trusted."""
    if loaded.format in FILE_GRAPHS and not policy.trust_code:
        raise InputError(f"{loaded.name}: probe would run the {FILE_GRAPHS[loaded.format]} file's own graph, which "
                         "is code from the file; pass --trust-code if you trust its source (it then runs in a child "
                         "process, within --time-limit and --memory-limit)")


def before_after(loaded: Loaded, options: Options, tensors: dict[str, torch.Tensor], written: Path | None,
                 trust_pickle: bool = False, factory: str | None = None,
                 policy: Policy = Policy()) -> tuple[list, list]:
    """`fix --probe`: the measured scales of the model before and after the re-draw (the written file, else, on a
    dry run, a copy of the live module with the new tensors)."""
    import copy

    from initaudit.load.dispatch import load
    from initaudit.load import modules
    from initaudit.repair.writers import apply_to_module

    before = probe(loaded, options, policy=policy)
    if written is not None:
        after = load(written, trust_pickle=trust_pickle, factory=factory)
    elif loaded.module is not None and not isinstance(loaded.module, torch.jit.ScriptModule):
        twin = copy.deepcopy(loaded.module)
        apply_to_module(twin, tensors)
        after = modules.from_module(twin, None)
    else:
        return before.scales(), []
    return before.scales(), probe(after, options, policy=policy).scales()


def _rows(analysis: Analysis, layers: list[Layer], run: _Run) -> list[ProbeRow]:
    seen, grad_norms, scale_in = run.seen, run.grad_norms, run.scale_in
    facts = {m.layer.name: m.facts for m in analysis.measured if m.param is m.layer.param("weight")}
    grads = {layer.name: math.sqrt(s.grad_squares / s.grad_count) if (s := seen.get(layer.name)) and s.grad_count
             else None for layer in layers}
    relative = depth.relative_grads(layers, grads)
    rows = []
    for layer in sorted(layers, key=lambda x: x.position):
        s, f = seen.get(layer.name), facts.get(layer.name, {})
        rows.append(ProbeRow(
            layer.name, layer.kind, str(layer.activation), f.get("predicted_scale"), f.get("predicted_grad_scale"),
            math.sqrt(s.squares / s.count) / scale_in if s and s.count else None, relative.get(layer.name),
            grad_norms.get(layer.name),
            1 - float(s.alive.float().mean()) if s and s.alive is not None else None,
            s.saturated / s.count if s and s.count and _saturation(layer) else None,
            None if s is None or s.varies is None else not s.varies,
            s.cosine.value if s else None, _relative(s.channels.rms() if s else None, scale_in)))
    return rows


def _relative(value: float | None, scale_in: float) -> float | None:
    return None if value is None else value / scale_in


def dead_ends(layers: list[Layer], rows: list[ProbeRow]) -> dict[str, str]:
    """The first layer on the main path whose measured output is all zeros, or whose units are all dead, with every
    layer after it putting out the same for every input: the signal dies there (layer -> what was seen). Zeros that
    are recipes are not: a branch that joins a residual sum, a gate, a head or readout (its own row)."""
    by_name = {layer.name: layer for layer in layers}
    for i, row in enumerate(rows):
        layer = by_name[row.name]
        recipe = layer.residual_after or layer.residual_branch or layer.gate_after or layer.is_output
        dead = "its output is all zeros" if row.scale == 0 else "all its units are dead" if row.dead_fraction == 1 \
            else None
        after = [r.constant for r in rows[i + 1:] if r.constant is not None]
        if dead and not recipe and after and all(after):
            return {row.name: dead}
    return {}


def _findings(analysis: Analysis, layers: list[Layer], rows: list[ProbeRow], options: Options,
              input_cosine: float | None, given: bool) -> list[Finding]:
    """The signal rules on the measured scales and the rules that ask for `origin: measured` (signal-collapse),
    every finding of origin `measured`."""
    by_name = {row.name: row for row in rows}
    forward, backward = depth.judged(layers, {r.name: r.scale for r in rows}, {r.name: r.grad_scale for r in rows},
                                     options.signal_band)
    dead = dead_ends(layers, rows)
    forward.update(dict.fromkeys(dead, "vanishing"))
    last = last_hidden(layers)
    measured: list[Measured] = []
    for m in analysis.measured:
        row = by_name.get(m.layer.name)
        if row is None or m.param is not m.layer.param("weight"):
            continue
        seen = depth.LayerDepth(row.name, gain=None, scale=row.scale, grad_scale=row.grad_scale, dead=dead.get(row.name))
        facts = {**m.facts, **signal_facts(m.layer, seen, forward, backward, origin="measured")}
        facts.update(predicted_scale=row.scale, predicted_grad_scale=row.grad_scale,
                     **collapse_facts(row.cosine, input_cosine, m.layer.name == last,
                                      "given" if given else "synthetic"))
        measured.append(replace(m, facts=facts))
    rules = [r for r in rulebook.select(rulebook.builtin_rules(), options.select, options.ignore)
             if r.name in depth.RULES or r.when.get("origin") == "measured"]
    return [replace(f, origin="measured") for f in evaluate(measured, rules, options.ignored)]


def _saturation(layer: Layer) -> float | None:
    """|z| past which the activation right after the layer is saturated (None: not saturating, or not right after)."""
    if layer.norm_after or layer.residual_after:
        return None
    return SATURATION.get(layer.activation.name)


def _record(seen: _Seen, layer: Layer, out: torch.Tensor, chained: bool = False) -> None:
    """One call's output (samples first); `chained`: pair its samples with the previous call's too (ONNX runs)."""
    z = out.detach().double()
    seen.squares += float((z ** 2).sum())
    seen.count += z.numel()
    seen.cosine.add(z, chained)
    if z.dim() >= 1:
        seen.channels.add(z, channel_axis(layer, z))
    limit = _saturation(layer)
    if limit is not None:
        seen.saturated += int((z.abs() > limit).sum())
    if z.dim() >= 1 and z.shape[0] >= 2:
        seen.varies = bool(seen.varies) or bool((z != z[:1]).any())
    if layer.activation.name in DEAD_ACTIVATIONS and not (layer.norm_after or layer.residual_after) and z.dim() >= 1:
        axis = channel_axis(layer, z)
        alive = (z > 0).movedim(axis, 0).reshape(z.shape[axis], -1).any(dim=1)
        seen.alive = alive if seen.alive is None or seen.alive.shape != alive.shape else seen.alive | alive


# ---------------------------------------------------------------- inputs

def _batch(per_sample: int, batch: int | None) -> int:
    return batch or max(4, min(64, MAX_INPUT_VALUES // max(per_sample, 1)))


def _vocab(module: torch.nn.Module) -> int | None:
    config = getattr(module, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return next((m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)


def first_layer_shape(layers: list[Layer]) -> tuple[int, ...] | None:
    """One sample's shape as the first layer (in forward order) takes it: a Linear's in-features, a conv's channels
    at 32 pixels a side (16 frames, 64 steps)."""
    first = min((layer for layer in layers if layer.param("weight") is not None), key=lambda x: x.position, default=None)
    if first is None:
        return None
    shape = first.param("weight").shape
    if first.kind == "linear":
        return (first.param("weight").fan_in,)
    if first.kind in ("conv1d", "conv2d", "conv3d"):
        dims = int(first.kind[4])
        return (shape[1], *([64, 32, 16][dims - 1],) * dims)
    return None


def module_inputs(module: torch.nn.Module, input_shape: tuple[int, ...] | None,
                  batch: int | None, layers: list[Layer] = ()) -> tuple[tuple, dict]:
    """A synthetic batch: N(0, 1) of `input_shape` (per sample), else the shapes a tiny example input has (the
    first layer's, the HF config's), re-drawn at `batch` samples; token ids uniform over the vocabulary."""
    input_shape = input_shape or (first_layer_shape(layers) if isinstance(module, torch.jit.ScriptModule) else None)
    if input_shape:
        return (torch.randn(_batch(math.prod(input_shape), batch), *input_shape),), {}
    example = example_inputs(module)
    if example is None:
        raise InputError("cannot tell what input the model takes; give --input-shape (per sample, e.g. 3,32,32)")
    vocab = _vocab(module)

    def redraw(value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        n = _batch(value[0].numel(), batch)
        if value.is_floating_point():
            return torch.randn(n, *value.shape[1:], dtype=value.dtype)
        if value.dtype in (torch.int64, torch.int32):
            high = vocab if vocab else int(value.max()) + 1
            return torch.randint(0, max(high, 1), (n, *value.shape[1:]), dtype=value.dtype)
        return value.expand(n, *value.shape[1:]).clone()

    args, kwargs = example
    return tuple(redraw(a) for a in args), {k: redraw(v) for k, v in kwargs.items()}


def _describe(args: tuple, kwargs: dict, given: InputBatch | None = None) -> str:
    shapes = [f"{tuple(v.shape)}" for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    return ", ".join(shapes) + (f" from {given.source}" if given is not None else "")


def _input_rms(args: tuple, kwargs: dict) -> float:
    """The RMS the scales are relative to: the floating inputs' (token ids: 1)."""
    floats = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return 1.0
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in floats) / sum(v.numel() for v in floats)) or 1.0


def _input_cosine(args: tuple, kwargs: dict) -> float | None:
    """The batch's own mean cosine between samples, over its floating inputs (None: token ids only)."""
    rows = input_rows([v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)])
    if rows is None:
        return None
    cosine = CosineSum()
    cosine.add(rows)
    return cosine.value


def _measured(seen: dict[str, _Seen], grad_norms: dict[str, float], args: tuple, kwargs: dict,
              given: InputBatch | None) -> _Run:
    return _Run(seen, grad_norms, _describe(args, kwargs, given), _input_rms(args, kwargs),
                _input_cosine(args, kwargs))


# ---------------------------------------------------------------- torch

def hf_module(loaded: Loaded, budget: int | None = None) -> tuple[torch.nn.Module, dict[str, str]]:
    """A model folder's architecture built from its config.json on the CPU (transformers or timm, no code from the
    folder, nothing downloaded) with the folder's weights; and file key -> the module's key. Counted on the meta
    device first: refused when its parameters and buffers would take more than `budget` bytes (default: half the
    RAM), whatever the folder's own size."""
    import contextlib
    import io
    import warnings

    from initaudit.flow import meta_model
    from initaudit.load.hf_folder import read_config

    if loaded.path is None:
        raise InputError(f"{loaded.name}: probe builds a model folder's architecture from a local copy only; "
                         "download it first")
    config = read_config(loaded.path, [])
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            most = meta_model.most_tensors(len(loaded.tensors.shapes))
            _check_build_size(loaded, meta_model.build_module(config, device="meta", most_tensors=most)[0], budget)
            module, _ = meta_model.build_module(config, device="cpu", most_tensors=most)
    except meta_model.NotBuilt as exc:
        raise InputError(f"{loaded.path}: probe needs the architecture, and it could not be built ({exc})") from None
    keys = meta_model.key_map(module, loaded.tensors.shapes)
    state = {own: loaded.tensors[key] for key, own in keys.items()}
    module.load_state_dict(state, strict=False)
    return module.eval(), keys


def _check_build_size(loaded: Loaded, module: torch.nn.Module, budget: int | None) -> None:
    """Refuse a config whose parameters and buffers (counted on the meta device) would not fit in `budget` bytes."""
    tensors = [*module.parameters(), *module.buffers()]
    need = sum(t.numel() * t.element_size() for t in tensors)
    budget = budget if budget is not None else default_build_memory()
    if need > budget:
        raise InputError(f"{loaded.path}: the architecture its config.json describes takes {sandbox.format_size(need)} "
                         f"({sum(t.numel() for t in tensors):,} values), more than the {sandbox.format_size(budget)} "
                         "probe may build (raise it with --max-build-memory)")


def default_build_memory() -> int:
    """Half the RAM (8 GB where the system does not say)."""
    ram = physical_memory()
    return ram // 2 if ram else 8 * GB


def _run_module(module: torch.nn.Module, layers: list[Layer], input_shape, batch, seed,
                given: InputBatch | None = None, keys: dict[str, str] | None = None) -> _Run:
    """The module on the `given` batch, else on a synthetic one drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if given is not None:
            args, kwargs = given.args, given.kwargs
        else:
            args, kwargs = module_inputs(module, input_shape, batch, layers)
        if isinstance(module, torch.jit.ScriptModule):
            seen, norms = _run_script(module, layers, args, kwargs), {}
        else:
            seen, norms = _forward_backward(module, layers, args, kwargs, keys or {})
        return _measured(seen, norms, args, kwargs, given)


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next((v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def _forward_backward(module: torch.nn.Module, layers: list[Layer], args: tuple, kwargs: dict, keys: dict[str, str]):
    """`keys`: file key -> the module's, where they differ (a Hugging Face folder's tensors)."""
    seen = {layer.name: _Seen() for layer in layers}
    handles = []
    for layer in layers:
        weight = layer.param("weight")
        own = keys.get(weight.key, weight.key).rsplit(".", 1)[0] if weight is not None else layer.name
        try:
            sub = module.get_submodule(own)
        except AttributeError:
            continue
        handles.append(sub.register_forward_hook(_hook(layer, seen[layer.name])))
    params = list(module.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    training = {m: m.training for m in module.modules()}
    try:
        module.eval()
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        out = _first_tensor(module(*args, **kwargs))
        if out is None:
            raise InputError("the model's output holds no floating tensor to take a gradient of")
        (out * torch.randn_like(out)).sum().backward()
        norms = {}
        for layer in layers:
            weight = _weight(module, layer, keys)
            if weight is not None and weight.grad is not None:
                norms[layer.name] = float(weight.grad.detach().double().norm())
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        raise InputError(f"the model's forward pass failed on the batch ({type(exc).__name__}: "
                         f"{one_line(exc)}); give --input-shape or --input-batch") from None
    finally:
        for h in handles:
            h.remove()
        for p, (requires, grad) in zip(params, saved):
            p.requires_grad_(requires)
            p.grad = grad
        for m, mode in training.items():
            m.training = mode
    return seen, norms


def _weight(module: torch.nn.Module, layer: Layer, keys: dict[str, str]) -> torch.Tensor | None:
    param = layer.param("weight")
    try:
        return module.get_parameter(keys.get(param.key, param.key)) if param is not None else None
    except AttributeError:
        return None


def _hook(layer: Layer, seen: _Seen):
    def hook(module, inputs, output):
        out = _first_tensor(output)
        if out is None:
            return
        _record(seen, layer, out)
        if out.requires_grad:
            out.register_hook(lambda g: _grad(seen, g))
    return hook


def _grad(seen: _Seen, grad: torch.Tensor) -> None:
    g = grad.detach().double()
    seen.grad_squares += float((g ** 2).sum())
    seen.grad_count += g.numel()


def _run_script(module: torch.jit.ScriptModule, layers: list[Layer], args: tuple, kwargs: dict):
    """TorchScript: hooks do not reach inside a compiled module, so its inlined graph is run with every layer's
    output (its first aten::linear/conv call) returned instead of the model's (forward only)."""
    if not hasattr(module, "inlined_graph"):  # a scripted nn.LSTM: forward__0, forward__1, no one graph
        raise InputError("the TorchScript archive has no single forward graph (its forward is overloaded), so probe "
                         "cannot run it; probe the module itself with --model PKG.MOD:FACTORY")
    graph = module.inlined_graph.copy()
    from initaudit.flow.trace import LAYER_FUNCTIONS

    paths: dict[Any, str] = {}
    wanted = {layer.name: layer for layer in layers}
    found: dict[str, Any] = {}
    for node in graph.nodes():
        if node.kind() == "prim::GetAttr":
            base = paths.get(node.input(), "")
            paths[node.output()] = f"{base}.{node.s('name')}" if base else node.s("name")
        op = node.kind().split("::", 1)[-1]
        ins = list(node.inputs())
        if op in LAYER_FUNCTIONS and len(ins) > 1 and ins[1] in paths:
            name = paths[ins[1]].rsplit(".", 1)[0]
            if name in wanted and name not in found:
                found[name] = node.output()
    values = list(found.values())
    packed = graph.insertNode(graph.create("prim::TupleConstruct", values))
    packed.output().setType(torch._C.TupleType([v.type() for v in values]))
    for i in reversed(range(len(list(graph.outputs())))):
        graph.eraseOutput(i)
    graph.registerOutput(packed.output())
    fn = torch._C._create_function_from_graph("initaudit_probe", graph)
    try:
        with torch.no_grad():
            outputs = fn(module._c, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the archive's forward can raise anything
        raise InputError(f"the TorchScript forward pass failed on the batch ({type(exc).__name__}: "
                         f"{one_line(exc)}); give --input-shape or --input-batch") from None
    seen = {name: _Seen() for name in wanted}
    for name, value in zip(found, outputs):
        _record(seen[name], wanted[name], value)
    return seen


# ---------------------------------------------------------------- in a child process

def run_limits(loaded: Loaded, layers: list[Layer], batch: int | None, policy: Policy) -> tuple[float, int]:
    """(seconds, bytes) the child may take: the policy's, else 2 minutes and 1 GB, more for a large model (a minute
    and 4 bytes a weight byte per GB of weights) or batch (in proportion past 64; 32 MB a layer), the memory at
    most 3/4 of the RAM."""
    weights = sum(loaded.tensors.nbytes(key) for key in loaded.tensors)
    work = max(1.0, (batch or 64) / 64)
    seconds = policy.time_limit or 120 * work + 60 * weights / GB
    memory = GB + 4 * weights + int(work * len(layers) * 32 * MB)
    ram = physical_memory()
    return seconds, policy.memory_limit or (min(memory, ram * 3 // 4) if ram else memory)


def _run_in_child(loaded: Loaded, layers: list[Layer], input_shape, batch, seed, given: InputBatch | None,
                  policy: Policy) -> _Run:
    """The file's graph run by `script_job`, `onnx_job` or `pickled_job` in a spawned child, within the limits (the
    `given` batch handed to it)."""
    if loaded.path is None:
        raise InputError(f"{loaded.name}: probe runs local files only; download the model first")
    common = (layers, input_shape, batch, seed, given)
    if loaded.format == "onnx":
        job, args = "onnx_job", (str(loaded.path), dict(loaded.container.outputs), *common)
    else:
        job, args = ("script_job" if loaded.format == "torchscript" else "pickled_job"), (str(loaded.path), *common)
    seconds, memory = run_limits(loaded, layers, given.size if given is not None else batch, policy)
    answer = sandbox.run(f"{__name__}:{job}", args, seconds, memory, policy.show_output)
    return _measured_from_json(answer, layers)


def script_job(path: str, layers: list[Layer], input_shape, batch, seed,
               given: InputBatch | None = None) -> dict[str, Any]:
    """In the child: a TorchScript archive's graph on the synthetic (or given) batch."""
    from initaudit.load.modules import read_torchscript

    return _run_module(read_torchscript(Path(path)), layers, input_shape, batch, seed, given).to_json()


def pickled_job(path: str, layers: list[Layer], input_shape, batch, seed,
                given: InputBatch | None = None) -> dict[str, Any]:
    """In the child: a fully pickled module (trusted with --trust-pickle) forward and backward."""
    from initaudit.load.torch_files import read

    module = read(Path(path), trust_pickle=True)
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"{path}: no longer holds a pickled module")
    return _run_module(module, layers, input_shape, batch, seed, given).to_json()


def onnx_job(path: str, outputs: dict[str, str], layers: list[Layer], input_shape, batch, seed,
             given: InputBatch | None = None) -> dict[str, Any]:
    """In the child: an ONNX model through onnxruntime."""
    return _run_onnx(Path(path), outputs, layers, input_shape, batch, seed, given).to_json()


def _measured_from_json(answer: Any, layers: list[Layer]) -> _Run:
    """The child's answer as `_run_module` returns it, checked: only the layers asked for, numbers as numbers."""
    names = {layer.name for layer in layers}
    try:
        seen = {name: _Seen.from_json(value) for name, value in answer["seen"].items() if name in names}
        norms = {name: float(value) for name, value in answer["grad_norms"].items() if name in names}
        cosine = answer["input_cosine"]
        return _Run(seen, norms, str(answer["inputs"]), float(answer["scale_in"]),
                    None if cosine is None else float(cosine))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError("the child process that ran the model answered in an unexpected form") from None


# ---------------------------------------------------------------- ONNX


def _run_onnx(path: Path, layer_outputs: dict[str, str], layers: list[Layer], input_shape, batch, seed,
              given: InputBatch | None = None) -> _Run:
    """onnxruntime on a copy of the model whose layers' outputs are graph outputs too (forward only; its own log
    lines silenced). Several runs (a fixed batch) are chained: each run's samples paired with the run before's."""
    import numpy as np

    outputs = {layer.name: layer_outputs[layer.name] for layer in layers if layer.name in layer_outputs}
    names = list(dict.fromkeys(outputs.values()))
    model, session = _onnx_session(path, names)
    if given is not None:
        batches, runs, shapes = _given_feeds(path, session, given)
    else:
        batches, runs, shapes = _synthetic_feeds(path, model, session, input_shape, batch, seed)
    seen = {layer.name: _Seen() for layer in layers}
    squares = count = 0.0
    inputs = CosineSum()
    for feeds in batches:
        try:
            results = dict(zip(names, session.run(names, feeds)))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: onnxruntime failed on the batch ({one_line(exc)}); give --input-shape or "
                             "--input-batch") from None
        for layer in layers:
            if layer.name in outputs:
                out = torch.from_numpy(np.asarray(results[outputs[layer.name]], dtype=np.float64))
                _record(seen[layer.name], layer, out, chained=runs > 1)
        floats = [torch.from_numpy(v.astype(np.float64)) for v in feeds.values() if v.dtype.kind == "f"]
        rows = input_rows(floats)
        if rows is not None:
            inputs.add(rows, chained=runs > 1)
        squares += sum(float((v ** 2).sum()) for v in floats)
        count += sum(v.numel() for v in floats)
    return _Run(seen, {}, shapes, math.sqrt(squares / count) if count else 1.0, inputs.value)


def _synthetic_feeds(path: Path, model, session, input_shape, batch, seed) -> tuple:
    """(the runs' feeds, drawn as they are run; how many runs; the shapes in words)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    specs, runs = _onnx_inputs(path, session, input_shape, batch)
    feeds = ({node.name: _feed(rng, model, node, shape, path) for node, shape in specs} for _ in range(runs))
    shapes = ", ".join(f"{tuple(shape)}" for _, shape in specs) + (f" x {runs} runs" if runs > 1 else "")
    return feeds, runs, shapes


def _given_feeds(path: Path, session, given: InputBatch) -> tuple:
    """The user's batch as the model's inputs (a tensor: its one input; a dict: by name), cut into runs where the
    model's batch is fixed: (the runs' feeds, how many runs, the shapes in words)."""
    nodes = {node.name: node for node in session.get_inputs()}
    if given.args and len(nodes) != 1:
        raise InputError(f"{path}: the model takes {len(nodes)} inputs ({', '.join(nodes)}); give --input-batch a "
                         "dict of tensors by those names")
    named = {next(iter(nodes)): given.args[0]} if given.args else given.kwargs
    if set(named) != set(nodes):
        raise InputError(f"{path}: the model's inputs are {', '.join(nodes)}; --input-batch gives "
                         f"{', '.join(named)}")
    fixed = {node.shape[0] for node in nodes.values() if isinstance(node.shape[0], int) and node.shape[0] > 0}
    if len(fixed) > 1:
        raise InputError(f"{path}: the model's inputs fix different batch sizes ({sorted(fixed)})")
    step = fixed.pop() if fixed else given.size
    if given.size % step:
        raise InputError(f"{path}: the model takes batches of {step} samples; --input-batch holds {given.size}, "
                         "not a multiple")
    arrays = {name: _onnx_array(path, nodes[name], t) for name, t in named.items()}
    runs = given.size // step
    feeds = [{name: a[i * step:(i + 1) * step] for name, a in arrays.items()} for i in range(runs)]
    shapes = _describe((), named, given) + (f" in {runs} runs" if runs > 1 else "")
    return feeds, runs, shapes


def _onnx_array(path: Path, node, tensor: torch.Tensor):
    """A tensor as the numpy array of the dtype the ONNX input takes."""
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    if node.type not in types:
        raise InputError(f"{path}: input {node.name!r} of type {node.type} cannot be fed from --input-batch")
    values = tensor.detach().float() if tensor.dtype == torch.bfloat16 else tensor.detach()
    return values.numpy().astype(types[node.type])


def _onnx_session(path: Path, outputs: list[str]) -> tuple:
    """(the model, an onnxruntime session on it: one thread, CPU, quiet), `outputs` made graph outputs too."""
    import onnx
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for value in outputs:
        if value not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are many
        raise InputError(f"{path}: onnxruntime cannot run the model ({one_line(exc)})") from None
    return model, session


def _onnx_inputs(path: Path, session, input_shape, batch) -> tuple[list, int]:
    """([(input, the shape to feed it)], how many runs): per-sample shapes from the model or --input-shape, the
    batch by size; an input whose batch is fixed takes as many runs as the batch asked for needs."""
    specs, runs = [], 1
    for node in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else None for d in node.shape]
        if input_shape:
            if len(input_shape) != len(dims) - 1 or any(d not in (None, n) for d, n in zip(dims[1:], input_shape)):
                raise InputError(f"{path}: --input-shape {','.join(map(str, input_shape))} does not fit input "
                                 f"{node.name!r}, whose shape is {node.shape} (the first dimension is the batch)")
            dims = [dims[0], *input_shape]
        if any(d is None for d in dims[1:]):
            raise InputError(f"{path}: input {node.name!r} has shape {node.shape}; give --input-shape "
                             "(per sample, e.g. 3,32,32)")
        want = _batch(math.prod(dims[1:]), batch)
        if dims[0] is not None:  # a fixed batch: as many runs as the batch asked for takes
            runs = max(runs, -(-want // dims[0]))
        specs.append((node, [dims[0] or want, *dims[1:]]))
    return specs, runs


def _feed(rng, model, node, shape: list[int], path: Path):
    """One synthetic input: N(0, 1) floats, token ids below the table they index."""
    import numpy as np

    if "float" in node.type:
        dtype = np.float16 if "float16" in node.type else np.float64 if "double" in node.type else np.float32
        return rng.standard_normal(shape).astype(dtype)
    if "int" in node.type:
        return rng.integers(0, _onnx_vocab(model, node.name), shape).astype(np.int32 if "int32" in node.type else np.int64)
    raise InputError(f"{path}: input {node.name!r} of type {node.type} cannot be synthesized")


def _onnx_vocab(model, name: str) -> int:
    """Token ids for an integer input: below the smallest table a Gather looks them up in (else 2)."""
    tables = {init.name: init.dims[0] for init in model.graph.initializer if len(init.dims) == 2}
    sizes = [tables[node.input[0]] for node in model.graph.node
             if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name and node.input[0] in tables]
    return int(min(sizes)) if sizes else 2
