"""initaudit: a linter for neural-network weight initialization.

The Python API (each name is imported on first use, so `import initaudit` stays instant)::

    report = initaudit.audit("model.pt")        # or an nn.Module, or model="pkg.mod:factory"
    report.findings, report.summary, report.failed("warning")
    changes = initaudit.fix(module, seed=0)     # re-initialize a live module in place

`initaudit.testing.assert_well_initialized(model_or_path)` is the pytest helper.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"audit": "pipeline", "fix": "repair.fixer", "Report": "judge.report", "Finding": "judge.report",
         "LayerRow": "judge.report"}

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
