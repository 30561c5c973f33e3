"""Fixtures pytest hands to tests by name; shared helpers live in tests/helpers/."""

from __future__ import annotations

import pytest

from helpers.cli import run


@pytest.fixture
def cli():
    """The CLI in-process (`cli("check", path, ...)`), stdout and stderr apart, exceptions raised."""
    return run
