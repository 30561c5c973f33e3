"""Each test runs in its own empty folder: the `[tool.initaudit]` config a train-start audit finds from the working
directory is the test's own (none unless it writes one), and nothing lands in the checkout."""

import pytest


@pytest.fixture(autouse=True)
def own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
