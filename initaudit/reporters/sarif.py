"""`--format sarif`: SARIF 2.1.0, for code-scanning dashboards. Weights have no lines, so each
result points at the model file and names the tensor as a logical location."""

from __future__ import annotations

import json
from typing import IO

from .. import __version__
from .. import rules as rulebook
from ..report import Report

LEVEL = {"error": "error", "warning": "warning", "info": "note"}
SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def to_sarif(report: Report) -> dict:
    rules = rulebook.builtin_rules()
    index = {rule.code: i for i, rule in enumerate(rules)}
    driver = {
        "name": "initaudit", "version": __version__, "informationUri": "https://pypi.org/project/initaudit/",
        "rules": [{"id": r.code, "name": r.name, "shortDescription": {"text": r.summary},
                   "fullDescription": {"text": r.why}, "help": {"text": f"{r.why}\n\nRun `initaudit explain {r.name}`."},
                   "defaultConfiguration": {"level": LEVEL[r.severity]}} for r in rules],
    }
    results = []
    for f in report.findings:
        result = {
            "ruleId": f.code, "level": LEVEL[f.severity], "message": {"text": f.message},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": report.model}},
                           "logicalLocations": [{"name": f.tensor, "fullyQualifiedName": f.tensor, "kind": "member"}]}],
            "properties": {"rule": f.rule, "layer": f.layer, "expected": f.expected, "actual": f.actual, "fix": f.fix},
        }
        if f.code in index:
            result["ruleIndex"] = index[f.code]
        results.append(result)
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [{"tool": {"driver": driver}, "results": results}]}


def write(report: Report, out: IO[str]) -> None:
    json.dump(to_sarif(report), out, indent=2)
    out.write("\n")
