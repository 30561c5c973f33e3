"""The README as a new user meets it: its first screen goes from a clone to checking their own model, its links
lead to pages that exist, the commands in it and in docs/ use real subcommands and flags, its CI snippets pin a
commit of this repository, and every repository URL in the project is the one of initaudit/project.py."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import click
import pytest
import yaml
from click.testing import CliRunner

from helpers import ROOT
from helpers.readme_snippets import README, action_step, code_blocks, inline_code, links, precommit_repo, tokens
from initaudit.cli.main import main
from initaudit.common.project import REPOSITORY_URL

FIRST_SCREEN = 60  # lines: what a new user reads before scrolling far
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SHELL_BLOCKS = ("sh", "shell", "bash", "console", "")
GITHUB_URL = re.compile(r"https?://(?:www\.)?github\.com/[^\s)\]'\"`<>]*")
SHA = re.compile(r"[0-9a-f]{40}")


def first_screen() -> str:
    return "\n".join(README.read_text(encoding="utf-8").splitlines()[:FIRST_SCREEN])


def test_the_first_screen_goes_from_clone_to_your_own_model():
    text = first_screen()
    for step in (f"git clone {REPOSITORY_URL}", "make demo", "make test", "pip install", ".venv/bin/initaudit"):
        assert step in text, f"the README's first {FIRST_SCREEN} lines should show `{step}`"
    own = [line for line in text.splitlines()
           if re.search(r"initaudit check \S+\.(pt|safetensors)\b.*--activation\b", line)]
    assert own, "the first screen should check a model of your own with --activation"
    flat = " ".join(text.split())
    assert re.search(r"A bare `\.pt` or `\.safetensors` file holds weights but no activations", flat), \
        "the first screen should say that a bare .pt/.safetensors file carries no activations"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found = tokens(page)
    return {slug(found[i + 1].content) for i, t in enumerate(found) if t.type == "heading_open"}


def local_links(page: Path) -> list[tuple[Path, str]]:
    """(target file, anchor) of each link of `page` into this repository."""
    out = []
    for href in links(page):
        if urlparse(href).scheme or href.startswith("#"):
            continue
        path, _, anchor = href.partition("#")
        out.append(((page.parent / path).resolve(), anchor))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_to_a_page_and_heading_that_exist(page):
    for target, anchor in local_links(page):
        assert target.exists(), f"{page.name} links to {target.relative_to(ROOT)}, which does not exist"
        if anchor:
            assert anchor in anchors(target), f"{page.name} links to #{anchor}, not a heading of {target.name}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target for target, _ in local_links(README)}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked]


def command_lines(page: Path) -> list[str]:
    """Every `initaudit ...` command a page shows: in shell blocks (after a `$ ` prompt too) and inline code."""
    lines = [line.removeprefix("$ ") for lang, text in code_blocks(page) if lang in SHELL_BLOCKS
             for line in text.splitlines()]
    lines += inline_code(page)
    return [line for line in lines if re.match(r"(\S*/)?initaudit ", line)]


def options_of(command) -> set[str]:
    params = command.get_params(click.Context(command))
    return {name for p in params for name in (*p.opts, *p.secondary_opts)}


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-"]


def assert_real(subcommand: str, words: list[str], where: str) -> None:
    assert subcommand in main.commands, f"{where}: `initaudit {subcommand}` is not a command"
    unknown = set(flags(words)) - options_of(main.commands[subcommand])
    assert not unknown, f"{where}: `initaudit {subcommand}` has no option {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_shown_use_real_subcommands_and_flags(page):
    shown = command_lines(page)
    assert page != README or len(shown) >= 20, "the README's commands were not found"
    for line in shown:
        words = shlex.split(line, comments=True)
        assert_real(words[1], words[2:], f"{page.name}: {line!r}")


def test_flags_named_in_the_text_exist():
    """Inline code that opens with a flag (`--trust-pickle`, `-q/--quiet`) names an option some command has."""
    every = set.union(options_of(main), *(options_of(c) for c in main.commands.values()))
    for page in PAGES:
        named = {w for code in inline_code(page) if code.startswith("-")
                 for w in re.split(r"[/= ]", code)[:2] if w.startswith("-")}
        assert not named - every, f"{page.name} names options no command has: {sorted(named - every)}"


def test_the_ci_snippets_pass_real_flags_to_check():
    assert_real("check", precommit_repo()["hooks"][0].get("args", []), "README pre-commit snippet")
    assert_real("check", shlex.split(action_step()["with"].get("args", "")), "README workflow snippet")


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def this_repository() -> None:
    """Skip unless ROOT is a full git checkout of its own (not an sdist, not a shallow clone)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot look the pinned commit up")
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT.resolve():
        pytest.skip(f"{ROOT} is not a git checkout: cannot look the pinned commit up")
    if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone: the pinned commit may be outside its history")


