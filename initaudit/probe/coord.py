"""The coord check (`initaudit probe --model PKG:FACTORY --widths 256,512,1024 --steps k`): the model built at every
width (the factory called with the width keyword), measured at init and after each of k real optimizer steps, for
every seed, as microsoft/mup's coord check does.

Each weighted layer's output is described (probe/representation.py: mup's `l1` = mean |x|, the RMS, the channel
mean, the mean cosine between samples) on one seeded synthetic batch, the same at every width. t counts as mup's
does: t = 1 at init, t after t - 1 steps. The steps run in train mode on a loss the report states (cross-entropy
against fixed random labels for a classifier-shaped output, else mean squared error against fixed random
targets); the measurements run in eval mode, without gradients. After each step, each layer's update ratio
‖W_t − W_(t−1)‖ / ‖W_0‖ (a weight that starts at zero: against its recommended init's norm). The rules
`width-dependent-scale` and `update-ratio` judge the seed-averaged results (origin `measured`).

The factory and an `--optimizer` factory are the user's own code: they run in this process, like probe's
`--model`; the sweep stops once it has run longer than the time limit of one run times widths × seeds × (steps+1).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from initaudit import __version__
from initaudit.common.errors import InputError, one_line
from initaudit.config import Options
from initaudit.flow.layer import Layer
from initaudit.judge import rules as rulebook
from initaudit.judge.evaluate import evaluate
from initaudit.judge.facts import coord_facts
from initaudit.judge.report import Finding, finding_dict
from initaudit.load.modules import from_module, resolve
from initaudit.pipeline import Analysis, analyse
from initaudit.probe.input_batch import InputBatch
from initaudit.probe.representation import Representation, describe
from initaudit.probe.run import Verdicts, module_inputs
from initaudit.probe.sandbox import Policy

RULES = ("width-dependent-scale", "update-ratio")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
DEFAULT_LR = {"sgd": 0.1}  # mup's coord-check defaults: 0.1 for SGD, 1e-3 for Adam (and an optimizer factory)
RUN_SECONDS = 120.0  # one run's default time limit (as probe's): one forward, or one step, at one width and seed
MODES = {"steps": "train", "measurements": "eval"}


@dataclass(frozen=True)
class Sweep:
    """What the coord check runs."""

    widths: tuple[int, ...]
    width_arg: str = "width"         # the factory's width keyword
    steps: int = 1                   # optimizer steps after init
    seeds: tuple[int, ...] = (0,)    # each seeds the model's init, the batch and the targets
    optimizer: str = "adam"          # adam, sgd, or package.module:function called as function(model, lr)
    lr: float | None = None          # None: mup's default (0.1 for SGD, 1e-3 otherwise)
    input_shape: tuple[int, ...] | None = None
    batch: int | None = None
    given: InputBatch | None = None  # --input-batch: the inputs at every width and seed (its labels, the targets)

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, 1e-3)

    @property
    def runs(self) -> int:
        return len(self.widths) * len(self.seeds) * (self.steps + 1)

    def optimizer_words(self) -> str:
        name = {"adam": "Adam", "sgd": "SGD"}.get(self.optimizer, self.optimizer)
        return f"{name} at lr {self.rate:g}"


@dataclass
class Record:
    """One layer's output at one width, step and seed (mup's coord-check columns width, module, t, l1, and more)."""

    width: int
    module: str
    t: int
    seed: int
    l1: float
    rms: float
    mean: float
    cosine: float
    update_ratio: float | None = None  # ‖W_t − W_(t−1)‖ / ‖W_0‖ of the step just taken (None at t = 1)


@dataclass
class CoordLayer:
    """One layer's verdict material, seeds averaged."""

    name: str
    kind: str
    slopes: dict[int, float | None]     # t -> slope of log(mean |x|) against log(width)
    update_ratio: float | None = None   # the largest step's ratio over widths and steps
    update_width: int | None = None
    sign_step_ratio: float | None = None  # lr·√numel / reference norm at that width (Adam's first step)


