"""initaudit: a linter for neural-network weight initialization."""

__version__ = "0.1.0"

from .audit import audit  # noqa: E402

__all__ = ["audit", "__version__"]
