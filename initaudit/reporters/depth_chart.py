"""The depth chart of `initaudit probe`: per layer, the signal's and the gradient's scale on a log axis, predicted
(○) beside measured (●), the band shaded; dead ReLU and saturated shares; the mean cosine between different
inputs' representations and the channel mean's share of the RMS; the findings. `plot` draws the same with
matplotlib (the `plot` extra) for reports and pull-request comments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO

from dataclasses import replace

from rich.table import Table
from rich.text import Text

from initaudit.common.printable import printable
from initaudit.reporters import View, render
from initaudit.reporters.table import STYLE, number

AXIS = 25  # characters per log axis
WIDTH = 140


def _span(values: list[float], band: tuple[float, float]) -> tuple[int, int]:
    """Decades the axis spans: the band's and the values', at most ±12 (what lies beyond is clipped)."""
    logs = [math.log10(v) for v in values if v and v > 0 and math.isfinite(v)]
    low = math.floor(min(logs + [math.log10(band[0])]))
    high = math.ceil(max(logs + [math.log10(band[1])]))
    return max(low, -12), min(high, 12) if high > low else low + 1


def _cell(value: float | None, span: tuple[int, int]) -> int | None:
    if not value or value <= 0 or not math.isfinite(value):
        return None
    x = (math.log10(value) - span[0]) / (span[1] - span[0])
    return min(max(round(x * (AXIS - 1)), 0), AXIS - 1)


def bar(predicted: float | None, measured: float | None, span: tuple[int, int], band: tuple[float, float]) -> Text:
    """One row of a log axis: the band dim, 1 as a tick, predicted ○ and measured ● (◉ where they meet); a measured 0,
    which has no place on a log axis, as ✕ at its floor."""
    lo, hi, one = _cell(band[0], span), _cell(band[1], span), _cell(1.0, span)
    chars = [("·" if lo <= i <= hi else " ", "dim") for i in range(AXIS)]
    chars[one] = ("│", "dim")
    p, m = _cell(predicted, span), _cell(measured, span)
    if p is not None:
        chars[p] = ("○", "cyan" if lo <= p <= hi else "bold red")
    if m is not None:
        chars[m] = ("◉" if m == p else "●", "green" if lo <= m <= hi else "bold red")
    elif measured == 0:
        chars[0] = ("✕", "bold red")
    return Text.assemble(*chars)


def axis(span: tuple[int, int]) -> str:
    """The axis' labels: its ends and 1."""
    left, right = f"1e{span[0]}", f"1e{span[1]}"
    one = _cell(1.0, span)
    line = [" "] * AXIS
    line[:len(left)] = left
    line[AXIS - len(right):] = right
    if len(left) < one < AXIS - len(right) - 1:
        line[one] = "1"
    return "".join(line)


def write(report, out: IO[str], band: tuple[float, float], view: View | None = None) -> None:
    """`report`: a probe.ProbeReport (or any with its rows: predicted and measured). On a terminal (`view.width`)
    the chart is at least WIDTH wide; off one nothing is wrapped, padded or coloured."""
    view = view or View()
    if view.width is not None:
        view = replace(view, width=max(view.width, WIDTH))
    out.write(render(view, lambda console: _draw(console, report, band)))