@dataclass
class CoordReport(Verdicts):
    model: str
    sweep: Sweep
    loss: str
    records: list[Record] = field(default_factory=list)
    layers: list[CoordLayer] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        s = self.sweep
        return {"widths": list(s.widths), "width_arg": s.width_arg, "steps": s.steps, "seeds": list(s.seeds),
                "optimizer": s.optimizer, "lr": s.rate, "loss": self.loss, "modes": MODES,
                "width_tolerance": "slope of log(mean |x|) against log(width) above 0.2 (rule width-dependent-scale)",
                "update_band": "one step's update ratio at most 0.5; Adam's first step gives about lr/std"}

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "initaudit", "version": __version__, "model": self.model, "format": "torch-module",
                "origin": "measured", "check": "coord", "settings": self.settings(),
                "layers": [json_safe(asdict(layer)) for layer in self.layers],
                "records": [json_safe(asdict(r)) for r in self.records],
                "findings": [finding_dict(f) for f in self.findings], "summary": self.summary, "notes": self.notes}


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as null (JSON has no such numbers); dict keys as strings."""
    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value
    return {k: plain(v) for k, v in row.items()}


@dataclass
class Deadline:
    """The sweep's wall-clock limit, checked after every forward pass and step."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def check(self, where: str) -> None:
        if time.monotonic() - self.start > self.seconds:
            raise InputError(f"the coord check ran longer than its {self.seconds:g} s time limit (at {where}) and was "
                             "stopped; raise it with --time-limit (the limit of one run, scaled by widths x seeds x "
                             "(steps + 1))")


@dataclass
class Run:
    """What one width and seed gave."""

    records: list[Record]
    loss: str
    sign_steps: dict[str, float]


# ---------------------------------------------------------------- the sweep

def coord_check(spec: str, sweep: Sweep, options: Options, policy: Policy = Policy()) -> CoordReport:
    """The coord check of the model `spec` (package.module:factory) builds, judged; the global random state is left
    as it was."""
    check_sweep(sweep)
    factory = resolve(spec)
    deadline = Deadline((policy.time_limit or RUN_SECONDS) * sweep.runs)
    records, analyses, sign_ratios, loss = [], {}, {}, ""
    with torch.random.fork_rng(devices=[]):
        for width in sweep.widths:
            for seed in sweep.seeds:
                model = build(factory, spec, sweep, width, seed)
                if width not in analyses:
                    analyses[width] = analyse(from_module(copy.deepcopy(model), None), options)
                run = run_one(model, analyses[width], sweep, width, seed, deadline)
                records += run.records
                loss = run.loss
                for name, ratio in run.sign_steps.items():
                    sign_ratios.setdefault((name, width), ratio)  # the first seed's (they differ by noise)
    layers = layer_rows(analyses[max(sweep.widths)], records, sign_ratios, sweep)
    notes = [] if len(sweep.widths) >= 3 else ["fewer than 3 widths: width-dependent-scale is not judged"]
    findings = judge(analyses[max(sweep.widths)], layers, aggregate(records), sweep, options)
    return CoordReport(spec, sweep, loss, records, layers, findings, notes)


def check_sweep(sweep: Sweep) -> None:
    if not sweep.widths or min(sweep.widths) < 1 or len(set(sweep.widths)) != len(sweep.widths):
        raise InputError(f"--widths {','.join(map(str, sweep.widths))}: give distinct positive widths, e.g. 256,512,1024")
    if sweep.steps < 0 or not sweep.seeds:
        raise InputError("--steps takes 0 or more steps and --seeds 1 or more seeds")
    if sweep.rate <= 0 or not math.isfinite(sweep.rate):
        raise InputError(f"--lr {sweep.rate:g}: the learning rate must be a positive number")


