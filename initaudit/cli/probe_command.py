"""`initaudit probe`: measure the signal through depth on a synthetic batch (torch, onnxruntime, matplotlib are
imported when the command runs, so the CLI starts without them)."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import click


def _shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(part) for part in value.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give the dimensions of one sample, e.g. 3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise click.BadParameter(f"{value!r}: give positive dimensions of one sample, e.g. 3,32,32")
    return dims


class Size(click.ParamType):
    """A memory size: 512MB, 4GB, 1.5G, 800M (a bare number is MB)."""

    name = "size"
    UNITS = {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.I)
        size = float(found.group(1)) * self.UNITS[found.group(2).lower()] if found else 0
        if size < 1:
            self.fail(f"{value!r}: give a size such as 512MB or 4GB", param, ctx)
        return int(size)


# Running code that comes with the model: `probe` and `fix --probe` alike. Command line only, never a config file.
RUN_OPTIONS = [
    click.option("--trust-code", is_flag=True,
                 help="Run the graph a TorchScript or ONNX file holds: code from the file, so trusted files only. It "
                      "runs in a child process within --time-limit and --memory-limit, its output captured (shown "
                      "with --debug). Only this flag enables it (not --trust-pickle, never a config file)."),
    click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                 help="Stop a model file's run after this long. [default: 120 s, more for large models and batches]"),
    click.option("--memory-limit", type=Size(), metavar="SIZE",
                 help="Stop a model file's run once it takes this much memory (e.g. 512MB, 4GB; enforced on Linux, "
                      "best effort elsewhere). [default: 1 GB + 4x the weights, more for large batches, at most 3/4 "
                      "of the RAM]"),
    click.option("--max-build-memory", type=Size(), metavar="SIZE",
                 help="Refuse to build a Hugging Face folder's architecture from its config.json when its weights "
                      "would take more. [default: half the RAM]"),
]


def run_policy(trust_code: bool, time_limit: float | None, memory_limit: int | None, max_build_memory: int | None,
               pickled: bool, debug: bool):
    """The sandbox.Policy RUN_OPTIONS describe (`pickled`: a module in the file, not from --model; `debug`: show
    the child's output)."""
    from initaudit.probe.sandbox import Policy

    show_output = debug or bool(os.environ.get("INITAUDIT_DEBUG"))
    return Policy(trust_code, time_limit, memory_limit, max_build_memory, show_output, pickled)


def run_options(command):
    """`command` with RUN_OPTIONS."""
    return functools.reduce(lambda decorated, option: option(decorated), reversed(RUN_OPTIONS), command)


@click.command()
@click.argument("model_path", metavar="MODEL", required=False, type=click.Path(path_type=Path))
@click.option("--model", "factory", metavar="PKG.MOD:FACTORY",
              help="Build the architecture from code; MODEL's weights, if given, are loaded into it.")
@click.option("--input-shape", callback=_shape, metavar="D1,D2,...",
              help="One sample's shape (e.g. 3,32,32). [default: from the first layer, the ONNX input or the HF config]")
@click.option("--batch", type=click.IntRange(min=2), help="Samples in the synthetic batch. [default: up to 64, by size]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic batch.")
@click.option("--activation", metavar="NAME", help="Activation for layers whose activation is unknown (relu, tanh, ...).")
@click.option("--format", "fmt", type=click.Choice(("chart", "json")), default="chart", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw the chart to this image (PNG, SVG, PDF: matplotlib, the `plot` extra).")
@click.option("--fail-on", type=click.Choice(("error", "warning", "info", "never")), default=None,
              help="Lowest severity that fails (exit 1). [default: error]")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A pyproject.toml or TOML file of [tool.initaudit] keys (signal-band, fail-on...).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled model (runs code from the file).")
@run_options
@click.pass_context
def probe(ctx, model_path, factory, input_shape, batch, seed, activation, fmt, plot_path, fail_on, config_path,
          trust_pickle, **run):
    """Run a seeded synthetic batch through MODEL and measure each layer's signal and gradient scale.

    Activation RMS per layer, dead ReLU and saturated tanh/sigmoid shares, and (torch modules) the gradient
    from one backward pass, beside what `check` predicts from the weights alone. signal-vanishing and
    signal-exploding findings are marked "measured". Exit codes as `check`: 0 clean, 1 findings, 2 bad input.

    Running a model is running code: a TorchScript or ONNX file's graph runs only with --trust-code, in a
    child process within --time-limit and --memory-limit. A --model factory's module (your code) and a Hugging
    Face folder's architecture (built from config.json, within --max-build-memory) need no flag.
    """
    import json

    from initaudit import config as config_mod
    from initaudit.flow.activations import parse
    from initaudit.load.dispatch import load
    from initaudit.repair.outputs import Protected, atomic
    from initaudit.probe.run import probe as run_probe
    from initaudit.reporters import View, depth_chart, terminal_width, use_color

    options = config_mod.load(config_path)
    if activation:
        options.activation = parse(activation)
    loaded = load(model_path, trust_pickle=trust_pickle, factory=factory)
    if plot_path is not None:
        Protected(loaded).guard(plot_path, "the plot")
    policy = run_policy(**run, pickled=factory is None, debug=bool(ctx.meta.get("initaudit.debug")))
    report = run_probe(loaded, options, input_shape, batch, seed, policy)
    if fmt == "json":
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        view = View(color=use_color("auto", sys.stdout), width=terminal_width(sys.stdout))
        depth_chart.write(report, sys.stdout, options.signal_band, view)
    if plot_path is not None:
        with atomic(plot_path) as tmp:
            depth_chart.plot(report, tmp, options.signal_band, plot_path.suffix.lstrip(".").lower() or "png")
    return report.exit_code(fail_on or options.fail_on)