def _draw(console, report, band: tuple[float, float]) -> None:
    rows = report.layers
    forward = _span([v for r in rows for v in (r.predicted_scale, r.scale)], band)
    backward = _span([v for r in rows for v in (r.predicted_grad_scale, r.grad_scale)], band)
    title = f"{report.model} ({report.format}): signal through depth, input {report.inputs}"
    table = Table(title=Text(printable(title)), title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("layer", max_width=24)
    table.add_column("act", max_width=10)
    table.add_column(Text("forward RMS\n" + axis(forward)), no_wrap=True)
    table.add_column("pred", justify="right")
    table.add_column("meas", justify="right")
    table.add_column(Text("gradient RMS\n" + axis(backward)), no_wrap=True)
    table.add_column("pred", justify="right")
    table.add_column("meas", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("sat.", justify="right")
    table.add_column("cos", justify="right")
    table.add_column("mean", justify="right")
    flagged = {f.layer: f.severity for f in report.findings}
    for i, r in enumerate(rows):
        table.add_row(str(i), Text(printable(r.name), style=STYLE.get(flagged.get(r.name, ""), "")), r.activation,
                      bar(r.predicted_scale, r.scale, forward, band), number(r.predicted_scale), number(r.scale),
                      bar(r.predicted_grad_scale, r.grad_scale, backward, band), number(r.predicted_grad_scale),
                      number(r.grad_scale), _share(r.dead_fraction), _share(r.saturated_fraction), cosine(r.cosine),
                      _share(shift(r)))
    console.print(table)
    console.print(Text(f"log axes; ○ predicted, ● measured (◉ both, ✕ exactly 0: dead), band {band[0]:g}…{band[1]:g} shaded; forward: RMS "
                       "of the layer's output / the input's; gradient: RMS at the layer's output / at the last hidden "
                       "layer's", style="dim"))
    console.print(Text("cos: mean cosine between different inputs' outputs (1: one direction for every input, 0: "
                       "decorrelated); mean: the channel mean's share of the RMS", style="dim"))
    for f in report.findings:
        console.print(Text.assemble((f"{f.severity:7}", STYLE[f.severity]), f" {f.code} ", (f.rule, "bold"),
                                    f" {printable(f.message)}"))
        if f.fix:
            console.print(Text(f"        fix: {printable(f.fix)}", style="dim"))
    agreement = report.agreement()
    if agreement is not None:
        console.print(Text(f"largest factor between prediction and measurement on one layer: {agreement:.3g}", style="dim"))
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="dim"))
    s = report.summary
    console.print(f"{s['layers']} layers probed: {s['errors']} errors, {s['warnings']} warnings, {s['infos']} infos")


def _share(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.0f}%"


def cosine(value: float | None) -> str:
    """Three decimals; six near 1, where collapse is told apart from a slow rise."""
    if value is None:
        return "–"
    return f"{value:.6f}" if value > 0.999 else f"{value:.3f}"


def shift(row) -> float | None:
    """The channel mean's share of the layer's RMS (None where either is unmeasured or the RMS is 0)."""
    return row.mean / row.scale if row.mean is not None and row.scale else None


def plot(report, path: Path, band: tuple[float, float], fmt: str | None = None) -> None:
    """A PNG (or any format matplotlib writes: `fmt`, else the suffix) of both scales and the cosine through depth."""
    import matplotlib.pyplot as plt

    fig = figure(report, band)
    fig.savefig(path, dpi=100, format=fmt)
    plt.close(fig)


def figure(report, band: tuple[float, float]):
    """The matplotlib figure: forward and gradient scales (log), then the cosine and the channel mean's share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.layers
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), sharex=True)
    for ax, (label, pred, meas) in zip(axes, (
            ("forward: RMS of the layer output / input", [r.predicted_scale for r in rows], [r.scale for r in rows]),
            ("gradient: RMS at the layer output / last hidden", [r.predicted_grad_scale for r in rows],
             [r.grad_scale for r in rows]))):
        ax.axhspan(*band, color="0.92", zorder=0, label=f"band {band[0]:g}…{band[1]:g}")
        ax.plot(x, [v if v else float("nan") for v in pred], "o--", mfc="none", label="predicted")
        ax.plot(x, [v if v else float("nan") for v in meas], ".-", label="measured")
        ax.set_yscale("log")
        dead = [i for i, v in zip(x, meas) if v == 0]
        if dead:  # 0 has no place on a log axis: marked at its floor
            ax.plot(dead, [ax.get_ylim()[0]] * len(dead), "x", color="red", clip_on=False, label="measured 0 (dead)")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layer (forward order)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    _representation_panel(axes[2], rows, x)
    fig.suptitle(printable(f"{Path(report.model).name} ({report.format})"), fontsize=11)
    fig.tight_layout()
    return fig


def _representation_panel(ax, rows, x: list[int]) -> None:
    """Mean cosine between inputs (1: collapsed to one direction; 0: decorrelated) and the channel mean's share."""
    nan = float("nan")
    ax.plot(x, [nan if r.cosine is None else r.cosine for r in rows], ".-", label="mean cosine between inputs")
    ax.plot(x, [nan if (v := shift(r)) is None else v for r in rows], "s:", ms=3, label="channel mean / RMS")
    ax.set_ylim(min([-0.05] + [r.cosine for r in rows if r.cosine is not None]) - 0.05, 1.05)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_title("representation: cosine between inputs, mean", fontsize=10)
    ax.set_xlabel("layer (forward order)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
