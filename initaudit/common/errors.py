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
