"""`initaudit probe`: measure the signal through depth on a synthetic batch (torch, onnxruntime, matplotlib are
imported when the command runs, so the CLI starts without them)."""

from __future__ import annotations

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
def probe(model_path, factory, input_shape, batch, seed, activation, fmt, plot_path, fail_on, config_path, trust_pickle):
    """Run a seeded synthetic batch through MODEL and measure each layer's signal and gradient scale.

    Activation RMS per layer, dead ReLU and saturated tanh/sigmoid shares, and (torch modules) the gradient
    from one backward pass, beside what `check` predicts from the weights alone. signal-vanishing and
    signal-exploding findings are marked "measured". Exit codes as `check`: 0 clean, 1 findings, 2 bad input.
    """
    import json

    from . import config as config_mod
    from .activations import parse
    from .loaders import load
    from .outputs import Protected, atomic
    from .probe import probe as run_probe
    from .reporters import View, depth_chart, terminal_width, use_color

    options = config_mod.load(config_path)
    if activation:
        options.activation = parse(activation)
    loaded = load(model_path, trust_pickle=trust_pickle, factory=factory)
    if plot_path is not None:
        Protected(loaded).guard(plot_path, "the plot")
    report = run_probe(loaded, options, input_shape, batch, seed)
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
