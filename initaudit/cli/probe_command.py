"""`initaudit probe`: measure the signal through depth on a synthetic batch (torch, onnxruntime, matplotlib are
imported when the command runs, so the CLI starts without them)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from initaudit.cli.coord_command import COORD_KEYS, coord_check, coord_options, wants_coord
from initaudit.cli.options import (ACTIVATION, CONFIG, FACTORY, FAIL_ON_OPTION, INPUT_SHAPE, TRUST_PICKLE, Choice,
                                   run_options, run_policy)


@click.command()
@click.argument("model_path", metavar="MODEL", required=False, type=click.Path(path_type=Path))
@FACTORY
@INPUT_SHAPE
@click.option("--batch", type=click.IntRange(min=2), help="Samples in the synthetic batch. [default: up to 64, by size]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic batch.")
@ACTIVATION
@click.option("--format", "fmt", type=Choice(("chart", "json", "csv")), default="chart", show_default=True,
              help="chart (text), json, or csv (the coord check's records, in mup's coord-check columns).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw the chart to this image (PNG, SVG, PDF: matplotlib, the `plot` extra).")
@FAIL_ON_OPTION
@CONFIG
@TRUST_PICKLE
@run_options
@coord_options
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

    Coord check: with --widths (and --model), the factory's model is built at every width (its keyword named by
    --width-arg), measured at init and after --steps optimizer steps for --seeds seeds, and judged by
    width-dependent-scale and update-ratio.
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
    coord = {key: run.pop(key) for key in COORD_KEYS}
    if wants_coord(ctx, fmt):
        policy = run_policy(**run, pickled=False, debug=bool(ctx.meta.get("initaudit.debug")))
        return coord_check(ctx, coord, (input_shape, batch, seed), options, policy, (fmt, plot_path, fail_on))
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
