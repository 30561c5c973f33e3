"""`--format sarif`: SARIF 2.1.0, for code-scanning dashboards. Weights have no lines, so each result
points at its model file (one artifact per file) and names the tensor as a logical location; each
rule's `helpUri` is its page in docs/rules/."""

from __future__ import annotations

import json
from typing import IO

from initaudit import __version__
from initaudit.judge import rules as rulebook
from initaudit.judge.report import Results
from initaudit.common.project import REPOSITORY_URL
from initaudit.judge.ruledocs import url
from initaudit.reporters import View

LEVEL = {"error": "error", "warning": "warning", "info": "note"}
SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def to_sarif(results: Results) -> dict:
    rules = rulebook.builtin_rules()
    index = {rule.code: i for i, rule in enumerate(rules)}
    driver = {
        "name": "initaudit", "version": __version__, "informationUri": REPOSITORY_URL,
        "rules": [{"id": r.code, "name": r.name, "shortDescription": {"text": r.summary},
                   "fullDescription": {"text": r.why}, "help": {"text": f"{r.why}\n\nRun `initaudit explain {r.name}`."},
                   "helpUri": url(r), "defaultConfiguration": {"level": LEVEL[r.severity]}} for r in rules],
    }
    paths = [r.model for r in results.reports] + [e.path for e in results.unreadable]
    artifacts = {path: i for i, path in enumerate(dict.fromkeys(paths))}
    found = []
    for report, f in results.findings:
        result = {
            "ruleId": f.code, "level": LEVEL[f.severity], "message": {"text": f.message},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": report.model, "index": artifacts[report.model]}},
                           "logicalLocations": [{"name": f.tensor, "fullyQualifiedName": f.tensor, "kind": "member"}]}],
            "properties": {"rule": f.rule, "layer": f.layer, "expected": f.expected, "actual": f.actual, "fix": f.fix},
        }
        if f.code in index:
            result["ruleIndex"] = index[f.code]
        found.append(result)
    failed = [(e.path, e.message) for e in results.unreadable] + [
        (r.model, r.no_verdict()) for r in results.reports if r.no_verdict()]
    invocation = {"executionSuccessful": not failed,
                  "toolExecutionNotifications": [
                      {"level": "error", "message": {"text": text},
                       "locations": [{"physicalLocation": {"artifactLocation": {"uri": path, "index": artifacts[path]}}}]}
                      for path, text in failed]}
    coverage = [{"model": r.model, **r.coverage.to_dict()} for r in results.reports if r.coverage is not None]
    run = {"tool": {"driver": driver}, "artifacts": [{"location": {"uri": path}} for path in artifacts],
           "invocations": [invocation], "results": found, "properties": {"coverage": coverage}}
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}


def write(results: Results, out: IO[str], view: View) -> None:
    json.dump(to_sarif(results), out, indent=2)
    out.write("\n")