def build(factory: Callable, spec: str, sweep: Sweep, width: int, seed: int) -> torch.nn.Module:
    """The factory's model at `width`, its init drawn under `seed`."""
    torch.manual_seed(seed)
    try:
        model = factory(**{sweep.width_arg: width})
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise InputError(f"--model {spec!r}: the factory raised {type(exc).__name__} at {sweep.width_arg}={width}: "
                         f"{one_line(exc)} (--width-arg names its width keyword)") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--model {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def make_optimizer(sweep: Sweep, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD over every parameter at the sweep's rate, or the user's `--optimizer` factory's (model, lr)."""
    if sweep.optimizer in OPTIMIZERS:
        return OPTIMIZERS[sweep.optimizer](model.parameters(), lr=sweep.rate)
    make = resolve(sweep.optimizer, "--optimizer")
    try:
        optimizer = make(model, sweep.rate)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise InputError(f"--optimizer {sweep.optimizer!r} raised {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(f"--optimizer {sweep.optimizer!r}: returned {type(optimizer).__name__}, not a "
                         "torch.optim.Optimizer (it is called as function(model, lr))")
    return optimizer


def weighted_layers(analysis: Analysis) -> list[Layer]:
    return sorted((layer for layer in analysis.graph if layer.weighted and layer.param("weight") is not None),
                  key=lambda layer: layer.position)


def run_one(model: torch.nn.Module, analysis: Analysis, sweep: Sweep, width: int, seed: int,
            deadline: Deadline) -> Run:
    """One width and seed: measured at init, then after each step, with each step's update ratios."""
    layers = weighted_layers(analysis)
    modules, weights = hooked(model, layers)
    convs = frozenset(layer.name for layer in layers if layer.kind.startswith("conv"))
    if sweep.given is not None:
        args, kwargs = sweep.given.args, sweep.given.kwargs
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            args, kwargs = module_inputs(model, sweep.input_shape, sweep.batch, layers)
    optimizer = make_optimizer(sweep, model)
    reference = reference_norms(analysis, weights)
    records = as_records(measure(model, modules, args, kwargs, convs), width, 1, seed, {})
    deadline.check(f"width {width}, seed {seed}, init")
    targets, loss = (sweep.given.labels if sweep.given is not None else None), ""
    for t in range(2, sweep.steps + 2):
        before = {name: w.detach().clone() for name, w in weights.items()}
        targets, loss = step(model, optimizer, args, kwargs, targets, seed)
        ratios = {name: float((w.detach() - before[name]).double().norm()) / reference[name]
                  for name, w in weights.items() if reference.get(name)}
        records += as_records(measure(model, modules, args, kwargs, convs), width, t, seed, ratios)
        deadline.check(f"width {width}, seed {seed}, step {t - 1}")
    return Run(records, loss or "none (no steps)", sign_steps(optimizer, weights, reference))


def hooked(model: torch.nn.Module, layers: list[Layer]) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    """Layer name -> its module (whose output is measured) and -> its weight (whose steps are measured)."""
    modules, weights = {}, {}
    for layer in layers:
        key = layer.param("weight").key
        try:
            modules[layer.name] = model.get_submodule(key.rpartition(".")[0])
            weights[layer.name] = model.get_parameter(key)
        except AttributeError:  # a weight the module computes (weight norm): measured but not stepped
            continue
    return modules, weights


def reference_norms(analysis: Analysis, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W_0‖, or, for a weight that starts at zero, the norm its recommended init would give (expected_std·√numel)."""
    expected = {m.layer.name: m.facts.get("expected_std") for m in analysis.measured
                if m.param is m.layer.param("weight")}
    norms = {}
    for name, w in weights.items():
        norm = float(w.detach().double().norm())
        std = expected.get(name)
        norms[name] = norm if norm > 0 else (std * math.sqrt(w.numel()) if std else 0.0)
    return norms


def sign_steps(optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
               reference: dict[str, float]) -> dict[str, float]:
    """Per layer, the ratio a sign step (Adam's first: lr·sign(g) on every entry) gives at the rate of the
    optimizer group holding its weight: lr·√numel over the reference norm."""
    rates = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    return {name: rates[id(w)] * math.sqrt(w.numel()) / reference[name]
            for name, w in weights.items() if reference.get(name) and id(w) in rates}


def first_float(value: Any) -> torch.Tensor | None:
    return next((v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def measure(model: torch.nn.Module, modules: dict[str, torch.nn.Module], args: tuple,
            kwargs: dict, convs: frozenset[str] = frozenset()) -> dict[str, Representation]:
    """Each hooked layer's output described (`convs`: the conv layers, whose channels are axis 1), in eval mode
    without gradients (a layer called several times: the average of its calls)."""
    seen: dict[str, list[Representation]] = {}

    def record(name: str):
        def hook(module, inputs, output):
            out = first_float(output)
            if out is not None:
                seen.setdefault(name, []).append(describe(out, name in convs))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the model's forward can raise anything
        raise InputError(f"the model's forward pass failed on the synthetic batch ({type(exc).__name__}: "
                         f"{one_line(exc)}); give --input-shape") from None
    finally:
        for handle in handles:
            handle.remove()
    return {name: average(found) for name, found in seen.items()}


def average(found: list[Representation]) -> Representation:
    return Representation(**{f.name: statistics.fmean(getattr(r, f.name) for r in found) for f in fields(Representation)})


def as_records(described: dict[str, Representation], width: int, t: int, seed: int,
               ratios: dict[str, float]) -> list[Record]:
    return [Record(width, name, t, seed, r.l1, r.rms, r.mean, r.cosine, ratios.get(name) if t > 1 else None)
            for name, r in described.items()]


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict,
         targets: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, str]:
    """One optimizer step in train mode on the loss against `targets` (the batch's labels), or fixed random targets
    drawn under `seed` on the first step; the targets and the loss in words."""
    labelled = targets is not None
    model.train()
    optimizer.zero_grad(set_to_none=True)
    try:
        out = first_float(model(*args, **kwargs))
        if out is None:
            raise InputError("the model's output holds no floating tensor to take a loss of")
        targets = fixed_targets(out, seed) if targets is None else targets
        value, words = loss_of(out, targets, labelled)
        value.backward()
        optimizer.step()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's and the optimizer's code can raise anything
        raise InputError(f"an optimizer step failed ({type(exc).__name__}: {one_line(exc)})") from None
    return targets, words


def classifier_shaped(out: torch.Tensor) -> bool:
    """Samples first, classes last (2 or more): (N, C), or (N, T, C) for a sequence."""
    return out.dim() >= 2 and out.shape[-1] >= 2


def fixed_targets(out: torch.Tensor, seed: int) -> torch.Tensor:
    """Random labels for a classifier-shaped output, else N(0, 1) targets of its shape; the same at every width."""
    generator = torch.Generator().manual_seed(seed)
    if classifier_shaped(out):
        return torch.randint(0, out.shape[-1], out.shape[:-1], generator=generator)
    return torch.randn(out.shape, generator=generator, dtype=out.dtype)


def loss_of(out: torch.Tensor, targets: torch.Tensor, labelled: bool = False) -> tuple[torch.Tensor, str]:
    """Cross-entropy against integer labels of a classifier-shaped output, else mean squared error; in words, whose
    targets (the batch's `labels`, or fixed random ones)."""
    if classifier_shaped(out) and not targets.is_floating_point():
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
        whose = "the input batch's labels" if labelled else "fixed random labels"
        return loss, f"cross-entropy over the output's last dimension ({out.shape[-1]} classes) against {whose}"
    if out.shape != targets.shape:
        raise InputError(f"the input batch's labels have shape {tuple(targets.shape)}: neither class indices for nor "
                         f"targets of the output's shape {tuple(out.shape)}")
    whose = "the input batch's labels" if labelled else "fixed random N(0, 1) targets"
    return torch.nn.functional.mse_loss(out, targets.to(out.dtype)), f"mean squared error against {whose}"


# ---------------------------------------------------------------- seeds averaged, and judged

def aggregate(records: list[Record], column: str = "l1") -> dict[tuple[str, int], dict[int, tuple[float, float]]]:
    """(module, t) -> width -> (mean over seeds, their standard deviation: 0 for one seed) of `column`."""
    values: dict[tuple[str, int], dict[int, list[float]]] = {}
    for r in records:
        value = getattr(r, column)
        if value is not None:
            values.setdefault((r.module, r.t), {}).setdefault(r.width, []).append(value)
    return {key: {w: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for w, v in sorted(by.items())}
            for key, by in values.items()}


def slope(by_width: dict[int, tuple[float, float]]) -> float | None:
    """The least-squares slope of log(mean) against log(width); None under 2 widths or where a mean is not a
    positive number (a zero output has no log)."""
    means = [mean for mean, _ in by_width.values()]
    if len(means) < 2 or not all(0 < mean < math.inf for mean in means):
        return None
    return statistics.linear_regression([math.log(w) for w in by_width], [math.log(m) for m in means]).slope


def layer_rows(analysis: Analysis, records: list[Record], sign_ratios: dict[tuple[str, int], float],
               sweep: Sweep) -> list[CoordLayer]:
    scales, updates = aggregate(records, "l1"), aggregate(records, "update_ratio")
    rows = []
    for layer in weighted_layers(analysis):
        slopes = {t: slope(scales[(layer.name, t)]) for t in range(1, sweep.steps + 2)
                  if (layer.name, t) in scales}
        steps = [(mean, w) for t in range(2, sweep.steps + 2) for w, (mean, _) in updates.get((layer.name, t), {}).items()]
        ratio, width = max(steps, default=(None, None))
        rows.append(CoordLayer(layer.name, layer.kind, slopes, ratio, width, sign_ratios.get((layer.name, width))))
    return rows


def width_facts(row: CoordLayer, scales: dict[tuple[str, int], dict[int, tuple[float, float]]],
                sweep: Sweep) -> dict[str, Any]:
    """The steepest growth with width after the steps (at init without any)."""
    judged = range(2, sweep.steps + 2) if sweep.steps else (1,)
    slopes = [(s, t) for t, s in row.slopes.items() if t in judged and s is not None]
    facts = {"count": len(sweep.widths), "range": f"{min(sweep.widths)} to {max(sweep.widths)}"}
    if not slopes:
        return facts
    steepest, t = max(slopes)
    by_width = scales[(row.name, t)]
    growth = by_width[max(by_width)][0] / by_width[min(by_width)][0]
    return {**facts, "slope": steepest, "t": t, "growth": growth}


def judge(analysis: Analysis, rows: list[CoordLayer], scales: dict[tuple[str, int], dict[int, tuple[float, float]]],
          sweep: Sweep, options: Options) -> list[Finding]:
    """The coord rules on each layer's weight, its facts those of the sweep (`scales`: `aggregate`'s l1)."""
    by_name = {row.name: row for row in rows}
    measured = []
    for m in analysis.measured:
        row = by_name.get(m.layer.name)
        if row is None or m.param is not m.layer.param("weight"):
            continue
        update = {"ratio": row.update_ratio, "width": row.update_width, "sign_step": row.sign_step_ratio,
                  "optimizer": sweep.optimizer_words()}
        facts = coord_facts(width_facts(row, scales, sweep), update)
        measured.append(replace(m, facts={**m.facts, **facts}))
    rules = [r for r in rulebook.select(rulebook.builtin_rules(), options.select, options.ignore) if r.name in RULES]
    return [replace(f, origin="measured") for f in evaluate(measured, rules, options.ignored)]
