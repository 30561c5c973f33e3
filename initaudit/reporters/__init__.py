"""Reporters, one module per output format; each writes a run's Results as text: `write(results, out, view)`.

Modules are imported when their format is asked for, so listing the formats costs nothing.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from importlib import import_module
from typing import IO, Callable

from initaudit.common.printable import printable

# format name -> module. `full` is the human table (`table` its old name); `concise` one line per finding.
FORMATS = {"concise": "concise", "full": "table", "table": "table", "json": "json_report", "sarif": "sarif",
           "github": "github", "junit": "junit", "gitlab": "gitlab"}
COLOR_MODES = ("auto", "always", "never")


@dataclass
class View:
    """How text formats render: colour, the terminal's width (None: not a terminal, never wrap), detail."""

    color: bool = False
    width: int | None = None
    quiet: bool = False          # findings only: no table, notes or summary
    statistics: bool = False     # counts per rule instead of the findings
    fail_on: str = "error"       # what counts as a failure (junit)


def writer(fmt: str) -> Callable:
    return import_module(f".{FORMATS[fmt]}", __name__).write


def use_color(mode: str, stream: IO[str]) -> bool:
    """--color: always / never, or auto: NO_COLOR (any value) off, FORCE_COLOR on, else whether `stream` is a terminal."""
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return is_terminal(stream)


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def terminal_width(stream: IO[str]) -> int | None:
    """The width to wrap at: a terminal's, else None (a log or a file is never wrapped or padded)."""
    if not is_terminal(stream):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


def render(view: View, draw: Callable) -> str:
    """Text drawn on a rich Console by `draw(console)`: styled only with colour on, wrapped only on a terminal;
    without colour every line is stripped of trailing spaces."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=view.width or 1_000_000, force_terminal=view.color, no_color=not view.color,
                      color_system="standard" if view.color else None, highlight=False, markup=False, emoji=False,
                      soft_wrap=view.width is None, legacy_windows=False)
    draw(console)
    text = buffer.getvalue()
    return text if view.color else "".join(line.rstrip() + "\n" for line in text.splitlines())


def message(finding) -> str:
    """A finding's message without the layer name it opens with (the line names the layer already), escaped."""
    return printable(finding.message.removeprefix(f"{finding.layer}: "))


def totals(results) -> str:
    """'12 layers: 0 errors, 11 warnings, 0 infos', led by the file count when the run covered several."""
    s = results.summary
    line = counts(s)
    if not results.combined:
        return line
    unread = f" ({s['unreadable']} could not be read)" if s["unreadable"] else ""
    skipped = f" ({s['skipped']} skipped: no model weights)" if s["skipped"] else ""
    return f"{s['files']} files{unread}{skipped}, {line}"


def counts(summary: dict[str, int]) -> str:
    """'12 layers: 0 errors, 11 warnings, 0 infos', and '; 3 findings baselined (not counted)' with a baseline."""
    s = summary
    line = f"{s['layers']} layers: {s['errors']} errors, {s['warnings']} warnings, {s['infos']} infos"
    if "baselined" in s:
        line += f"; {s['baselined']} finding{'' if s['baselined'] == 1 else 's'} baselined (not counted)"
    return line


def statistics(results) -> list[str]:
    """Findings counted per rule, most frequent first: '   11  IA201  init-activation-mismatch  warning'."""
    counts = Counter((f.code, f.rule, f.severity) for _, f in results.findings)
    return [f"{n:5}  {code}  {rule}  {severity}"
            for (code, rule, severity), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
