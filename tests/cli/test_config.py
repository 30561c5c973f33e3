"""Config files: checked against a schema, never able to make initaudit run code, read only when regular and
small, and parsed within bounds on nesting and dotted keys (one line, never a RecursionError or a hang)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from click.testing import CliRunner

from fixtures import models
from helpers import ROOT
from helpers.cli import one_stderr_line, run
from initaudit import config
from initaudit.cli.main import main
from initaudit.common.errors import InputError


class _Payload:
    """A pickle that creates a file when loaded: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_config_file_can_never_enable_pickle_code(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    model = tmp_path / "model.pt"
    torch.save({"state_dict": models.zero_layer().state_dict(), "payload": _Payload(marker)}, model)
    monkeypatch.chdir(tmp_path)
    for value in ("true", '"false"', "1"):
        (tmp_path / "pyproject.toml").write_text(f"[tool.initaudit]\ntrust-pickle = {value}\n")
        line = one_stderr_line(run("check", model))
        assert "pyproject.toml: trust-pickle cannot be set" in line and "--trust-pickle" in line
    (tmp_path / "pyproject.toml").write_text('[tool.initaudit]\nactivation = "relu"\n')
    assert "--trust-pickle" in one_stderr_line(run("check", model))  # refused without the flag
    assert not marker.exists()
    assert run("check", model, "--trust-pickle").exit_code == 1  # the flag, and only the flag, loads it
    assert marker.exists()


BAD = [  # (file name, contents, fragment of the error)
    ("pyproject.toml", 'tool = 5\n', "pyproject.toml: `tool` must be a table"),
    ("pyproject.toml", '[tool]\ninitaudit = "x"\n', "[tool.initaudit] must be a table, not a string ('x')"),
    ("pyproject.toml", b'[tool.initaudit]\nactivation = "\xe9"\n', "pyproject.toml: not UTF-8 text"),
    ("pyproject.toml", '[tool.initaudit\n', "pyproject.toml: not readable TOML"),
    ("pyproject.toml", '[tool.initaudit]\nselect = "zero-weights"\n', "select must be a list, not a string"),
    ("pyproject.toml", '[tool.initaudit]\nselect = [3]\n', "select must list rule names or codes as strings"),
    ("pyproject.toml", '[tool.initaudit]\nignore = ["nonzero-biass"]\n',
     "ignore: unknown rule 'nonzero-biass'; did you mean 'nonzero-bias'?"),
    ("pyproject.toml", '[tool.initaudit.per-layer-ignores]\n"x" = "IA9"\n', "per-layer-ignores.'x' must be a list"),
    ("pyproject.toml", '[tool.initaudit.per-layer-ignores]\n"x" = ["IA9"]\n', "unknown rule 'IA9'"),
    ("pyproject.toml", '[tool.initaudit]\nper-layer-ignores = ["x"]\n', "per-layer-ignores must be a table"),
    ("pyproject.toml", '[tool.initaudit]\nfail-on = true\n', "fail-on must be a string, not a boolean"),
    ("pyproject.toml", '[tool.initaudit]\nfail-on = "warn"\n', "fail-on must be one of"),
    ("pyproject.toml", '[tool.initaudit]\nactivation = "rellu"\n', "pyproject.toml: unknown activation"),
    ("pyproject.toml", '[tool.initaudit.activations]\n"head" = 0\n', "activations.'head' must be a string"),
    ("pyproject.toml", '[tool.initaudit]\nselekt = ["IA1"]\n', "unknown [tool.initaudit] key 'selekt' (did you mean 'select'?"),
    ("other.toml", '[tool.black]\nline-length = 1\n', "other.toml: no [tool.initaudit] table"),
    ("other.toml", 'trust-pickle = false\n', "other.toml: trust-pickle cannot be set in a config file"),
    # Nesting that the stdlib parser follows by recursion, and dotted keys whose cost grows with their square.
    ("deep.toml", "x = " + "[" * 100_000 + "]" * 100_000, "not readable TOML (nested deeper than 32 levels)"),
    ("deep.toml", "x = " + "{a = " * 3000 + "1" + "}" * 3000, "not readable TOML (nested deeper than 32 levels)"),
    ("deep.toml", '[tool.initaudit]\nselect = ' + '[' * 40 + ']' * 40, "nested deeper than 32 levels"),
    ("dotted.toml", ".".join(["a"] * 3000) + " = 1\n", "not readable TOML (more than 16 dots in a key"),
    ("dotted.toml", "[" + ".".join(["a"] * 3000) + "]\n", "not readable TOML (more than 16 dots in a key"),
    ("dotted.toml", "x = {b = 1, " + ".".join(["a"] * 3000) + " = 1}\n", "more than 16 dots in a key"),
    ("huge-int.toml", "x = " + "9" * 5000 + "\n", "not readable TOML (Exceeds the limit"),
]


@pytest.mark.parametrize("name, text, fragment", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_configs_are_one_clear_line_naming_the_file(name, text, fragment, tmp_path):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message, message


def test_any_toml_file_with_a_table_or_bare_keys_is_a_config(tmp_path):
    table = tmp_path / "ci.toml"
    table.write_text('[tool.initaudit]\nfail-on = "warning"\nselect = ["IA1", "init-activation-mismatch"]\n'
                     '[tool.initaudit.per-layer-ignores]\n"head.*" = ["IA101"]\n')
    bare = tmp_path / "bare.toml"
    bare.write_text('fail-on = "warning"\nselect = ["IA1", "init-activation-mismatch"]\n'
                    '[per-layer-ignores]\n"head.*" = ["IA101"]\n')
    for path in (table, bare):
        options = config.load(path)
        assert options.fail_on == "warning" and options.select == ["IA1", "init-activation-mismatch"]
        assert options.ignored("head.fc", "zero-weights", "IA101") and not options.ignored("body", "zero-weights", "IA101")
    assert config.load(start=tmp_path).fail_on == "error"  # no pyproject.toml above: the defaults


def test_per_layer_ignores_by_code_prefix_silence_just_that_layer(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('activation = "relu"\n[per-layer-ignores]\n"4" = ["IA1"]\n')
    model = tmp_path / "m.pt"
    torch.save(models.zero_layer().state_dict(), model)
    assert run("check", model, "--activation", "relu").exit_code == 1
    result = run("check", model, "--config", path)
    assert result.exit_code == 0 and "IA101" not in result.stdout


def test_brackets_and_dots_in_strings_and_comments_do_not_count(tmp_path):
    """The bounds are on structure: a config whose strings and comments hold brackets and dots is read whole, one
    whose structure nests too deep is refused."""
    path = tmp_path / "c.toml"
    noise = "[" * 40 + "." * 40 + "{" * 40
    path.write_text(f'[tool.other]\ndoc = """{noise}\n{noise}"""\nraw = \'\'\'{noise}\n\'\'\'\n'
                    f'[tool.initaudit]\nactivation = "relu"  # {noise}\n[tool.initaudit.per-layer-ignores]\n'
                    f'"{noise}" = ["IA1"]\n\'{noise}!\' = ["IA1"]\n')
    assert list(config.load(path).per_layer_ignores) == [noise, noise + "!"]
    path.write_text(f'activation = "relu"\n[per-layer-ignores]\n"{noise}" = {"[" * 33}"IA1"{"]" * 33}\n')
    with pytest.raises(InputError, match="nested deeper than 32 levels"):
        config.load(path)


def test_a_config_larger_than_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text('fail-on = "warning"\n' + "# padding\n" * 110_000)  # 1.1 MB of valid TOML
    with pytest.raises(InputError) as caught:
        config.load(path)
    assert str(caught.value) == f"{path}: larger than 1 MB, the most initaudit reads of a config file"


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a config read until memory runs out stops here


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_config_that_is_no_regular_file_is_refused_without_blocking_or_reading(kind, tmp_path):
    """In a subprocess: --config on a FIFO nobody writes would block the open forever, on /dev/zero read forever."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "pyproject.toml")
    path = tmp_path / "pyproject.toml" if kind == "fifo" else Path("/dev/zero")
    model = tmp_path / "m.pt"
    torch.save(models.zero_layer().state_dict(), model)
    done = subprocess.run([sys.executable, "-m", "initaudit.cli", "check", "--config", str(path), str(model)],
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    what = "a FIFO (named pipe)" if kind == "fifo" else "a device file"
    assert done.stderr.strip() == f"initaudit: error: {path}: {what}; initaudit reads only regular files"


def test_a_deep_config_on_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000)
    model = tmp_path / "m.pt"
    torch.save(models.zero_layer().state_dict(), model)
    result = CliRunner().invoke(main, ["check", "--config", str(path), str(model)])
    assert result.exit_code == 2, result.output
    assert one_stderr_line(result) == f"initaudit: error: {path}: not readable TOML (nested deeper than 32 levels)"
