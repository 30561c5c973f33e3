"""The command line (`initaudit check | fix | probe | rules | explain`): torch-free until a command runs."""

from initaudit.cli.main import main

__all__ = ["main"]
