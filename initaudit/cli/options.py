"""The command line's options, declared once for every command that takes them (choices answer a near miss
with a did-you-mean), and the state they set for a run (--debug, --remote-timeout)."""

from __future__ import annotations

import functools
import logging
import re
import os
import warnings
from pathlib import Path

import click

from initaudit import reporters
from initaudit.common.errors import did_you_mean
from initaudit.judge.report import FAIL_ON
from initaudit.load.bounded import REMOTE, REMOTE_TIMEOUT

_debug = False


def debugging() -> bool:
    """--debug given in this run (or INITAUDIT_DEBUG set)."""
    return bool(os.environ.get("INITAUDIT_DEBUG")) or _debug


def reset_debug() -> None:
    """A new run of the command line starts without --debug."""
    global _debug
    _debug = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    _debug = _debug or value
    ctx.meta["initaudit.debug"] = _debug  # shared with every subcommand's context (probe shows a child's output)
    if value:
        show_library_output(True)


def show_library_output(show: bool) -> None:
    """Other libraries' Python warnings and log records (torch, transformers, timm, onnx...) on stderr as they
    come (--debug), or dropped: stderr carries initaudit's own lines only."""
    warnings.simplefilter("default" if show else "ignore")
    logging.disable(logging.NOTSET if show else logging.CRITICAL)


def debug_option(command):
    """`command` with --debug."""
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the traceback of an error (also INITAUDIT_DEBUG=1).")(command)


def _set_remote_timeout(ctx: click.Context, param: click.Parameter, value: float) -> None:
    REMOTE.timeout = value


class Choice(click.Choice):
    """click.Choice whose error suggests the nearest choice ('jsn' → did you mean 'json'?)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not one of {', '.join(self.choices)}{did_you_mean(str(value), self.choices, 1)}",
                      param, ctx)


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


def _input_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(part) for part in value.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give the dimensions of one sample, e.g. 3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise click.BadParameter(f"{value!r}: give positive dimensions of one sample, e.g. 3,32,32")
    return dims


def apply(options: list):
    """A decorator giving a command every option of `options`, in order."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


# Options of more than one command.
FACTORY = click.option("--model", "factory", metavar="PKG.MOD:FACTORY",
                       help="Build the architecture from code (a callable returning an nn.Module); the weights of "
                            "the model file, if given, are loaded into it.")
ACTIVATION = click.option("--activation", metavar="NAME",
                          help="Activation for layers whose activation is unknown (relu, tanh, leaky_relu:0.2, ...).")
CONFIG = click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                      help="A TOML file: its [tool.initaudit] table, or the same keys at its top level. "
                           "[default: the nearest pyproject.toml]")
TRUST_PICKLE = click.option("--trust-pickle", is_flag=True,
                            help="Allow loading a fully pickled model (runs code from the file: trusted files only). "
                                 "Only this flag enables it, never a config file.")
FAIL_ON_OPTION = click.option("--fail-on", type=Choice(FAIL_ON), default=None,
                              help="Lowest severity that fails (exit 1). [default: error]")
INPUT_SHAPE = click.option("--input-shape", callback=_input_shape, metavar="D1,D2,...",
                           help="One sample's shape (e.g. 3,32,32). [default: from the first layer, the ONNX input or "
                                "the HF config]")

# What to load, how to read it, which rules count: `check` and `fix` alike.
MODEL_OPTIONS = [
    click.argument("paths", metavar="PATH...", nargs=-1),
    FACTORY,
    ACTIVATION,
    click.option("--activation-for", "activation_for", metavar="PATTERN=NAME", multiple=True,
                 help="Activation for the layers matching a glob pattern, e.g. 'encoder.*.fc1=gelu'. Repeatable."),
    click.option("--select", multiple=True, metavar="RULE", help="Only these rules (name, code or code prefix). Repeatable."),
    click.option("--ignore", multiple=True, metavar="RULE", help="Skip these rules. Repeatable."),
    click.option("--per-layer-ignore", "per_layer_ignore", multiple=True, metavar="PATTERN=RULE[,RULE]",
                 help="Skip rules on the layers matching a glob, e.g. 'head.*=IA301'. Repeatable."),
    click.option("--extend-exclude", "extend_exclude", multiple=True, metavar="PATTERN",
                 help="Skip files and folders matching this glob while walking folders (beside the config's "
                      "exclude / extend-exclude). Repeatable."),
    CONFIG,
    TRUST_PICKLE,
    click.option("--remote-timeout", type=click.FloatRange(min=0, min_open=True), default=REMOTE_TIMEOUT,
                 show_default=True, metavar="SECONDS", expose_value=False, callback=_set_remote_timeout,
                 help="A URL's server must connect and go on answering within this many seconds (a read of n bytes "
                      "gets this plus n at 64 kB/s in all)."),
    debug_option,
    click.option("--state", type=Choice(("auto", "fresh", "trained")), default="auto", show_default=True,
                 help="Whether the weights are fresh from init or trained: auto tells from the weights and the file."),
    click.option("--expect", type=Choice(("trained", "fresh")), default=None,
                 help="The state every layer's weights must be in: a layer that looks freshly initialized where "
                      "trained weights are expected is an error (per layer: [tool.initaudit.expect])."),
    click.option("--color", type=Choice(reporters.COLOR_MODES), default="auto", show_default=True,
                 help="Colour the text output: auto = on a terminal, unless NO_COLOR is set (FORCE_COLOR forces it)."),
]

# How `check` reports.
OUTPUT_OPTIONS = [
    click.option("--format", "fmt", type=Choice(tuple(reporters.FORMATS)), default=None,
                 help="Report format: concise (one line per finding; the default off a terminal), full (per-layer "
                      "table; the default on one; `table` is its old name), json, sarif, github, junit, gitlab."),
    FAIL_ON_OPTION,
    click.option("-o", "--output", "--output-file", "output", type=click.Path(path_type=Path, dir_okay=False),
                 help="Write the report here instead of stdout."),
    click.option("-q", "--quiet", is_flag=True, help="Findings only: no table, notes, summary or progress."),
    click.option("--statistics", is_flag=True, help="Count the findings per rule instead of listing them."),
    click.option("--exit-zero", is_flag=True, help="Exit 0 even when findings fail (input errors still exit 2)."),
    click.option("--baseline", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="A baseline file (--write-baseline): the findings it records are listed as baselined and do not "
                      "fail the run; only new ones do. [default: the config's baseline]"),
    click.option("--write-baseline", "write_baseline", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="Record today's findings in this file (by rule, model path relative to it, layer and tensor: "
                      "not by message or value, so retraining keeps them) and use it as --baseline."),
]


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

    show_output = debug or debugging()
    return Policy(trust_code, time_limit, memory_limit, max_build_memory, show_output, pickled)


def run_options(command):
    """`command` with RUN_OPTIONS."""
    return functools.reduce(lambda decorated, option: option(decorated), reversed(RUN_OPTIONS), command)
