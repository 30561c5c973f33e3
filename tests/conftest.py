"""Fixtures and hooks pytest itself needs; shared helpers live in tests/helpers/."""

from __future__ import annotations

import os

import pytest

from helpers.cli import run


def pytest_configure(config):
    """In a pytest-xdist worker: one torch (OpenMP) thread, for this process and the CLI processes it starts.
    Workers already fill the cores; a thread pool per worker on top spin-waits (a second of training took 50)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))


@pytest.fixture
def cli():
    """The CLI in-process (`cli("check", path, ...)`), stdout and stderr apart, exceptions raised."""
    return run
