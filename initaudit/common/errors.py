"""The one error type users see: bad input or usage (exit code 2, one line, no traceback)."""

import difflib


class InputError(Exception):
    """A problem with the user's file, flags or config that initaudit cannot audit past."""


class NoWeights(InputError):
    """A readable file that holds no model weights (optimizer or scheduler state, training metadata): an error
    when named alone, skipped with a note in a run over several models (a checkpoint folder's leftovers)."""


def did_you_mean(word: str, known: list[str] | tuple[str, ...], n: int = 3) -> str:
    """'; did you mean 'zero-weights'?' for a near miss among `known` (difflib), else ''."""
    close = difflib.get_close_matches(word, list(known), n=n)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


FIRST_LINE = 200  # characters of a library's message kept in a one-line error


def first_line(exc: BaseException | str) -> str:
    """The first line of an exception's message (an OSError's own reason), at most FIRST_LINE characters; its
    type's name where it says nothing."""
    text = exc if isinstance(exc, str) else str(getattr(exc, "strerror", None) or exc)
    text = text.strip()
    return text.splitlines()[0][:FIRST_LINE] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line (a runtime's first line often says only where it failed), at most
    FIRST_LINE characters."""
    return " ".join(str(exc).split())[:FIRST_LINE]
