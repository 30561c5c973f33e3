"""The command line: `initaudit check`, `initaudit fix`, `initaudit rules`, `initaudit explain`."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from . import __version__
from . import config as config_mod
from . import rules as rulebook
from .activations import parse
from .audit import analyse, run
from .errors import InputError
from .loaders import load
from .outputs import Protected, atomic
from .printable import printable
from .report import FAIL_ON
from .reporters import REPORTERS


def _debugging() -> bool:
    return bool(os.environ.get("INITAUDIT_DEBUG")) or _DEBUG


_DEBUG = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _DEBUG
    _DEBUG = _DEBUG or value


def _debug_option(command):
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the traceback of an error (also INITAUDIT_DEBUG=1).")(command)


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr (the traceback above it with --debug), then exit."""
    if _debugging() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(printable(message), err=True)
    sys.exit(code)


class _Group(click.Group):
    """Usage and input errors: one line on stderr, exit 2, never a traceback (unless --debug)."""

    def main(self, *args, **kwargs):
        global _DEBUG
        _DEBUG = False
        kwargs["standalone_mode"] = False
        kwargs["prog_name"] = "initaudit"
        warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notices (torch.jit...) are not ours to print
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            code = super().main(*args, **kwargs)
        except InputError as exc:
            _fail(f"initaudit: error: {exc}")
        except click.exceptions.Abort:
            _fail("initaudit: aborted", 130)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "initaudit"
            _fail(f"{where}: error: {' '.join(exc.format_message().split())} (see `{where} --help`)")
        except click.ClickException as exc:
            _fail(f"initaudit: error: {' '.join(exc.format_message().split())}")
        except KeyboardInterrupt:
            _fail("initaudit: interrupted", 130)
        except MemoryError:
            _fail("initaudit: error: out of memory")
        except Exception as exc:  # noqa: BLE001 - a bug of ours still gets one line, not a traceback
            _fail(f"initaudit: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                  "(run with --debug for the traceback, and please report it)")
        sys.exit(code or 0)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="initaudit")
@_debug_option
def main() -> None:
    """Lint the weight initialization of neural networks (PyTorch, safetensors, TorchScript, ONNX)."""


def _model_options(command):
    """The options `check` and `fix` share: what to load, how to read it, which rules count."""
    for option in reversed([
        click.argument("model_path", metavar="MODEL", required=False, type=click.Path(path_type=Path)),
        click.option("--model", "factory", metavar="PKG.MOD:FACTORY",
                     help="Build the architecture from code (a callable returning an nn.Module); "
                          "MODEL's weights, if given, are loaded into it."),
        click.option("--activation", metavar="NAME",
                     help="Activation for layers whose activation is unknown (relu, tanh, leaky_relu:0.2, ...)."),
        click.option("--activation-for", "activation_for", metavar="PATTERN=NAME", multiple=True,
                     help="Activation for the layers matching a glob pattern, e.g. 'encoder.*.fc1=gelu'. Repeatable."),
        click.option("--select", multiple=True, metavar="RULE", help="Only these rules (name, code or code prefix). Repeatable."),
        click.option("--ignore", multiple=True, metavar="RULE", help="Skip these rules. Repeatable."),
        click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="A pyproject.toml (its [tool.initaudit]) or a TOML file of those keys. [default: nearest pyproject.toml]"),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a fully pickled model (runs code from the file: trusted files only). "
                          "Only this flag enables it, never a config file."),
        _debug_option,
        click.option("--state", type=click.Choice(("auto", "fresh", "trained")), default="auto", show_default=True,
                     help="Whether the weights are fresh from init or trained: auto tells from the weights and the file."),
    ]):
        command = option(command)
    return command


def _options(config_path, activation, activation_for, select, ignore) -> config_mod.Options:
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
    return options


