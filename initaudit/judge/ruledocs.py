"""Rule documentation pages: each rule's *what it does / why is this bad / example / fix*, rendered from its
YAML to `docs/rules/NAME.md` (and an index), linked from `initaudit explain` and SARIF's `helpUri`.

    python -m initaudit.ruledocs [FOLDER]     # rewrite the pages (default: docs/rules of this checkout)

A test renders them again and compares, so the pages cannot drift from the rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from initaudit.judge import rules as rulebook
from initaudit.common.project import RULE_DOCS_URL

FIXES = {
    "reinit": "`initaudit fix MODEL -o OUT` re-draws the layer with the scheme its activation calls for "
              "(`initaudit.fix(module)` on a live module).",
    "zeros": "`initaudit fix MODEL -o OUT` sets the tensor to zeros.",
    "none": "No automatic fix: change the init code (see the example).",
}


def url(rule: rulebook.Rule) -> str:
    return f"{RULE_DOCS_URL}{rule.name}.md"


def _condition(cond: dict) -> str:
    return yaml.safe_dump(cond, default_flow_style=True, width=10_000, sort_keys=False).strip()


def page(rule: rulebook.Rule) -> str:
    """One rule's page, in Markdown."""
    roles = ", ".join(rule.applies_to)
    lines = [f"# {rule.name} ({rule.code})", "",
             f"Default severity: **{rule.severity}** · checks: {roles} · defined in `{rule.source}`", "",
             "## What it does", "", f"{rule.summary}. It fires when `{_condition(rule.when)}`.", ""]
    if rule.severity_by:
        lines += ["Its severity, first match wins:", ""]
        lines += [f"- **{severity}** when `{_condition(cond)}`" for severity, cond in rule.severity_by]
        lines += [f"- otherwise **{rule.severity}**", ""]
    lines += ["## Why is this bad?", "", rule.why, ""]
    if rule.example:
        lines += ["## Example", "", "```python"]
        for kind, code in rule.example.items():
            lines += [f"# {kind}", str(code).strip()]
        lines += ["```", ""]
    lines += ["## Fix", "", FIXES[rule.fix], "",
              f"Select or ignore it by name or code: `--select {rule.name}`, `--ignore {rule.code}`; for one "
              f"layer, `--per-layer-ignore 'LAYER={rule.code}'` or `[tool.initaudit.per-layer-ignores]`.", ""]
    return "\n".join(lines)


def index(rules: list[rulebook.Rule]) -> str:
    lines = ["# Rules", "", "Rendered from the YAML in `rules/` by `python -m initaudit.ruledocs`.", "",
             "| code | rule | default severity | summary |", "|---|---|---|---|"]
    lines += [f"| {r.code} | [{r.name}]({r.name}.md) | {r.severity} | {r.summary} |" for r in rules]
    return "\n".join(lines) + "\n"


def pages(rules: list[rulebook.Rule] | None = None) -> dict[str, str]:
    """File name -> contents of every page (README.md is the index)."""
    rules = rulebook.builtin_rules() if rules is None else rules
    return {"README.md": index(rules), **{f"{r.name}.md": page(r) for r in rules}}


def write(folder: Path) -> list[Path]:
    """Rewrite the pages in `folder` (pages of rules that no longer exist are removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = pages()
    for stale in folder.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [folder / name for name in wanted]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs" / "rules"
    for path in write(target):
        print(path)
