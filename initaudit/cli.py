"""The command line: `initaudit check`, `initaudit rules`, `initaudit explain`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from . import config as config_mod
from . import rules as rulebook
from .activations import parse
from .audit import run
from .errors import InputError
from .loaders import load
from .report import FAIL_ON
from .reporters import REPORTERS


class _Group(click.Group):
    """Usage and input errors: one line on stderr, exit 2, never a traceback."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except InputError as exc:
            click.echo(f"initaudit: error: {exc}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("initaudit: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("initaudit: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("initaudit: error: out of memory", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - a bug of ours still gets one line, not a traceback
            if os.environ.get("INITAUDIT_DEBUG"):
                raise
            click.echo(f"initaudit: internal error: {type(exc).__name__}: {exc} "
                       "(set INITAUDIT_DEBUG=1 for the traceback, and please report it)", err=True)
            sys.exit(2)
        sys.exit(code or 0)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="initaudit")
def main() -> None:
    """Lint the weight initialization of neural networks (PyTorch, safetensors, TorchScript, ONNX)."""


@main.command()
@click.argument("model_path", metavar="MODEL", required=False, type=click.Path(path_type=Path))
@click.option("--model", "factory", metavar="PKG.MOD:FACTORY",
              help="Build the architecture from code (a callable returning an nn.Module); MODEL's weights, if given, are loaded into it.")
@click.option("--activation", metavar="NAME", help="Activation for layers whose activation is unknown (relu, tanh, leaky_relu:0.2, ...).")
@click.option("--activation-for", "activation_for", metavar="PATTERN=NAME", multiple=True,
              help="Activation for the layers matching a glob pattern, e.g. 'encoder.*.fc1=gelu'. Repeatable.")
@click.option("--format", "fmt", type=click.Choice(sorted(REPORTERS)), default="table", show_default=True)
@click.option("--fail-on", type=click.Choice(FAIL_ON), default=None, help="Lowest severity that fails (exit 1). [default: error]")
@click.option("--select", multiple=True, metavar="RULE", help="Only these rules (name, code or code prefix). Repeatable.")
@click.option("--ignore", multiple=True, metavar="RULE", help="Skip these rules. Repeatable.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A pyproject.toml (its [tool.initaudit]) or a TOML file of those keys. [default: nearest pyproject.toml]")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled model (runs code from the file: trusted files only).")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Write the report here instead of stdout.")
def check(model_path, factory, activation, activation_for, fmt, fail_on, select, ignore, config_path, trust_pickle, output):
    """Audit MODEL's initialization: .pt/.pth/.bin/.ckpt, TorchScript, .safetensors, .onnx."""
    options = config_mod.load(config_path)
    if activation:
        options.activation = parse(activation)
    for item in activation_for:
        pattern, sep, name = item.partition("=")
        if not sep or not pattern:
            raise InputError(f"--activation-for {item!r}: use PATTERN=NAME")
        options.activations[pattern] = parse(name)
    options.select = list(select) or options.select
    options.ignore = list(ignore) + options.ignore
    options.fail_on = fail_on or options.fail_on
    loaded = load(model_path, trust_pickle=trust_pickle or options.trust_pickle, factory=factory)
    report = run(loaded, options)
    REPORTERS[fmt](report, output)
    return report.exit_code(options.fail_on)


@main.command("rules")
@click.option("--facts", is_flag=True, help="List the facts rule conditions can test instead.")
def list_rules(facts):
    """List the rules (code, name, default severity, summary)."""
    if facts:
        for name, meaning in sorted(rulebook.FACTS.items()):
            click.echo(f"{name:20} {meaning}")
        return 0
    for rule in rulebook.builtin_rules():
        click.echo(f"{rule.code}  {rule.name:26} {rule.severity:8} {rule.summary}")
    return 0


@main.command()
@click.argument("rule")
def explain(rule):
    """Explain a rule: what it does, why it matters, an example and the fix."""
    found = [r for r in rulebook.builtin_rules() if rule in (r.code, r.name)]
    if not found:
        raise InputError(f"unknown rule '{rule}' (see `initaudit rules`)")
    r = found[0]
    click.echo(f"{r.code} {r.name} ({r.severity})\n\n{r.summary}\n\nWhy is this bad?\n{r.why}\n")
    if r.example:
        click.echo("Example:\n" + "\n".join(f"  {k}: {v}" for k, v in r.example.items()) + "\n")
    click.echo(f"Fix: {r.fix}  (source: {r.source})")
    return 0


if __name__ == "__main__":
    main()
