"""initaudit: a linter for neural-network weight initialization."""

__version__ = "0.1.0"

from .audit import audit  # noqa: E402
from .fixer import fix  # noqa: E402

__all__ = ["audit", "fix", "__version__"]
