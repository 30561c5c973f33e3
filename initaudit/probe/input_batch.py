"""`probe --input-batch FILE`: the user's own batch instead of the seeded synthetic one.

The file holds what torch.save wrote of one tensor (the model's single positional input) or of a dict of named
tensors (keyword arguments: input_ids, attention_mask, pixel_values...). It is read with torch's weights_only
reader, so nothing in it runs: a file that pickles Python objects is refused. A `labels` entry is the batch's
targets (the loss of `probe --steps`), never handed to the forward. Every tensor's first dimension is the batch,
the same in all of them, at least 2 samples (a mean cosine between samples needs two).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from initaudit.common.errors import InputError, first_line
from initaudit.load.torch_files import check_pickle_size, load_error_reason

LABELS = "labels"  # the dict key of the batch's targets (not an input of the forward)


@dataclass(frozen=True)
class InputBatch:
    """A batch to run the model on: positional and keyword inputs, and the targets if the file gave them."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    source: str = ""  # the file it came from, for the report

    @property
    def size(self) -> int:
        """Samples in the batch (every tensor's first dimension)."""
        return next(iter(self.tensors().values())).shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The inputs by name (the positional one as `input`), labels last."""
        named = {**{"input": a for a in self.args}, **self.kwargs}
        return {**named, LABELS: self.labels} if self.labels is not None else named


def read_batch(path: Path) -> InputBatch:
    """The batch in `path` (torch.save of a tensor or a dict of tensors), read without running any code."""
    check_pickle_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input batch ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - a crafted file can make torch's reader raise anything
        raise InputError(f"{path}: --input-batch takes a tensor or a dict of tensors saved with torch.save, read "
                         f"without running code; this file is not one ({load_error_reason(exc)})") from None
    return batch_of(payload, str(path))


def batch_of(payload: Any, source: str) -> InputBatch:
    """A tensor → the single positional input; a dict of str → tensor → keyword inputs (its `labels` apart)."""
    if isinstance(payload, torch.Tensor):
        batch = InputBatch(args=(payload,), source=source)
    elif isinstance(payload, Mapping) and payload and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        inputs = {k: v for k, v in payload.items() if k != LABELS}
        if not inputs:
            raise InputError(f"{source}: --input-batch holds only {LABELS!r}; the model's inputs are missing")
        batch = InputBatch(kwargs=inputs, labels=payload.get(LABELS), source=source)
    else:
        raise InputError(f"{source}: --input-batch holds {_what(payload)}, not a tensor or a dict of named tensors")
    _check_sizes(batch)
    return batch


def _what(payload: Any) -> str:
    if isinstance(payload, Mapping):
        odd = next((f"{k!r}: {type(v).__name__}" for k, v in payload.items()
                    if not isinstance(k, str) or not isinstance(v, torch.Tensor)), "nothing")
        return f"a dict with {odd}"
    return f"a {type(payload).__name__}"


def _check_sizes(batch: InputBatch) -> None:
    sizes = {name: t.shape[0] if t.dim() else None for name, t in batch.tensors().items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        shown = ", ".join(f"{name} {tuple(t.shape)}" for name, t in batch.tensors().items())
        raise InputError(f"{batch.source}: the batch is every tensor's first dimension, and these differ ({shown})")
    if batch.size < 2:
        raise InputError(f"{batch.source}: --input-batch holds {batch.size} sample; probe needs at least 2 (the "
                         "mean cosine between samples' representations)")