def test_the_ci_snippets_pin_a_commit_of_this_repository():
    repo, step = precommit_repo(), action_step()
    rev = str(repo["rev"])
    assert repo["repo"] == REPOSITORY_URL and SHA.fullmatch(rev), "pre-commit: repo must be the project, rev a full SHA"
    assert step["uses"] == f"{urlparse(REPOSITORY_URL).path.strip('/')}@{rev}", "the action must pin the same commit"
    this_repository()
    assert git("cat-file", "-e", f"{rev}^{{commit}}").returncode == 0, f"{rev} is not a commit of this repository"
    # At that commit the hook exists and installs nothing (a `python` hook would pull torch into pre-commit's env).
    hooks = yaml.safe_load(git("show", f"{rev}:.pre-commit-hooks.yaml").stdout)
    (hook,) = [h for h in hooks if h["id"] == "initaudit"]
    assert hook["language"] in ("system", "unsupported"), f"the hook at {rev} builds an environment"
    assert git("cat-file", "-e", f"{rev}:action.yml").returncode == 0, f"no action.yml at {rev}"


def project_files() -> list[Path]:
    shipped = [README, ROOT / "action.yml", ROOT / ".pre-commit-hooks.yaml", ROOT / "pyproject.toml"]
    return shipped + sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "initaudit").rglob("*.py"))


def test_one_repository_url_everywhere():
    urls = {(path.relative_to(ROOT).as_posix(), url.rstrip(".,;:"))
            for path in project_files() for url in GITHUB_URL.findall(path.read_text(encoding="utf-8"))}
    assert {"README.md", "action.yml", ".pre-commit-hooks.yaml"} <= {where for where, _ in urls}
    stray = sorted((where, url) for where, url in urls
                   if url != REPOSITORY_URL and not url.startswith(REPOSITORY_URL + "/"))
    assert not stray, f"GitHub URLs other than {REPOSITORY_URL}: {stray}"


def test_explain_and_sarif_link_into_the_repository():
    runner = CliRunner()
    explained = runner.invoke(main, ["explain", "zero-weights"])
    page = f"{REPOSITORY_URL}/blob/main/docs/rules/zero-weights.md"
    assert explained.exit_code == 0 and f"Docs: {page}" in explained.output
    done = runner.invoke(main, ["check", str(ROOT / "fixtures" / "zero_layer_mlp.pt"), "--format", "sarif"])
    driver = json.loads(done.output)["runs"][0]["tool"]["driver"]
    assert driver["informationUri"] == REPOSITORY_URL
    prefix = f"{REPOSITORY_URL}/blob/main/"
    assert all(r["helpUri"].startswith(prefix) and (ROOT / r["helpUri"][len(prefix):]).exists()
               for r in driver["rules"])


ARCHITECTURE = ROOT / "docs" / "architecture.md"
SOURCE_PATH = re.compile(r"`(initaudit/[\w/]+(?:\.py)?)`")


def missing_paths(page: Path) -> list[str]:
    return sorted(p for p in set(SOURCE_PATH.findall(page.read_text(encoding="utf-8"))) if not (ROOT / p).exists())


def resolve(dotted: str):
    """What a dotted name names: a module, or an attribute of one (AttributeError where there is none)."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module, _, attr = dotted.rpartition(".")
        return getattr(resolve(module), attr)


@pytest.mark.parametrize("page", [p for p in PAGES if p != ARCHITECTURE], ids=lambda p: p.name)
def test_source_paths_and_public_names_shown_exist(page):
    assert not missing_paths(page), f"{page.name} names files that do not exist"
    for dotted in re.findall(r"`(initaudit(?:\.[A-Za-z_]\w*)+)`", page.read_text(encoding="utf-8")):
        resolve(dotted)


def test_the_architecture_page_names_paths_that_exist():
    """docs/architecture.md describes the stage packages (initaudit/load/, flow/, measure/, judge/...)."""
    if not (ROOT / "initaudit" / "pipeline.py").exists():
        pytest.skip("the stage packages of docs/architecture.md (initaudit/pipeline.py, load/, flow/...) are not "
                    "in place yet")
    assert SOURCE_PATH.findall(ARCHITECTURE.read_text(encoding="utf-8"))
    assert not missing_paths(ARCHITECTURE), "docs/architecture.md names files that do not exist"
