"""Config files: checked against a schema, never able to make initaudit run code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from initaudit import config
from initaudit.errors import InputError
from fixtures import models
from test_output_hardening import one_stderr_line, run


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
    ("pyproject.toml", '[tool.initaudit\n', "pyproject.toml: not valid TOML"),
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
