"""Measuring as a mergeable map: one block of a tensor in (a rectangular piece: an FSDP2 shard is a dim-0 row
range, a tensor-parallel shard a dim-1 column range, a checkpoint chunk a dim-0 row range), a small partial
summary out; summaries merged in any order; the tensor's statistics and samples out of the merge.

`summarize(block, key, shape, offset)` reads the block once (stats.scan_rows: the same chunked pass the single
process runs) and keeps: each chunk's power sums, the extremes and how many values sit on them, counts of zeros
and non-finite values, each unit's (row's) sum of squares, sum and two random projections, the columns' sums of
squares, and the values of the samples the fingerprint and the fresh/trained test read (measure/samples.py),
each at its global index, and each unit's CHECKS further random projections. `merge` keeps one summary per
(key, offset): a retried or duplicated block counts once. `finish` gives what the pipeline needs of the tensor: its
TensorStats and Samples.

Exactness: chunks end at the tensor's multiples of `stats.chunk_rows(width)` rows and every chunk's sums are
added exactly (math.fsum), so blocks that start at those multiples (the checkpoint plan's units) give the
single-process figures bit for bit, whatever their number and order. A block cut inside a chunk (an FSDP2 shard of
uneven rows, a DCP record it saved) keeps that chunk's rows as a piece (values, at most a chunk: 1 MB of float32 at
each end of the block); `finish` measures the chunk once its pieces fill it, so row blocks give the single-process
figures bit for bit wherever they are cut. A tensor-parallel column split cuts every chunk: the figures then agree
to float32 reassociation (relative 1e-6 on the std and the norms, absolute 1e-5 on the excess kurtosis), counts,
extremes, zero units and copies exactly (bf16 read by its compiled pass: the moments, extremes and counts exactly
too, bf16_pass.py).
Where the values are not at hand, copies among units are confirmed by their norms and CHECKS random projections
besides the pass's two (which only select candidates: among thousands of units, neighbours in the pass's order
agree in those by chance); where they are, entry by entry (`finish(close=...)` decides instead where given). A
spike or values on a truncation bound of a tensor of more than samples.SMALL_VALUES values stay in its
fresh/trained fit (measure/samples.py's `source`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import torch

from initaudit.measure import stats
from initaudit.measure.samples import Samples, flat_stride, ortho_rows, spectrum_strides, travels_whole
from initaudit.measure.stats import Partial, TensorStats


CHECKS = 6          # random projections per unit that confirm copies where the values are not at hand
_CHECK_SEED = 0xC4EC


@dataclass
class Grid:
    """The values of a block at the rows × columns of a sample grid that fall inside it (global indices)."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor


@dataclass
class Block:
    """One block's partial statistics and its share of the samples."""

    offset: tuple[int, ...]
    rows: tuple[int, int]          # the units [r0, r1) of the tensor's [units, width] view it holds
    cols: tuple[int, int]          # and the columns [c0, c1)
    part: Partial
    flat_index: torch.Tensor       # global flat indices of the flat sample's values it holds
    flat_values: torch.Tensor
    grids: dict[str, Grid] = field(default_factory=dict)   # "ortho", "spectrum"
    values: torch.Tensor | None = None   # the block itself, where the tensor is small
    row_bits: torch.Tensor | None = None  # each dim-0 row's bit patterns summed, wrapping (its part of the row)
    checks: torch.Tensor | None = None    # [rows, CHECKS] float64: each unit's random projections (its part of them)


