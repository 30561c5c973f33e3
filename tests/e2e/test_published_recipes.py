"""Issue 22's done-when table: published init recipes read clean and their bug twins are flagged, in every format.

The data is tests/e2e/recipes.yaml (decided before the code ran); the models are tests/helpers/recipes.py. Each
recipe and twin is checked three ways, as a user would: `--model helpers.recipes:build_<id>`, its state_dict
saved as `.pt`, and its ONNX export (dynamo=False).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import recipes
from helpers.cli import run

TABLE = yaml.safe_load(Path(__file__).with_name("recipes.yaml").read_text())
FORMATS = ("model", "pt", "onnx")
SIDES = ("recipe", "twin")


def builder_name(recipe: str, side: str) -> str:
    return f"build_{recipe}" if side == "recipe" else f"build_{recipe}_twin"


def example_input(spec) -> torch.Tensor:
    """The ONNX export's input: a float batch of the given shape, or token ids."""
    if isinstance(spec, dict):
        return torch.randint(0, spec["vocab"], spec["tokens"])
    return torch.randn(spec)


def build(recipe: str, side: str) -> torch.nn.Module:
    return getattr(recipes, builder_name(recipe, side))()


def pt_args(recipe: str, side: str) -> list[str]:
    """What the user adds to check the bare state_dict (the twin's own, where its activation differs)."""
    entry = TABLE[recipe]
    return entry.get("twin_pt_args", entry.get("pt_args", [])) if side == "twin" else entry.get("pt_args", [])


def export_onnx(module: torch.nn.Module, spec, path: Path) -> Path:
    """torch.onnx.export as users call it (the TorchScript exporter, dynamo=False), its chatter silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example_input(spec),), str(path), dynamo=False)
    return path


def save(recipe: str, side: str, fmt: str, folder: Path) -> list[str]:
    """The CLI arguments that check `side` of `recipe` in `fmt`, after writing the file it reads."""
    if fmt == "model":
        return ["--model", f"helpers.recipes:{builder_name(recipe, side)}"]
    if fmt == "pt":
        path = folder / f"{recipe}-{side}.pt"
        torch.save(build(recipe, side).state_dict(), path)
        return [str(path), *pt_args(recipe, side)]
    return [str(export_onnx(build(recipe, side), TABLE[recipe]["input"], folder / f"{recipe}-{side}.onnx"))]


@pytest.fixture(scope="module")
def serious(tmp_path_factory):
    """(recipe, side, fmt) -> (rule, layer, severity) of each finding at warning or error, each check run once."""
    folder = tmp_path_factory.mktemp("recipes")

    @functools.cache
    def check(recipe: str, side: str, fmt: str) -> frozenset[tuple[str, str, str]]:
        result = run("check", *save(recipe, side, fmt, folder), "--format", "json")
        assert result.exit_code in (0, 1), result.output + result.stderr
        findings = json.loads(result.stdout)["findings"]
        return frozenset((f["rule"], f["layer"], f["severity"]) for f in findings if f["severity"] != "info")
    return check


def rules(found) -> set[str]:
    return {rule for rule, _, _ in found}


def checked(recipe: str, fmt: str) -> bool:
    return not (fmt == "onnx" and "onnx_impossible" in TABLE[recipe])


def cases():
    return [pytest.param(r, f, id=f"{r}-{f}") for r in TABLE for f in FORMATS if checked(r, f)]


def test_the_table_holds_30_recipes_each_with_a_twin_a_source_and_every_format():
    assert len(TABLE) >= 30
    for recipe, entry in TABLE.items():
        for side in SIDES:
            build = getattr(recipes, builder_name(recipe, side))
            assert len(inspect.getdoc(build)) > 40, f"{build.__name__} names no source and recipe"
            assert set(entry[side]) == set(FORMATS), (recipe, side)
        for fmt, want in entry["twin"].items():
            assert isinstance(want, list) and want or "reason" in want, (recipe, fmt)
        for fmt, want in entry["recipe"].items():  # a recipe reports nothing, or what a reason says the format can't tell
            assert want == [] or isinstance(want, dict) and want["reason"], (recipe, fmt)


def test_every_builder_is_deterministic_and_its_twin_differs():
    for recipe in TABLE:
        first, again, twin = (build(recipe, side).state_dict() for side in ("recipe", "recipe", "twin"))
        assert all(torch.equal(first[k], again[k]) for k in first), recipe
        differs = first.keys() != twin.keys() or any(not torch.equal(first[k], twin[k]) for k in first)
        assert differs or twin_differs_in_code(recipe), recipe


def twin_differs_in_code(recipe: str) -> bool:
    """A twin whose state_dict is the recipe's: the .pt column says why it cannot tell them apart, or the user names
    the twin's other activation for the bare file."""
    return "reason" in TABLE[recipe]["twin"]["pt"] or "twin_pt_args" in TABLE[recipe]


@contextlib.contextmanager
def unless_known_gap(recipe: str, check: str):
    """Run a check; where the table lists it under `known_gaps` (what the tool does not do yet, with why), the check
    must still fail: a gap that closes fails the test until the table drops it."""
    gap = TABLE[recipe].get("known_gaps", {}).get(check)
    if gap is None:
        yield
        return
    try:
        yield
    except AssertionError:
        pytest.xfail(f"known gap: {gap}")
    pytest.fail(f"{recipe} {check}: the known gap ({gap}) is closed: drop it from recipes.yaml's known_gaps")


@pytest.mark.parametrize("recipe, fmt", cases())
def test_published_recipe_reads_as_the_table_says(serious, recipe, fmt):
    """A published recipe gets exactly the findings the table gives its format at warning or error ([]: none)."""
    found, want = serious(recipe, "recipe", fmt), TABLE[recipe]["recipe"][fmt]
    with unless_known_gap(recipe, f"recipe.{fmt}"):
        assert rules(found) == set(want["reports"] if isinstance(want, dict) else want), sorted(found)


@pytest.mark.parametrize("recipe, fmt", cases())
def test_bug_twin_is_flagged_where_the_format_can_show_it(serious, recipe, fmt):
    """The twin's bug fires its rule in each format that can show it; elsewhere the format reports what the table
    says (for the reason it gives)."""
    want, found = TABLE[recipe]["twin"][fmt], serious(recipe, "twin", fmt)
    with unless_known_gap(recipe, f"twin.{fmt}"):
        if isinstance(want, dict):
            assert rules(found) == set(want["reports"]), sorted(found)
        else:
            assert set(want) <= rules(found), sorted(found)


@pytest.mark.parametrize("recipe", list(TABLE))
def test_twin_gets_the_same_findings_in_every_format_that_can_show_it(serious, recipe):
    """(rule, layer, severity) agree across the formats whose twin column is a list."""
    formats = [f for f in FORMATS if checked(recipe, f) and isinstance(TABLE[recipe]["twin"][f], list)]
    seen = {fmt: serious(recipe, "twin", fmt) for fmt in formats}
    with unless_known_gap(recipe, "parity"):
        assert len({found for found in seen.values()}) == 1, {fmt: sorted(found) for fmt, found in seen.items()}
