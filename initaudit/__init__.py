"""initaudit: a linter for neural-network weight initialization.

The Python API (each name is imported on first use, so `import initaudit` stays instant)::

    report = initaudit.audit("model.pt")        # or an nn.Module, or model="pkg.mod:factory"
    report.findings, report.summary, report.failed("warning")
    changes = initaudit.fix(module, seed=0)     # re-initialize a live module in place

`initaudit.testing.assert_well_initialized(model_or_path)` is the pytest helper.
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"audit": "audit", "fix": "fixer", "Report": "report", "Finding": "report", "LayerRow": "report"}

__all__ = ["audit", "fix", "Report", "Finding", "LayerRow", "__version__"]


def __getattr__(name: str):
    """`initaudit.audit`, `initaudit.fix`, `initaudit.Report`...: imported (with torch) on first use."""
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'initaudit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`initaudit.audit` is the function, as it always was, even once the submodule of that name is loaded
    (importing a submodule binds its name on the package; the module stays in sys.modules['initaudit.audit'])."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
