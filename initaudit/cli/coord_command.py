"""`initaudit probe --widths`: the coord check's options and its run (probe/coord.py), written as a chart, JSON or
CSV; `probe` hands over to `coord_check` when any of these options is given."""

from __future__ import annotations

import sys

import click
from click.core import ParameterSource

COORD_KEYS = ("widths", "width_arg", "steps", "seeds", "lr", "optimizer")
# What else of probe's command line the coord check reads (any other option given is refused, not ignored).
COORD_USES = {*COORD_KEYS, "model_path", "factory", "input_shape", "batch", "seed", "activation", "fmt", "plot_path",
              "fail_on", "config_path", "time_limit", "debug"}


def _widths(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        widths = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give widths such as 256,512,1024") from None
    if not widths or min(widths) < 1 or len(set(widths)) != len(widths):
        raise click.BadParameter(f"{value!r}: give distinct positive widths such as 256,512,1024")
    return widths


COORD_OPTIONS = [
    click.option("--widths", callback=_widths, metavar="W1,W2,...",
                 help="Coord check: build the --model factory's model at these widths (3 or more to judge "
                      "width-dependent-scale), at init and after --steps optimizer steps."),
    click.option("--width-arg", default="width", show_default=True, metavar="NAME",
                 help="The factory's width keyword (e.g. d_model, hidden_size)."),
    click.option("--steps", type=click.IntRange(min=0), default=2, show_default=True,
                 help="Optimizer steps after init (the coord check's t runs 1..steps+1, t = 1 at init, as mup's)."),
    click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
                 help="Seeds (from --seed on) of the init, batch and targets; the chart's error bars."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True),
                 help="Learning rate. [default: 1e-3; 0.1 for sgd (mup's)]"),
    click.option("--optimizer", default="adam", show_default=True, metavar="adam|sgd|PKG.MOD:FN",
                 help="The optimizer of the steps, or a factory called as FN(model, lr) (per-group rates such as "
                      "mup's MuAdam)."),
]


def coord_options(command):
    for option in reversed(COORD_OPTIONS):
        command = option(command)
    return command


def given(ctx: click.Context, names) -> list[str]:
    """The flags of `names` given on the command line."""
    return [param.opts[0] for param in ctx.command.params
            if param.name in names and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE]


def wants_coord(ctx: click.Context, fmt: str) -> bool:
    """Whether the command line asks for the coord check: any of its options, or --format csv."""
    return bool(given(ctx, COORD_KEYS)) or fmt == "csv"


def check_command_line(ctx: click.Context, coord: dict) -> None:
    """The coord check needs --widths and --model, and refuses a model file and the options it does not apply."""
    if not coord["widths"]:
        named = ", ".join(given(ctx, COORD_KEYS)) or "--format csv"
        raise click.UsageError(f"{named} belong to the coord check: give --widths W1,W2,... (and --model)")
    if ctx.params.get("model_path") is not None or not ctx.params.get("factory"):
        raise click.UsageError("the coord check builds the model at every width from --model PKG.MOD:FACTORY; a "
                               "model file holds one width's weights (give --model alone)")
    unused = [flag for flag in given(ctx, {param.name for param in ctx.command.params} - COORD_USES)]
    if unused:
        raise click.UsageError(f"{', '.join(unused)}: not applied by the coord check (--widths), which runs your "
                               "--model factory in this process on a synthetic batch")


def coord_check(ctx: click.Context, coord: dict, inputs: tuple, options, policy, output: tuple):
    """`probe --widths`: the sweep of probe/coord.py, written as the chart, JSON or CSV (and --plot's figure)."""
    import json

    from initaudit.probe.coord import Sweep, coord_check as sweep_model
    from initaudit.repair.outputs import atomic
    from initaudit.reporters import View, coord_chart, terminal_width, use_color

    check_command_line(ctx, coord)
    (input_shape, batch, seed), (fmt, plot_path, fail_on) = inputs, output
    sweep = Sweep(coord["widths"], coord["width_arg"], coord["steps"], tuple(range(seed, seed + coord["seeds"])),
                  coord["optimizer"], coord["lr"], input_shape, batch)
    report = sweep_model(ctx.params["factory"], sweep, options, policy)
    if fmt == "json":
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif fmt == "csv":
        coord_chart.write_csv(report, sys.stdout)
    else:
        coord_chart.write(report, sys.stdout, View(color=use_color("auto", sys.stdout), width=terminal_width(sys.stdout)))
    if plot_path is not None:
        with atomic(plot_path) as tmp:
            coord_chart.plot(report, tmp, plot_path.suffix.lstrip(".").lower() or "png")
    return report.exit_code(fail_on or options.fail_on)
