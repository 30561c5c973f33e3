"""The command line as tests drive it in-process, and the one line it answers a bad input with."""

from __future__ import annotations

from click.testing import CliRunner, Result

from initaudit.cli.main import main


def run(*args, env: dict | None = None) -> Result:
    """The CLI in-process, stdout and stderr apart."""
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_stderr_line(result: Result) -> str:
    """The one line on stderr, no traceback anywhere."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def one_error_line(result: Result) -> str:
    """Exit 2 and one non-blank line of output in all, no traceback."""
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]
