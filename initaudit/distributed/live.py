"""A live model sharded across ranks (DTensor, FSDP2), audited where its shards live.

Placeholder: the sharded audit is being built on another branch (issue 24, "Sharded models in place")."""

from __future__ import annotations

from typing import Any


def audit_sharded(module: Any, options: Any) -> Any:
    """The report of a model whose parameters are DTensors, on rank 0 (None on the other ranks)."""
    raise NotImplementedError("initaudit cannot audit DTensor / FSDP2-sharded parameters in place yet; audit the "
                              "model before sharding it")
