"""Text from a file made safe to print: control characters shown as escapes, never executed by a terminal."""

from __future__ import annotations

import re

# C0, DEL, C1, line/paragraph separators and the bidirectional overrides that reorder what a terminal shows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(text: object) -> str:
    """`text` as one line with every control character escaped (ESC → \\x1b, newline → \\n)."""
    return _CONTROL.sub(_escape, str(text))
