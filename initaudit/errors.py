"""The one error type users see: bad input or usage (exit code 2, one line, no traceback)."""


class InputError(Exception):
    """A problem with the user's file, flags or config that initaudit cannot audit past."""