@dataclass
class Summary:
    """The merged blocks of one tensor, keyed by offset."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    units: bool
    unit_axis: int
    blocks: dict[tuple[int, ...], Block] = field(default_factory=dict)
    pieces: dict[int, torch.Tensor] = field(default_factory=dict)  # partial chunks' rows, by their first row

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def complete(self) -> bool:
        """Whether the blocks cover every value of the tensor."""
        return sum((b.rows[1] - b.rows[0]) * (b.cols[1] - b.cols[0]) for b in self.blocks.values()) == self.numel


@dataclass
class Finished:
    """What the pipeline reads of one tensor: its stats, samples, and a digest of its values (equal tensors have
    equal digests; different ones differ but for a hash collision or values permuted within a dim-0 row)."""

    stats: TensorStats
    samples: Samples
    digest: str


def unit_view(shape: tuple[int, ...], unit_axis: int = 0) -> tuple[int, int]:
    """(units, values per unit) of a tensor of `shape` (stats.as_units)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    units = shape[unit_axis]
    return units, math.prod(shape) // units if units else math.prod(s for i, s in enumerate(shape) if i != unit_axis)


def region(block_shape: tuple[int, ...], shape: tuple[int, ...], offset: tuple[int, ...],
           unit_axis: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """The units and columns of the tensor's [units, width] view a block covers; a block must be the whole tensor,
    or split along dim 0 and/or dim 1 only (with the units on dim 0)."""
    units, width = unit_view(shape, unit_axis)
    if tuple(block_shape) == tuple(shape) and not any(offset):
        return (0, units), (0, width)
    if unit_axis != 0 or len(shape) == 0:
        raise ValueError(f"a block of a tensor whose units are on dim {unit_axis} must be the whole tensor")
    if tuple(offset[2:]) != (0,) * len(offset[2:]) or tuple(block_shape[2:]) != tuple(shape[2:]):
        raise ValueError(f"block {tuple(block_shape)} at {tuple(offset)} of {tuple(shape)}: only dims 0 and 1 may be split")
    rows = (offset[0], offset[0] + block_shape[0])
    if len(shape) == 1:
        return rows, (0, 1)
    inner = math.prod(shape[2:])
    return rows, (offset[1] * inner, (offset[1] + block_shape[1]) * inner)


def summarize(block: torch.Tensor, key: str, shape: tuple[int, ...], offset: tuple[int, ...], *, units: bool = True,
              unit_axis: int = 0, split: bool = True) -> Summary:
    """The partial summary of one block of tensor `key` (global `shape`) placed at `offset` (its real values only:
    padding is never passed). `units`, `unit_axis`: as stats.compute's for that tensor. Rows of a chunk the block
    holds only part of (a row range that starts or ends inside one) are kept as pieces, measured once `finish` has
    the whole chunk."""
    block = block.detach()
    shape, offset = tuple(int(s) for s in shape), tuple(int(o) for o in offset)
    (r0, r1), (c0, c1) = region(tuple(block.shape), shape, offset, unit_axis)
    units_n, width = unit_view(shape, unit_axis)
    a, b = (r0, r1) if (c0, c1) != (0, width) else whole_chunks((r0, r1), units_n, stats.chunk_rows(width))
    pieces = {start: block[start - r0:stop - r0].clone() for start, stop in ((r0, a), (b, r1)) if stop > start}
    out = Summary(key, shape, block.dtype, units, unit_axis, pieces=pieces)
    if b > a or not pieces:
        inner = (a, *offset[1:])
        out.blocks[inner] = _block(block[a - r0:b - r0], shape, inner, (a, b), (c0, c1), units, unit_axis, split)
    return out


def whole_chunks(rows: tuple[int, int], units: int, step: int) -> tuple[int, int]:
    """The rows [a, b) of `rows` that fill whole chunks of the measuring pass (a chunk ends at a multiple of `step`
    rows, or at the tensor's last row)."""
    r0, r1 = rows
    a = r0 if r0 % step == 0 else min(r1, (r0 // step + 1) * step)
    b = r1 if r1 == units or r1 % step == 0 else max(a, r1 // step * step)
    return a, b


def _block(block: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...], rows: tuple[int, int],
           cols: tuple[int, int], units: bool, unit_axis: int, split: bool) -> Block:
    """The partial statistics and sample shares of a block that fills whole chunks."""
    (r0, r1), (c0, c1) = rows, cols
    units_n, width = unit_view(shape, unit_axis)
    view = stats.as_units(block, unit_axis) if (r0, r1, c0, c1) == (0, units_n, 0, width) else block.reshape(r1 - r0, c1 - c0)
    if view.numel():
        _, part = stats.scan_rows(view, units, None, split, r0, c0, width)
    else:
        part = Partial()
    idx, values = _flat_picks(block, view, (r0, r1), (c0, c1), shape, unit_axis)
    whole = travels_whole(shape)
    return Block(offset, (r0, r1), (c0, c1), part, idx, values, _grids(view, (r0, r1), (c0, c1), shape, unit_axis),
                 block.clone() if whole else None, _row_bits(block),
                 _checks(view, (c0, c1), width) if units and len(shape) >= 2 and not whole else None)


def _row_bits(block: torch.Tensor) -> torch.Tensor:
    """Each dim-0 row's bit patterns summed as integers (wrapping: modulo 2^64 for 8-byte values, else 2^32, which
    sums 12x faster): exact and additive over column blocks, so the rows' sums tell two tensors' values apart
    whichever way each was cut and summarized."""
    rows = block.reshape(block.shape[0], math.prod(block.shape[1:])) if block.dim() else block.reshape(1, 1)
    rows = rows.contiguous()
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[block.element_size()]
    return rows.view(bits).sum(dim=1, dtype=torch.int64 if bits == torch.int64 else torch.int32)


@functools.lru_cache(maxsize=64)
def _check_basis(width: int) -> torch.Tensor:
    """[width, CHECKS] normal directions, the same for every block of a tensor `width` values wide."""
    return torch.randn(width, CHECKS, generator=torch.Generator().manual_seed(_CHECK_SEED), dtype=torch.float64)


def _checks(view: torch.Tensor, cols: tuple[int, int], width: int) -> torch.Tensor:
    """Each unit's CHECKS projections over the block's columns (float64, non-finite values as 0), chunk by chunk;
    additive over column blocks."""
    basis = _check_basis(width)[cols[0]:cols[1]]
    step = stats.chunk_rows(view.shape[1])
    out = torch.empty(view.shape[0], CHECKS, dtype=torch.float64)
    with stats.one_thread():
        for a in range(0, view.shape[0], step):
            out[a:a + step] = torch.nan_to_num(view[a:a + step].to(torch.float64), 0.0, 0.0, 0.0) @ basis
    return out


def _flat_picks(block: torch.Tensor, view: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
                shape: tuple[int, ...], unit_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global flat indices and values of the flat sample (stats.sample) that the block holds."""
    numel = math.prod(shape)
    stride = flat_stride(numel)
    _, width = unit_view(shape, unit_axis)
    (r0, r1), (c0, c1) = rows, cols
    if r1 == r0 or c1 == c0:  # an empty shard
        return torch.empty(0, dtype=torch.long), block.reshape(-1)[:0]
    if unit_axis != 0 and len(shape) >= 2:  # a whole tensor whose units are not on dim 0: its own flattening
        flat = block.reshape(-1)
        return torch.arange(0, numel, stride), flat[::stride]
    if (c0, c1) == (0, width):
        idx = torch.arange(-(-r0 * width // stride) * stride, r1 * width, stride)
        return idx, view.reshape(-1)[idx - r0 * width]
    starts = torch.arange(r0, r1) * width + c0
    first = c0 + (-starts) % stride
    counts = ((c1 - first + stride - 1) // stride).clamp(min=0)
    row = torch.repeat_interleave(torch.arange(r0, r1), counts)
    steps = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    col = torch.repeat_interleave(first, counts) + steps * stride
    return row * width + col, view[row - r0, col - c0]


def _grids(view: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], shape: tuple[int, ...],
           unit_axis: int) -> dict[str, Grid]:
    """The block's share of the orthogonality test's rows or columns (of the dim-0 flattening) and of the
    spectrum's strided block (of the units' view)."""
    out = {}
    units, width = unit_view(shape, unit_axis)
    if len(shape) >= 2:
        rs, cs = spectrum_strides(units, width)
        out["spectrum"] = _grid(view, rows, cols, torch.arange(0, units, rs), torch.arange(0, width, cs))
    pick = ortho_rows(shape)
    if pick is not None and unit_axis != 0:
        out["ortho"] = _whole_ortho(view, shape, unit_axis, pick)
    elif pick is not None:
        by_rows, idx = pick
        n_rows, n_cols = shape[0], math.prod(shape[1:])
        grid_rows, grid_cols = (idx, torch.arange(n_cols)) if by_rows else (torch.arange(n_rows), idx)
        out["ortho"] = _grid(view, rows, cols, grid_rows, grid_cols)
    return out


def _grid(view: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], grid_rows: torch.Tensor,
          grid_cols: torch.Tensor) -> Grid:
    r = grid_rows[(grid_rows >= rows[0]) & (grid_rows < rows[1])]
    c = grid_cols[(grid_cols >= cols[0]) & (grid_cols < cols[1])]
    return Grid(r, c, view[(r - rows[0])[:, None], (c - cols[0])[None, :]])  # the grid's values only, not its rows


def _whole_ortho(view: torch.Tensor, shape: tuple[int, ...], unit_axis: int, pick: tuple[bool, torch.Tensor]) -> Grid:
    """The orthogonality grid of a whole tensor whose units are on another dim (its dim-0 flattening)."""
    flat = view.movedim(0, unit_axis).reshape(shape).reshape(shape[0], -1)
    by_rows, idx = pick
    r, c = (idx, torch.arange(flat.shape[1])) if by_rows else (torch.arange(flat.shape[0]), idx)
    return Grid(r, c, flat[r][:, c].clone())


def merge(summaries: Iterable[Summary]) -> Summary:
    """One tensor's summaries merged: one block per offset (a retried block counts once), in any order."""
    summaries = list(summaries)
    first = summaries[0]
    out = replace(first, blocks={}, pieces={})
    for s in summaries:
        if (s.key, s.shape) != (first.key, first.shape):
            raise ValueError(f"cannot merge summaries of {s.key} {s.shape} and {first.key} {first.shape}")
        for offset, block in s.blocks.items():
            held = out.blocks.get(offset)
            if held is None or _rows(held) < _rows(block):  # an empty shard's block never hides a real one
                out.blocks[offset] = block
        for start, rows in s.pieces.items():
            out.pieces.setdefault(start, rows)
    return out


def _rows(block: Block) -> int:
    return block.rows[1] - block.rows[0]


def stitched(summary: Summary) -> Summary:
    """The summary with each chunk its pieces fill measured as one block (as the single process reads it: the
    figures do not depend on where the blocks were cut); pieces of a chunk they do not fill stay pieces."""
    if not summary.pieces:
        return summary
    units, width = unit_view(summary.shape, summary.unit_axis)
    step = stats.chunk_rows(width)
    by_chunk: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for start, rows in sorted(summary.pieces.items()):
        by_chunk.setdefault(start // step, []).append((start, rows))
    blocks, left = dict(summary.blocks), {}
    for chunk, group in by_chunk.items():
        ends = [start + rows.shape[0] for start, rows in group]
        if [start for start, _ in group] != [chunk * step] + ends[:-1] or ends[-1] != min((chunk + 1) * step, units):
            left.update(group)
            continue
        offset = (chunk * step,) + (0,) * (len(summary.shape) - 1)
        whole = summarize(torch.cat([rows for _, rows in group]), summary.key, summary.shape, offset,
                          units=summary.units, unit_axis=summary.unit_axis)
        blocks.update(whole.blocks)
    return replace(summary, blocks=blocks, pieces=left)


def merge_all(summaries: Iterable[Summary]) -> dict[str, Summary]:
    """Summaries of many tensors merged per tensor."""
    by_key: dict[str, list[Summary]] = {}
    for s in summaries:
        by_key.setdefault(s.key, []).append(s)
    return {key: merge(group) for key, group in by_key.items()}


def finish(summary: Summary, close: Callable[[int, int, float], bool] | None = None) -> Finished:
    """The tensor's stats, samples and digest from its merged blocks (`close(a, b, tol)`: whether two units are
    within `tol` in every entry, where their values can be read; else their norms must agree too)."""
    with stats.one_thread():
        return _finish(summary, close)


def _finish(summary: Summary, close: Callable[[int, int, float], bool] | None) -> Finished:
    summary = stitched(summary)
    if not summary.complete():
        raise ValueError(f"{summary.key}: the summaries cover part of the tensor only")
    units, width = unit_view(summary.shape, summary.unit_axis)
    blocks = sorted(summary.blocks.values(), key=lambda b: (b.rows, b.cols))
    samples = _samples(summary, blocks)
    if summary.numel == 0:
        return Finished(stats.empty_stats(units), samples, _digest([summary.dtype, summary.shape]))
    part = _merged_part(blocks, width)
    if close is None and samples.values is not None:
        close = stats.entrywise(stats.as_units(samples.values, summary.unit_axis))
    elif close is None:
        close = _close_by_projections(part, width, _by_rows(blocks, "checks"))
    st = stats.assemble(part, units, width, summary.dtype, samples.ordered, summary.units, close)
    return Finished(st, samples, _digest([summary.dtype, summary.shape, _by_rows(blocks, "row_bits")]))


def _by_rows(blocks: list[Block], name: str) -> torch.Tensor | None:
    """A per-row field of the blocks for the whole tensor, in row order (column blocks of the same rows added)."""
    rows: dict[tuple[int, int], torch.Tensor] = {}
    for b in blocks:
        value = getattr(b, name)
        if value is None:
            return None
        rows[b.rows] = rows[b.rows] + value if b.rows in rows else value
    return torch.cat([value for _, value in sorted(rows.items())])


def _merged_part(blocks: list[Block], width: int) -> Partial:
    """The blocks' partials merged in row order (column blocks of the same rows first joined side by side), at one
    scale."""
    if len({b.part.scale for b in blocks}) > 1:
        blocks = [replace(b, part=_unscaled(b.part)) for b in blocks]
    rows: dict[tuple[int, int], list[Block]] = {}
    for b in blocks:
        rows.setdefault(b.rows, []).append(b)
    total: Partial | None = None
    for _, side in sorted(rows.items()):
        joined = _side_by_side(side, width)
        if total is None:
            total = joined
        else:
            total.merge(joined)
    return total


def _side_by_side(side: list[Block], width: int) -> Partial:
    """The partial of a row range held in column blocks: sums and counts added, each unit's per-block sums of
    squares and projections added, a unit zero only where it is zero in every block."""
    side = sorted(side, key=lambda b: b.cols)
    parts = [b.part for b in side]
    out = Partial(scale=parts[0].scale)
    for b, p in zip(side, parts):
        out.records += p.records
        out.add_hist(p.hist)
        out.nan, out.inf, out.zeros = out.nan + p.nan, out.inf + p.inf, out.zeros + p.zeros
        out.extremes(p.lo, p.lo_count, p.hi, p.hi_count)
        if p.column_sq is not None:
            if out.column_sq is None:
                out.column_sq = torch.zeros(width, dtype=torch.float64)
            out.column_sq[b.cols[0]:b.cols[1]] += p.column_sq
        for sums in p.column_parts:
            placed = torch.zeros(width, dtype=torch.float64)
            placed[b.cols[0]:b.cols[1]] = sums
            out.column_parts.append(placed)
    if parts[0].norms:
        out.norms = [sum(torch.cat(p.norms) for p in parts)] if len(parts) > 1 else list(parts[0].norms)
        out.proj = [sum(torch.cat(p.proj, dim=1) for p in parts)] if len(parts) > 1 else list(parts[0].proj)
    zero = set(parts[0].zero_units)
    for p in parts[1:]:
        zero &= set(p.zero_units)
    out.zero_units = sorted(zero)
    return out


def _unscaled(part: Partial) -> Partial:
    """A partial read at a power-of-two scale, brought back to the values' own (in float64)."""
    s = part.scale
    if s == 1.0:
        return part
    records = [(n, shift / s, *(v / s ** (k + 1) for k, v in enumerate(sums))) for n, shift, *sums in part.records]
    return replace(part, records=records, scale=1.0, norms=[t.double() / (s * s) for t in part.norms],
                   proj=[t.double() / s for t in part.proj],
                   column_sq=None if part.column_sq is None else part.column_sq / (s * s),
                   column_parts=[t / (s * s) for t in part.column_parts])


def _close_by_projections(part: Partial, width: int, checks: torch.Tensor | None) -> Callable[[int, int, float], bool]:
    """Two units whose pass projections already agree are copies where their norms and their CHECKS projections
    agree too: within `tol` per entry, a difference d moves a normal projection by at most 5·|d| (|d| ≤
    tol·√width), and by float rounding besides; two units that differ by the weights' spread move it by about
    that spread times √width, so each check lets a chance pair through with odds about 1e-3 or less."""
    norms = torch.cat(part.norms).double().sqrt() / part.scale if part.norms else None

    def close(a: int, b: int, tol: float) -> bool:
        na, nb = float(norms[a]), float(norms[b])
        if abs(na - nb) > math.sqrt(width) * tol + 1e-6 * max(na, nb):
            return False
        if checks is None:
            return True
        reach = 5 * tol * math.sqrt(width) + 1e-9 * math.sqrt(width) * max(na, nb)
        return bool((checks[a] - checks[b]).abs().max() <= reach)
    return close


def _samples(summary: Summary, blocks: list[Block]) -> Samples:
    """The tensor's samples, each value put at its global index."""
    idx = torch.cat([b.flat_index for b in blocks])
    flat = torch.cat([b.flat_values for b in blocks])[torch.argsort(idx)]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    ordered = torch.from_numpy(np.sort(flat.numpy()))
    grids = {name: _joined(name, blocks) for name in blocks[0].grids} if blocks else {}
    spectrum = grids.get("spectrum")
    ortho = grids.get("ortho")
    pick = ortho_rows(summary.shape)
    if ortho is not None and pick is not None and not pick[0]:
        ortho = (ortho[0], ortho[1].T)  # columns as vectors
    return Samples(summary.shape, summary.dtype, ordered, None if ortho is None else ortho[1],
                   None if spectrum is None else spectrum[1], None if spectrum is None else spectrum[0],
                   _values(summary, blocks))


def _joined(name: str, blocks: list[Block]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, values) of a sample grid put together from the blocks' shares."""
    grids = [b.grids[name] for b in blocks]
    rows = torch.unique(torch.cat([g.rows for g in grids]))
    cols = torch.unique(torch.cat([g.cols for g in grids]))
    out = torch.empty(rows.numel(), cols.numel(), dtype=grids[0].values.dtype)
    for g in grids:
        if g.values.numel():
            out[torch.searchsorted(rows, g.rows)[:, None], torch.searchsorted(cols, g.cols)[None, :]] = g.values
    return rows, out


def _values(summary: Summary, blocks: list[Block]) -> torch.Tensor | None:
    """The whole tensor, where it is small (put together from its blocks)."""
    if not travels_whole(summary.shape) or any(b.values is None for b in blocks):
        return None
    if len(blocks) == 1 and blocks[0].values is not None and tuple(blocks[0].values.shape) == summary.shape:
        return blocks[0].values
    units, width = unit_view(summary.shape, summary.unit_axis)
    full = torch.empty(units, width, dtype=summary.dtype)
    for b in blocks:
        full[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = b.values.reshape(b.rows[1] - b.rows[0], b.cols[1] - b.cols[0])
    return full.reshape(summary.shape)


def _digest(items: list) -> str:
    """A hash of what a tensor's summary holds: equal tensors give equal digests."""
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        if isinstance(item, torch.Tensor):
            t = item.detach().contiguous().reshape(-1)
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(item).encode())
    return h.hexdigest()
