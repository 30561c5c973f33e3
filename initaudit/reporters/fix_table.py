"""What `initaudit fix` changed (or, with --dry-run, would change): a rich table and the skipped layers."""

from __future__ import annotations

from typing import IO

from rich.table import Table
from rich.text import Text

from initaudit.repair.fixer import FixResult
from initaudit.common.printable import printable
from initaudit.reporters import View, render
from initaudit.reporters.table import number


def _range(rows: list, column: int) -> str:
    values = [row[column] for row in rows if row[column] is not None and row[column] > 0]
    return f"{min(values):.3g} … {max(values):.3g}" if values else "–"


def _depth(console, depth: dict[str, tuple[list, list]]) -> None:
    """The signal through depth before and after: the range of the scales over the layers (initaudit.depth)."""
    if not depth:
        return
    table = Table(title="signal through depth: RMS over the layers, lowest … highest (band: signal-band)",
                  title_justify="left")
    for col in ("", "before", "after"):
        table.add_column(col)
    for source, (before, after) in depth.items():
        for column, what in ((1, "forward (/ input)"), (2, "gradient (/ last hidden layer's)")):
            table.add_row(f"{source} {what}", _range(before, column), _range(after, column))
    console.print(table)


def write(result: FixResult, out: IO[str], written_to: str | None, dry_run: bool = False, view: View | None = None) -> None:
    out.write(render(view or View(), lambda console: _draw(console, result, written_to, dry_run)))


def _draw(console, result: FixResult, written_to: str | None, dry_run: bool) -> None:
    title = f"re-initialized → {written_to}" if written_to else "would re-initialize (dry run: nothing written)"
    table = Table(title=Text(printable(title)), title_justify="left")
    for col in ("layer", "tensor", "old scheme", "old std", "new scheme", "new std", "call"):
        table.add_column(col, justify="right" if "std" in col else "left")
    for c in result.changes:
        table.add_row(*(Text(printable(v)) for v in (c.layer, c.tensor, c.old_scheme, number(c.old_std),
                                                       c.new_scheme, number(c.new_std), c.call)))
    if result.changes:
        console.print(table)
    for s in result.skipped:
        console.print(Text.assemble(("not fixed ", "yellow"), (printable(s.layer), "bold"), f": {printable(s.reason)}"))
    if result.trained:
        console.print(Text(f"re-drawn although trained (--force): {printable(', '.join(result.trained))}", style="yellow"))
    if result.changes:
        gone = f"{len(result.resolved)} error/warning findings on the re-drawn layers are gone"
        left = "; ".join(f"{f.rule} on {printable(f.layer)}" for f in result.remaining)
        console.print(f"re-audit of the new tensors: {gone}" + (f"; still found: {left}" if left else ", none left"))
    _depth(console, result.depth)
    layers = len({c.layer for c in result.changes})
    done = "re-initialized" if written_to else "to change"
    console.print(Text(f"{len(result.changes)} tensors in {layers} layers {done}, "
                       f"{len(result.skipped)} layers not fixed (seed {result.seed})"
                       + ("" if written_to or dry_run else "; nothing to fix, no file written")))