@main.command()
@_model_options
@click.option("--format", "fmt", type=click.Choice(sorted(REPORTERS)), default="table", show_default=True)
@click.option("--fail-on", type=click.Choice(FAIL_ON), default=None, help="Lowest severity that fails (exit 1). [default: error]")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the report here instead of stdout.")
def check(model_path, factory, activation, activation_for, select, ignore, config_path, trust_pickle, state, fmt, fail_on,
          output):
    """Audit MODEL's initialization: .pt/.pth/.bin/.ckpt, TorchScript, .safetensors, .onnx, a Hugging Face folder."""
    options = _options(config_path, activation, activation_for, select, ignore)
    options.state = state
    options.fail_on = fail_on or options.fail_on
    loaded = load(model_path, trust_pickle=trust_pickle, factory=factory)
    if output is not None:
        Protected(loaded).guard(output, "the report")
    report = run(loaded, options)
    if output is None:
        REPORTERS[fmt](report, sys.stdout)
    else:
        with atomic(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
            REPORTERS[fmt](report, out)
    return report.exit_code(options.fail_on)


@main.command()
@_model_options
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Where to write the fixed model (same format as MODEL).")
@click.option("--all", "all_layers", is_flag=True, help="Re-initialize every layer, not just those with error or warning findings.")
@click.option("--only", multiple=True, metavar="PATTERN", help="Re-initialize just the layers matching this glob. Repeatable.")
@click.option("--seed", type=int, help="Seed for the new draws (each tensor's draw depends on the seed and its name).")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--in-place", is_flag=True, help="Replace MODEL itself (atomically). Without it the input is never written.")
@click.option("--force", is_flag=True, help="Re-draw layers even where the weights look trained (discards what they learned).")
@click.option("--probe", "probe_too", is_flag=True, help="Also measure the signal through depth before and after (as `probe`).")
def fix(model_path, factory, activation, activation_for, select, ignore, config_path, trust_pickle, state,
        out, all_layers, only, seed, dry_run, in_place, force, probe_too):
    """Re-initialize MODEL's badly initialized layers with the recommended scheme; write the same format.

    Exit 0 when every chosen layer was fixed, 1 when some could not be (they are listed) or the re-audit
    still finds an error or warning on them, 2 on bad input (and when weights that look trained would be
    re-drawn without --force: nothing is written).
    """
    from .fixer import repair
    from .reporters import fix_table
    from .writers import check_target, write

    options = _options(config_path, activation, activation_for, select, ignore)
    options.state = state
    target = _fix_target(model_path, factory, out, dry_run, in_place)
    loaded = load(model_path, trust_pickle=trust_pickle, factory=factory)
    written = load(model_path, trust_pickle=trust_pickle) if factory else loaded
    if target is not None and not in_place:
        check_target(written, target)
    result = repair(analyse(loaded, options), all_layers, list(only), seed, force)
    written_to = target if target is not None and result.tensors else None  # nothing fixed: no file written
    notes = write(written, result.tensors, target, in_place) if written_to else []
    if probe_too:
        from .probe import before_after
        result.depth["measured"] = before_after(loaded, options, result.tensors, written_to, trust_pickle, factory)
    fix_table.write(result, sys.stdout, None if written_to is None else str(written_to), dry_run)
    for note in notes:
        click.echo(printable(f"note: {note}"))
    return 1 if result.skipped or result.remaining else 0


def _fix_target(model_path: Path | None, factory: str | None, out: Path | None, dry_run: bool, in_place: bool) -> Path | None:
    """Where `fix` writes: never MODEL itself unless --in-place."""
    if model_path is None:
        raise InputError("fix needs a MODEL file (to fix a module built in code, call initaudit.fix(module) in Python)"
                         if factory else "give a model file to fix")
    if dry_run:
        return None
    if in_place and out is not None and out.resolve() != model_path.resolve():
        raise InputError("give either -o OUT or --in-place, not both")
    if in_place:
        return model_path
    if out is None:
        raise InputError("give -o OUT for the fixed model (or --in-place to replace MODEL, or --dry-run)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder")
    if out.is_dir() and not model_path.is_dir():
        raise InputError(f"{out}: a folder; give the fixed model a file name")
    if model_path.is_dir() and out.exists() and not out.is_dir():
        raise InputError(f"{out}: a file; a model folder is written to a folder")
    return out


@main.command("rules")
@_debug_option
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
@_debug_option
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


from .probe_command import probe  # noqa: E402 - its own module; imports nothing heavy until it runs

main.add_command(probe)


if __name__ == "__main__":
    main()
