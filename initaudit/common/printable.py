"""How initaudit shows a name it read from a file (tensor, layer, file and folder names): one rule, kept here.

- `--format json` and `sarif` (and gitlab's `location.path`) carry the exact name as a JSON string; the writers
  emit ASCII only, so an unpaired surrogate is written as `\\ud800`: parsing the report gives the raw name back.
- Every text output (full/table, concise, github, gitlab's `description`, `fix`, the `probe` chart, messages on
  stderr) and JUnit XML show `printable(name)`: each control character (C0, DEL, C1), line or paragraph separator,
  bidirectional control (what reorders a line as it is drawn), unpaired surrogate and the noncharacters
  U+FFFE/U+FFFF becomes its backslash escape (`\\x1b`, `\\n`, `\\u202e`, `\\ud800`); everything else, a backslash
  included, is shown as it is. What XML 1.0 cannot carry is a subset of what is escaped, so the same text is
  valid XML. A terminal or pipe whose encoding lacks a character gets its backslash escape too (`show_unencodable`).
- Patterns (`--per-layer-ignore`, `--activation-for`, `fix --only`) match the raw name, never the escaped one.
"""

from __future__ import annotations

import re
from typing import IO

# C0, DEL, C1, line/paragraph separators, Unicode's Bidi_Control characters, surrogates and U+FFFE/U+FFFF
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                      "\ud800-\udfff\ufffe\uffff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(text: object) -> str:
    """`text` as one line a terminal, a CI log or an XML parser takes as it is (ESC → \\x1b, newline → \\n)."""
    return _UNSHOWN.sub(_escape, str(text))


def show_unencodable(stream: IO[str]) -> None:
    """Let `stream` write a character its encoding lacks (an ASCII pipe, a cp1252 console) as its backslash
    escape instead of failing the run."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
