"""The command line: `initaudit check`, `initaudit fix`, `initaudit rules`, `initaudit explain`.

Start-up is instant: this module imports click and initaudit's torch-free parts only (config, rules, path
discovery, the reporters' names). torch, onnx and the loaders are imported inside the commands that audit,
after the flags, the config and the paths have been checked, so `--help`, `--version`, `rules`, `explain`
and every usage error answer in a fraction of a second. Options shared by commands are declared once
(`MODEL_OPTIONS`, `OUTPUT_OPTIONS`); commands are registered at the bottom with `main.add_command`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from initaudit import __version__
from initaudit import config as config_mod
from initaudit.load import discover
from initaudit.load.paths import is_remote
from initaudit import reporters
from initaudit.judge import rules as rulebook
from initaudit.flow.activations import parse
from initaudit.common.errors import InputError, NoWeights, did_you_mean, first_line
from initaudit.common.printable import printable, show_unencodable
from initaudit.cli.options import (MODEL_OPTIONS, OUTPUT_OPTIONS, apply, debug_option, debugging, reset_debug,
                                   run_options, run_policy, show_library_output)
from initaudit.cli.probe_command import probe
from initaudit.judge import baseline as baseline_file
from initaudit.judge.baseline import Baseline
from initaudit.judge.report import FileError, Results


@contextlib.contextmanager
def _heavy_imports():
    """Import torch and the pipeline with the cyclic garbage collector paused, then freeze what they built.

    torch's import allocates about a million long-lived objects: every collection during it, each later one
    and the last one at exit would walk them all again for nothing (0.5 s of a 1.8 s start-up). Done once
    per process; a process that already holds torch (the test suite, the Python API) is left as it is.
    """
    if "torch" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def _library_output_kept_off_stderr():
    """`_show_library_output` for one run of the command line; the process' filters and logging as they were
    afterwards (the Python API and the test suite keep theirs)."""
    disabled = logging.root.manager.disable
    with warnings.catch_warnings():
        show_library_output(debugging())
        try:
            yield
        finally:
            logging.disable(disabled)


def _error_line(message: str) -> None:
    """One line on stderr (the traceback above it with --debug)."""
    if debugging() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(printable(message), err=True)


def _fail(message: str, code: int = 2) -> None:
    _error_line(message)
    sys.exit(code)


class _Group(click.Group):
    """Usage and input errors: one line on stderr, exit 2, never a traceback (unless --debug)."""

    def main(self, *args, **kwargs):
        reset_debug()
        kwargs["standalone_mode"] = False
        kwargs["prog_name"] = "initaudit"
        show_unencodable(sys.stdout)
        try:
            with _library_output_kept_off_stderr():
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
        except SystemExit:
            raise
        except BaseException as exc:  # a library's own BaseException (DCP's CheckpointException): one line, exit 2
            _fail(f"initaudit: internal error: {type(exc).__name__}: {first_line(exc)} "
                  "(run with --debug for the traceback, and please report it)")
        sys.exit(code or 0)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="initaudit")
@debug_option
def main() -> None:
    """Lint the weight initialization of neural networks (PyTorch, safetensors, TorchScript, ONNX)."""


def _options(config_path, activation, activation_for, select, ignore, per_layer_ignore=(), state="auto", expect=None):
    """The config file's options under the command line's, every rule name checked (no torch needed)."""
    options = config_mod.load(config_path)
    if activation:
        options.activation = parse(activation)
    for item in activation_for:
        pattern, sep, name = item.partition("=")
        if not sep or not pattern:
            raise InputError(f"--activation-for {item!r}: use PATTERN=NAME")
        options.activations[pattern] = parse(name)
    for item in per_layer_ignore:
        pattern, sep, names = item.partition("=")
        rules = [n.strip() for n in names.split(",") if n.strip()]
        if not sep or not pattern or not rules:
            raise InputError(f"--per-layer-ignore {item!r}: use PATTERN=RULE[,RULE...], e.g. 'head.*=IA301'")
        rulebook.check_names(rulebook.builtin_rules(), rules, f"--per-layer-ignore {item!r}: ")
        options.per_layer_ignores.setdefault(pattern, []).extend(rules)
    options.select = list(select) or options.select
    options.ignore = list(ignore) + options.ignore
    rulebook.check_names(rulebook.builtin_rules(), [*options.select, *options.ignore])
    options.state = state
    if expect:
        options.expect = {"*": expect}
    return options


def _targets(paths, factory, options, extend_exclude, problems: list | None = None) -> list:
    """The models PATH... names (files, model folders, walked folders, globs, URLs); [None] for --model alone.
    Arguments that name nothing readable go to `problems` when given, else raise."""
    if not paths:
        if factory is None:
            raise click.UsageError("give one or more model files or folders (PATH...), or --model package.module:factory",
                                   click.get_current_context())
        return [None]
    excluded = discover.Excluder(options.exclude, [*options.extend_exclude, *extend_exclude])
    return discover.expand(list(paths), excluded, problems)


@click.command()
@apply(MODEL_OPTIONS + OUTPUT_OPTIONS)
@click.option("--optimizer-state", "optimizer_state", is_flag=True,
              help="Also audit a distributed checkpoint's optimizer state, for NaN/Inf only. Without it that "
                   "state is skipped, and only taken as evidence that the weights are trained.")
@click.option("--distributed", is_flag=True,
              help="Measure one safetensors or DCP checkpoint split over the ranks of `torchrun ... -m initaudit "
                   "check --distributed CKPT` (each reads its share of the bytes; rank 0 writes the report).")
def check(paths, factory, activation, activation_for, select, ignore, per_layer_ignore, extend_exclude, config_path,
          trust_pickle, state, expect, color, fmt, fail_on, output, quiet, statistics, exit_zero, baseline,
          write_baseline, optimizer_state, distributed):
    """Audit the initialization of the models in PATH...: files (.pt/.pth/.bin/.ckpt, TorchScript, .safetensors,
    .onnx), Hugging Face folders, folders to walk (model files found by content) and glob patterns.

    Exit 0 clean, 1 findings at or above --fail-on, 2 when a model cannot be read or a flag is wrong
    (the worst over all models). With a baseline, only findings it does not record count.
    """
    options = _options(config_path, activation, activation_for, select, ignore, per_layer_ignore, state, expect)
    options.fail_on = fail_on or options.fail_on
    recorded = _read_baseline(baseline or options.baseline, write_baseline, output)
    outputs = {path: what for path, what in ((output, "the report"), (write_baseline, "the baseline")) if path}
    run = functools.partial(_check, paths, factory, extend_exclude, trust_pickle, color, fmt, output, quiet,
                            statistics, exit_zero, optimizer_state, options, (recorded, write_baseline, outputs))
    if distributed:
        if len(paths) != 1 or factory is not None:
            raise click.UsageError("--distributed audits one checkpoint PATH", click.get_current_context())
        from initaudit.distributed.ranks import on_ranks

        return on_ranks(run)
    return run()


def _check(paths, factory, extend_exclude, trust_pickle, color, fmt, output, quiet, statistics, exit_zero,
           optimizer_state, options, baselines: tuple, report_of=None, leader: bool = True) -> int:
    """check's run over its targets (`baselines`: the baseline read, the one to write, the files no model may be;
    `report_of(loaded, options)`: how a loaded model's report is made; `leader`: this process writes the report)."""
    recorded, write_baseline, outputs = baselines
    problems: list = [] if len(paths) > 1 else None  # several PATHs: one that names nothing does not stop the run
    targets = _targets(paths, factory, options, extend_exclude, problems)
    stream = sys.stdout
    to_file = output is not None  # a report file is plain text unless --color always
    view = reporters.View(color=color == "always" if to_file else reporters.use_color(color, stream),
                          width=None if to_file else reporters.terminal_width(stream),
                          quiet=quiet, statistics=statistics, fail_on=options.fail_on)
    fmt = fmt or ("full" if not to_file and reporters.is_terminal(stream) else "concise")
    results = Results(combined=len(targets) + len(problems or ()) > 1)
    for arg, exc in problems or ():
        _error_line(f"initaudit: error: {exc}")
        results.unreadable.append(FileError(arg, str(exc)))
    _audit_all(results, targets, factory, trust_pickle, options, outputs, quiet, optimizer_state, report_of)
    if not leader:
        return 0
    if write_baseline is not None:
        recorded = _write_baseline(results, write_baseline)
    if recorded is not None:
        selected = {r.name for r in rulebook.select(rulebook.builtin_rules(), options.select, options.ignore)}
        recorded.apply(results, lambda e: e.rule in selected and not options.ignored(e.layer, e.rule, e.code))
    if output is None:
        reporters.writer(fmt)(results, stream, view)
    else:
        from initaudit.repair.outputs import atomic

        with atomic(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
            reporters.writer(fmt)(results, out, view)
    code = results.exit_code(options.fail_on)
    return 0 if exit_zero and code == 1 else code


def _read_baseline(baseline: Path | None, write_baseline: Path | None, output: Path | None) -> Baseline | None:
    """The baseline to apply (read before any model: a bad one stops the run at once); None when there is none or
    --write-baseline will write it."""
    if write_baseline is not None and output is not None and write_baseline.absolute() == output.absolute():
        raise InputError(f"{output}: named by both -o and --write-baseline; give the report and the baseline "
                         "different files")
    if write_baseline is not None or baseline is None:
        return None
    if not baseline.is_file():
        raise InputError(f"{baseline}: no such baseline file (write one with --write-baseline {baseline})")
    return Baseline.read(baseline)


def _write_baseline(results: Results, path: Path) -> Baseline:
    """Record every finding of `results` in `path` (atomically) and read it back, to be applied."""
    from initaudit.repair.outputs import atomic

    with atomic(path) as tmp:
        tmp.write_text(baseline_file.dumps(results, path.absolute().parent), encoding="utf-8")
    return Baseline.read(path)


def _audit_all(results: Results, targets: list, factory, trust_pickle: bool, options, outputs: dict[Path, str],
               quiet: bool, optimizer_state: bool = False, report_of=None) -> None:
    """Every model audited in turn into `results` (torch imported once; `report_of`: how, pipeline.run by default);
    in a combined run, one that cannot be read is reported on stderr and the run goes on. No model may be one of
    the `outputs` (path -> what it is)."""
    with _heavy_imports():
        from initaudit.pipeline import run
        from initaudit.load.dispatch import load
        from initaudit.repair.outputs import Protected
        from initaudit.common.progress import Progress

    def unreadable(target, exc: InputError) -> None:
        if not results.combined:
            raise exc
        _error_line(f"initaudit: error: {exc}")
        results.unreadable.append(FileError(str(target), str(exc)))

    with Progress(len(targets), enabled=not quiet) as progress:
        for done, target in enumerate(targets):
            progress.step(printable(target or factory), done)
            try:
                loaded = load(target, trust_pickle=trust_pickle, factory=factory, optimizer_state=optimizer_state)
            except NoWeights as exc:
                if not results.combined:
                    raise
                _error_line(f"initaudit: note: skipped {exc}")
                results.skipped.append(FileError(str(target), str(exc)))
                continue
            except InputError as exc:
                unreadable(target, exc)
                continue
            if optimizer_state and loaded.format != "torch-dcp":
                loaded.notes.append("--optimizer-state audits a distributed checkpoint's optimizer state; this "
                                    f"{loaded.format} model's is not audited")
            for path, what in outputs.items():
                Protected(loaded).guard(path, what)
            try:
                results.reports.append((report_of or run)(loaded, options))
            except InputError as exc:
                unreadable(target, exc)
                continue
            if results.reports[-1].no_verdict():
                _error_line(f"initaudit: error: {loaded.name}: {results.reports[-1].no_verdict()}")


@click.command()
@apply(MODEL_OPTIONS)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Where to write the fixed model (same format as PATH; one PATH only).")
@click.option("--output-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write each fixed model into this folder, under its own name.")
@click.option("--all", "all_layers", is_flag=True, help="Re-initialize every layer, not just those with error or warning findings.")
@click.option("--only", multiple=True, metavar="PATTERN", help="Re-initialize just the layers matching this glob. Repeatable.")
@click.option("--seed", type=int, help="Seed for the new draws (each tensor's draw depends on the seed and its name).")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--in-place", is_flag=True, help="Replace each PATH itself (atomically). Without it an input is never written.")
@click.option("--force", is_flag=True, help="Re-draw layers even where the weights look trained (discards what they learned).")
@click.option("--probe", "probe_too", is_flag=True, help="Also measure the signal through depth before and after (as `probe`).")
@run_options
def fix(paths, factory, activation, activation_for, select, ignore, per_layer_ignore, extend_exclude, config_path,
        trust_pickle, state, expect, color, out, output_dir, all_layers, only, seed, dry_run, in_place, force,
        probe_too, **run):
    """Re-initialize the badly initialized layers of the models in PATH... with the recommended scheme; write
    the same format: to -o OUT (one model), into --output-dir, or, with several models, beside each input as
    NAME.fixed.EXT. Nothing is written for a model with nothing to fix.

    Exit 0 when every chosen layer was fixed, 1 when some could not be (they are listed) or the re-audit
    still finds an error or warning on them, 2 on bad input (and when weights that look trained would be
    re-drawn without --force: nothing is written); the worst over all models.
    """
    options = _options(config_path, activation, activation_for, select, ignore, per_layer_ignore, state, expect)
    targets = _targets(paths, factory, options, extend_exclude)
    several = len(targets) > 1
    if several and out is not None:
        raise InputError("-o names one output; with several models give --output-dir DIR (or nothing: each is "
                         "written beside its input as NAME.fixed.EXT)")
    plans = [(model, _fix_target(model, factory, out, output_dir, dry_run, in_place, several)) for model in targets]
    chosen = [str(t) for _, t in plans if t is not None]
    clash = next((t for t in chosen if chosen.count(t) > 1), None)
    if clash:
        raise InputError(f"{clash}: two models would be written here; give them different names")
    from initaudit.repair.outputs import Stamp  # what each output (or, --in-place, input) is now, before anything is read
    stamps = {target: Stamp(target) for _, target in plans if target is not None}
    view = reporters.View(color=reporters.use_color(color, sys.stdout), width=reporters.terminal_width(sys.stdout))
    policy = run_policy(**run, pickled=factory is None, debug=debugging()) if probe_too else None
    codes = []
    for model, target in plans:
        if several:
            click.echo(printable(f"{model}:"))
        try:
            codes.append(_fix_one(model, target, factory, trust_pickle, options, all_layers, only, seed, dry_run,
                                  in_place, force, view, policy, stamps.get(target)))
        except InputError as exc:
            if not several:
                raise
            _error_line(f"initaudit: error: {exc}")
            codes.append(2)
    return max(codes)


def _fix_one(model, target, factory, trust_pickle, options, all_layers, only, seed, dry_run, in_place, force, view,
             policy, stamp=None) -> int:
    """`policy`: how `--probe` runs the model (None: no probe); `stamp`: the output as it was at the start."""
    with _heavy_imports():
        from initaudit.pipeline import analyse
        from initaudit.repair.fixer import repair
        from initaudit.load.dispatch import load
        from initaudit.reporters import fix_table
        from initaudit.repair.writers import check_target, write

    loaded = load(model, trust_pickle=trust_pickle, factory=factory)
    if policy is not None:
        from initaudit.probe.run import require_trust
        require_trust(loaded, policy)  # before anything is written
    written = load(model, trust_pickle=trust_pickle) if factory else loaded
    if target is not None and not in_place:
        check_target(written, target)
    result = repair(analyse(loaded, options), all_layers, list(only), seed, force)
    written_to = target if target is not None and result.tensors else None  # nothing fixed: no file written
    notes = write(written, result.tensors, target, in_place, stamp) if written_to else []
    if policy is not None:
        from initaudit.probe.run import before_after
        result.depth["measured"] = before_after(loaded, options, result.tensors, written_to, trust_pickle, factory,
                                                policy)
    fix_table.write(result, sys.stdout, None if written_to is None else str(written_to), dry_run, view)
    for note in notes:
        click.echo(printable(f"note: {note}"))
    return 1 if result.skipped or result.remaining else 0


def _fix_target(model, factory: str | None, out: Path | None, output_dir: Path | None, dry_run: bool,
                in_place: bool, several: bool) -> Path | None:
    """Where `fix` writes one model: never the model itself unless --in-place (checked before anything loads)."""
    if model is None:
        raise InputError("fix needs a MODEL file (to fix a module built in code, call initaudit.fix(module) in Python)"
                         if factory else "give a model file to fix")
    if dry_run:
        return None
    remote = is_remote(model)
    path = None if remote else Path(model)
    if output_dir is not None and (in_place or out is not None):
        raise InputError("give one of -o OUT, --output-dir DIR or --in-place")
    if in_place and remote:
        raise InputError(f"{model}: a remote model cannot be replaced in place; give -o OUT or --output-dir DIR")
    if in_place and out is not None and out.resolve() != path.resolve():
        raise InputError("give either -o OUT or --in-place, not both")
    if in_place:
        return path
    named_by_us = out is None  # beside the input or in --output-dir: never over an existing file
    if output_dir is not None:
        if not output_dir.is_dir():
            raise InputError(f"{output_dir}: no such folder")
        out = output_dir / (model.rstrip("/").rsplit("/", 1)[-1] if remote else path.name)
    elif out is None:
        if not several:
            raise InputError("give -o OUT for the fixed model (or --output-dir DIR, --in-place to replace MODEL, "
                             "or --dry-run)")
        if remote:
            raise InputError(f"{model}: a remote model has no folder to write beside; give --output-dir DIR")
        out = path.with_name(f"{path.name}.fixed") if path.is_dir() else path.with_name(f"{path.stem}.fixed{path.suffix}")
    if named_by_us and os.path.lexists(out):
        raise InputError(f"{out}: already exists; fix names its outputs itself and never replaces a file "
                         "(remove it, or give another --output-dir)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder")
    if path is not None:
        if out.is_dir() and not path.is_dir():
            raise InputError(f"{out}: a folder; give the fixed model a file name")
        if path.is_dir() and out.exists() and not out.is_dir():
            raise InputError(f"{out}: a file; a model folder is written to a folder")
    return out


@click.command("rules")
@debug_option
@click.option("--facts", is_flag=True, help="List the facts rule conditions can test instead.")
def list_rules(facts):
    """List the rules (code, name, default severity, summary), read from their YAML."""
    if facts:
        for name, meaning in sorted(rulebook.FACTS.items()):
            click.echo(f"{name:20} {meaning}")
        return 0
    for rule in rulebook.builtin_rules():
        click.echo(f"{rule.code}  {rule.name:26} {rule.severity:8} {rule.summary}")
    return 0


@click.command()
@debug_option
@click.argument("rule")
def explain(rule):
    """Explain a rule (by name or code): what it does, why it matters, an example, the fix, its docs page."""
    from initaudit.judge.ruledocs import url

    rules = rulebook.builtin_rules()
    found = [r for r in rules if rule in (r.code, r.name)]
    if not found:
        known = [r.name for r in rules] + [r.code for r in rules]
        raise InputError(f"unknown rule {rule!r}{did_you_mean(rule, known)} (see `initaudit rules`)")
    r = found[0]
    click.echo(f"{r.code} {r.name} ({r.severity})\n\n{r.summary}\n\nWhy is this bad?\n{r.why}\n")
    if r.example:
        click.echo("Example:\n" + "\n".join(f"  {k}: {v}" for k, v in r.example.items()) + "\n")
    click.echo(f"Fix: {r.fix}  (source: {r.source})\n\nDocs: {url(r)}")
    return 0


for _command in (check, fix, list_rules, explain, debug_option(probe)):
    main.add_command(_command)


