"""The README as the tests read it: its code blocks, links and the CI snippets meant to be pasted (parsed with
markdown-it, the Markdown parser rich already depends on)."""

from __future__ import annotations

from pathlib import Path

import yaml
from markdown_it import MarkdownIt

from helpers import ROOT

README = ROOT / "README.md"


def tokens(path: Path = README) -> list:
    """The Markdown tokens of a file, inline tokens' children flattened in."""
    flat = []
    for token in MarkdownIt().parse(path.read_text(encoding="utf-8")):
        flat.append(token)
        flat.extend(token.children or ())
    return flat


def code_blocks(path: Path = README) -> list[tuple[str, str]]:
    """Each fenced block as (language, text)."""
    return [(t.info.strip(), t.content) for t in tokens(path) if t.type == "fence"]


def inline_code(path: Path = README) -> list[str]:
    """The text of each inline code span."""
    return [t.content for t in tokens(path) if t.type == "code_inline"]


def links(path: Path = README) -> list[str]:
    """The target of each link and image."""
    return [t.attrs.get("href") or t.attrs.get("src") for t in tokens(path) if t.type in ("link_open", "image")]


def yaml_snippet(key: str) -> dict:
    """The README's one YAML block whose top level holds `key` (`repos` for pre-commit, `jobs` for a workflow)."""
    found = [doc for lang, text in code_blocks() if lang == "yaml"
             for doc in [yaml.safe_load(text)] if isinstance(doc, dict) and key in doc]
    assert len(found) == 1, f"the README should hold one YAML snippet with `{key}:`, found {len(found)}"
    return found[0]


def precommit_repo() -> dict:
    """The `repos:` entry of the README's pre-commit snippet that uses the initaudit hook."""
    (repo,) = [r for r in yaml_snippet("repos")["repos"] if any(h["id"] == "initaudit" for h in r["hooks"])]
    return repo


def action_step() -> dict:
    """The step of the README's GitHub workflow that uses the initaudit action."""
    steps = [s for job in yaml_snippet("jobs")["jobs"].values() for s in job["steps"]]
    (step,) = [s for s in steps if s.get("uses", "").startswith("initaudit/")]
    return step
