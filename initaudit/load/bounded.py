"""Bounded reading: JSON and TOML parsed within caps on size and nesting, files read only when regular and
only up to a cap, remote reads within a deadline, so that nothing a model folder, a server or a config file
holds can exhaust the stack (RecursionError), the memory or the time of a run.

The standard library parses; before it does, a linear pre-scan measures how deeply `[` and `{` nest outside
strings and refuses what is deeper than real files ever are. In TOML it also counts the dots of dotted keys
(outside strings and comments): tomllib's cost grows with the square of a key's parts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from initaudit.common.memory import physical_memory
from initaudit.common.errors import InputError, first_line
from initaudit.load.files import regular

MAX_DEPTH = 32  # a config.json nests ~5 levels, a safetensors header 3, a TOML config 4
MAX_KEY_DOTS = 16  # in one TOML key: `[tool.poetry.group.dev.dependencies]` holds 4
MAX_DIMS = 64  # of a tensor whose shape a file claims
MAX_JSON_BYTES = 64 << 20  # a shard index of 200,000 tensors is ~20 MB
MAX_TOML_BYTES = 1 << 20
REMOTE_TIMEOUT = 30.0  # seconds, the default of --remote-timeout
_CHUNK = 1 << 22  # bytes scanned at once (the scan's memory: ~10 bytes per byte of a chunk)
# A TOML string or comment, a run of other characters, or (where a string never ends) all that is left.
_TOML_TOKENS = re.compile(r'''(?P<skip>"{3}(?:[^\\]|\\.)*?"{3,5} | '{3}.*?'{3,5} | "(?:[^"\\\n]|\\[^\n])*"
                                      | '[^'\n]*' | \#[^\n]*)
                              | [^"'\#]+ | .+''', re.S | re.X)
_TOML_KEY = re.compile(r"(?:^|[{,])([^={},]*)=")  # what stands before `=` at a line's start or in an inline table


class Unreadable(ValueError):
    """Text a bounded parser refuses (too large, nested too deep) or cannot parse; its message is the reason."""


@dataclass
class RemoteLimits:
    """How long a remote read may take: `timeout` seconds to connect and between two pieces of an answer, and
    a read of n bytes `timeout + n / min_rate` seconds in all (a server trickling bytes is cut off)."""

    timeout: float = REMOTE_TIMEOUT
    min_rate: float = 64 << 10  # bytes per second

    def deadline(self, nbytes: int) -> float:
        return self.timeout + nbytes / self.min_rate


REMOTE = RemoteLimits()  # --remote-timeout sets its timeout


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` (a tensor a file claims, before it is allocated) fit in this machine's memory (yes
    where the system does not tell its size)."""
    total = physical_memory()
    return total is None or nbytes <= total



def read_regular(path: Path, limit: int, what: str, shown: Path | None = None) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes, else one InputError line (`what` the
    file is: "a JSON file"). A FIFO or device put there after the check cannot block the open (O_NONBLOCK) nor
    be read (fstat)."""
    shown = shown or path
    regular(path, shown)
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InputError(f"{shown}: replaced by something other than a regular file while being read")
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{shown}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise InputError(f"{shown}: larger than {_size(limit)}, the most initaudit reads of {what}")
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} kB"


def nesting_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
    """How deeply `[` and `{` nest in JSON `data`, brackets inside strings left out (linear time and memory in
    chunks); the scan stops as soon as the depth passes `limit`."""
    import numpy as np

    plain = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)  # escapes hold no quote
    depth = top = inside = 0
    for start in range(0, len(plain), _CHUNK):
        part = plain[start:start + _CHUNK]
        in_string = ((np.cumsum(part == 0x22, dtype=np.int32) + inside) & 1).astype(bool)
        step = ((part == 0x5B) | (part == 0x7B)).view(np.int8) - ((part == 0x5D) | (part == 0x7D)).view(np.int8)
        step[in_string] = 0
        levels = np.cumsum(step, dtype=np.int32) + depth
        top, depth, inside = max(top, int(levels.max())), int(levels[-1]), int(in_string[-1])
        if top > limit:
            break
    return top


def loads_json(data: bytes) -> Any:
    """json.loads of UTF-8 `data` (its size capped where it was read), refused (Unreadable) when nested deeper
    than MAX_DEPTH."""
    if nesting_depth(data) > MAX_DEPTH:
        raise Unreadable(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:  # bad JSON, bad UTF-8, a number of more than 4300 digits
        raise Unreadable(first_line(exc)) from None


def _key_dots(line: str) -> int:
    """The dots of the keys on a line of TOML without its strings and comments (all its dots where it holds no
    `=`: a table header, or a line that goes on an array)."""
    if "=" not in line:
        return line.count(".")
    return max((m.group(1).count(".") for m in _TOML_KEY.finditer(line)), default=0)


def loads_toml(text: str) -> dict[str, Any]:
    """tomllib.loads of `text` (its size capped where it was read), refused (Unreadable) when nested deeper than
    MAX_DEPTH or holding a key of more than MAX_KEY_DOTS dots. Pure Python: the command line reads its config
    before it imports numpy or torch."""
    plain = "".join(m.group() for m in _TOML_TOKENS.finditer(text) if m.lastgroup is None)
    if max(map(_key_dots, plain.split("\n"))) > MAX_KEY_DOTS:
        raise Unreadable(f"more than {MAX_KEY_DOTS} dots in a key (or on a line without =): keys that deep are "
                         "refused")
    steps = (1 if c in "[{" else -1 for c in re.sub(r"[^][{}]", "", plain))
    if max(itertools.accumulate(steps), default=0) > MAX_DEPTH:
        raise Unreadable(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise Unreadable(first_line(exc)) from None
