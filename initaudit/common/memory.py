"""The machine's memory, as the system tells it: what bounds on claimed sizes and default limits are set against."""

from __future__ import annotations

import functools
import os


@functools.cache
def physical_memory() -> int | None:
    """The machine's RAM in bytes, where the system says (Linux, macOS); None elsewhere."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None
