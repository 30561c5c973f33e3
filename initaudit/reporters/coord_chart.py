"""The coord-check picture of `initaudit probe --widths`: one panel per step t, one line per layer of its mean |x|
against width on log axes, error bars over the seeds (`figure`, `plot`: matplotlib, the `plot` extra); the same
numbers as a text table (`write`); the records as CSV in mup's coord-check columns (`write_csv`)."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import IO

from rich.table import Table
from rich.text import Text

from initaudit.common.printable import printable
from initaudit.probe.coord import CoordReport, Record, aggregate
from initaudit.reporters import View, render
from initaudit.reporters.table import STYLE, number

# mup's get_coord_data DataFrame: width, module, t, its statistics (l1 ...), then optimizer and lr.
CSV_COLUMNS = [f.name for f in fields(Record)] + ["optimizer", "lr"]


def step_title(t: int) -> str:
    """mup's t: 1 at init, t after t - 1 steps."""
    return f"t={t} (init)" if t == 1 else f"t={t} (after {t - 1} step{'s' if t > 2 else ''})"


def flagged(report: CoordReport, rule: str = "width-dependent-scale") -> set[str]:
    return {f.layer for f in report.findings if f.rule == rule}


# ---------------------------------------------------------------- the text view

def write(report: CoordReport, out: IO[str], view: View | None = None) -> None:
    out.write(render(view or View(), lambda console: _draw(console, report)))


def _draw(console, report: CoordReport) -> None:
    sweep, scales = report.sweep, aggregate(report.records)
    updates = aggregate(report.records, "update_ratio")
    title = (f"{report.model}: coord check at {sweep.width_arg} = {', '.join(map(str, sweep.widths))}, "
             f"{sweep.steps} step(s) of {sweep.optimizer_words()}, seeds {', '.join(map(str, sweep.seeds))}")
    table = Table(title=Text(printable(title)), title_justify="left")
    for name in ("layer", "t", *(f"width {w}" for w in sweep.widths), "slope", "step ratio"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    worst = {f.layer: f.severity for f in sorted(report.findings, key=lambda f: f.severity == "error")}
    for row in report.layers:
        for t, slope in row.slopes.items():
            by_width = scales.get((row.name, t), {})
            ratios = [mean for mean, _ in updates.get((row.name, t), {}).values()]
            table.add_row(Text(printable(row.name), style=STYLE.get(worst.get(row.name, ""), "")), step_title(t),
                          *(_spread(by_width.get(w)) for w in sweep.widths), number(slope),
                          number(max(ratios)) if ratios else "–")
    console.print(table)
    console.print(Text(f"mean |x| of each layer's output (mup's l1), mean ± sd over {len(sweep.seeds)} seed(s); slope: "
                       "of log(mean |x|) against log(width); step ratio: ‖W_t − W_(t−1)‖ / ‖W_0‖, the largest over "
                       "the widths", style="dim"))
    console.print(Text(f"loss: {report.loss}; the steps ran in train mode, the measurements in eval mode", style="dim"))
    for f in report.findings:
        console.print(Text.assemble((f"{f.severity:7}", STYLE[f.severity]), f" {f.code} ", (f.rule, "bold"),
                                    f" {printable(f.message)}"))
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="dim"))
    s = report.summary
    console.print(f"{s['layers']} layers swept: {s['errors']} errors, {s['warnings']} warnings, {s['infos']} infos")


def _spread(value: tuple[float, float] | None) -> str:
    if value is None:
        return "–"
    mean, sd = value
    return f"{mean:.3g} ± {sd:.2g}" if sd else number(mean)


# ---------------------------------------------------------------- CSV

def write_csv(report: CoordReport, out: IO[str]) -> None:
    """One row per record (width, module, t, seed and the statistics), with the optimizer and rate as mup's
    get_coord_data adds them; an update ratio that does not exist (t = 1) and a NaN are empty cells."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in report.records:
        row = {k: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
               for k, v in asdict(record).items()}
        writer.writerow({**row, "optimizer": report.sweep.optimizer, "lr": report.sweep.rate})


# ---------------------------------------------------------------- matplotlib

def figure(report: CoordReport):
    """The coord-check figure: a panel per t, a line per layer (mean |x| against width, log-log, seeds' sd as error
    bars); a layer width-dependent-scale flags is drawn bold and named so in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales, grows = aggregate(report.records), flagged(report)
    ts = sorted({t for _, t in scales})
    fig, axes = plt.subplots(1, len(ts), figsize=(4.2 * len(ts), 3.8), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], ts):
        for i, row in enumerate(report.layers):
            _line(ax, row.name, scales.get((row.name, t), {}), row.name in grows, f"C{i % 10}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(step_title(t), fontsize=10)
        ax.set_xlabel(report.sweep.width_arg)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("mean |x| (l1)")
    _legend(axes[0])
    fig.suptitle(printable(f"{report.model}: coord check, {report.sweep.optimizer_words()}, "
                           f"{len(report.sweep.seeds)} seed(s)"), fontsize=11)
    fig.tight_layout()
    return fig


def _legend(axes) -> None:
    """One legend, on the last panel, naming every layer drawn on any (a zero readout has no line at init)."""
    drawn = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            drawn.setdefault(label, handle)
    axes[-1].legend(list(drawn.values()), list(drawn), fontsize=7)


def _line(ax, name: str, by_width: dict[int, tuple[float, float]], grows: bool, color: str) -> None:
    """One layer's mean |x| against width; a 0 (no place on a log axis) left out, the error bar kept above 0."""
    points = [(w, mean, sd) for w, (mean, sd) in sorted(by_width.items()) if mean > 0]
    if not points:
        return
    widths, means, sds = zip(*points)
    below = [min(sd, 0.9 * mean) for _, mean, sd in points]
    ax.errorbar(widths, means, yerr=[below, list(sds)], marker="o", capsize=3, color=color, linewidth=2.5 if grows else 1.2,
                label=printable(name) + (" (grows with width)" if grows else ""))


def plot(report: CoordReport, path: Path, fmt: str | None = None) -> None:
    """The figure saved (PNG, SVG, PDF: `fmt`, else the suffix)."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=100, format=fmt)
    plt.close(fig)
