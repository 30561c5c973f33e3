"""Baselines: a run's findings recorded by a stable fingerprint, so that a later run fails only on new ones.

A finding's fingerprint is its rule's name, its model's path relative to the baseline file's folder ('/'-separated;
a URL or `<module>` as it is), its layer and its tensor: never its message or the values measured, so a retrained
checkpoint keeps the entries its old bugs have, and a model moved together with its baseline keeps matching.
The file is JSON, its entries sorted and one per line, so that it diffs well under version control:

    {"tool": "initaudit", "version": 1, "findings": [
      {"model": "ckpt/model.pt", "rule": "zero-weights", "code": "IA101", "layer": "fc", "tensor": "fc.weight"}
    ]}

`apply` moves the findings a baseline holds from a report's `findings` to its `baselined` (they no longer count
toward the exit code) and notes the entries of the models audited that no finding matched any more (fixed).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from initaudit.common.errors import InputError
from initaudit.judge.report import Finding, Report, Results
from initaudit.load.bounded import MAX_JSON_BYTES, Unreadable, loads_json, read_regular
from initaudit.load.paths import is_remote

VERSION = 1
_FIELDS = ("model", "rule", "code", "layer", "tensor")
_SHOWN_FIXED = 5  # fixed entries named in a report's note; the rest are counted


@dataclass(frozen=True, order=True)
class Entry:
    """One baselined finding: what it is matched on (the code is kept for people reading the file)."""

    model: str
    layer: str
    tensor: str
    rule: str
    code: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.model, self.rule, self.layer, self.tensor

    def said(self) -> str:
        return f"{self.rule} on {self.tensor or self.layer or '(model)'}"


def model_key(model: str, folder: Path) -> str:
    """A report's model as a baseline in `folder` names it: its path relative to that folder, else as it is."""
    if is_remote(model) or model.startswith("<"):
        return model
    return Path(os.path.relpath(os.path.abspath(model), os.path.abspath(folder))).as_posix()


def entry(report: Report, finding: Finding, folder: Path) -> Entry:
    return Entry(model_key(report.model, folder), finding.layer, finding.tensor, finding.rule, finding.code)


def dumps(results: Results, folder: Path) -> str:
    """The baseline of every finding of `results` (baselined ones too), for a file in `folder`."""
    found = sorted({entry(report, f, folder) for report in results.reports
                    for f in [*report.findings, *(report.baselined or [])]})
    lines = ",\n".join("  " + json.dumps({k: asdict(e)[k] for k in _FIELDS}) for e in found)
    body = f"[\n{lines}\n]" if found else "[]"
    return f'{{"tool": "initaudit", "version": {VERSION}, "findings": {body}}}\n'


class Baseline:
    """The entries of a baseline file, matched against the reports of a run."""

    def __init__(self, entries: list[Entry], folder: Path):
        self.entries, self.folder = entries, folder
        self.keys = {e.key for e in entries}

    @classmethod
    def read(cls, path: Path) -> "Baseline":
        """A baseline file, every entry checked (one InputError line naming the file when it is not one)."""
        try:
            data = loads_json(read_regular(path, MAX_JSON_BYTES, "a baseline file"))
        except Unreadable as exc:
            raise InputError(f"{path}: not a baseline file (not readable JSON: {exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
            raise InputError(f"{path}: not a baseline file (no \"findings\" list); write one with --write-baseline")
        if data.get("version") != VERSION:
            raise InputError(f"{path}: baseline version {data.get('version')!r}, this initaudit reads version "
                             f"{VERSION}; write it again with --write-baseline")
        return cls([_entry(raw, path, i) for i, raw in enumerate(data["findings"])], path.absolute().parent)

    def apply(self, results: Results, checked: Callable[[Entry], bool] = lambda e: True) -> None:
        """Move each report's baselined findings aside and note its fixed entries (of the rules `checked`)."""
        for report in results.reports:
            model = model_key(report.model, self.folder)
            kept, report.baselined = [], report.baselined or []
            for f in report.findings:
                (report.baselined if entry(report, f, self.folder).key in self.keys else kept).append(f)
            report.findings = kept
            seen = {entry(report, f, self.folder).key for f in report.baselined}
            fixed = [e for e in self.entries if e.model == model and e.key not in seen and checked(e)]
            if fixed:
                report.notes.append(_fixed_note(fixed))


def _entry(raw: object, path: Path, i: int) -> Entry:
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k, ""), str) for k in _FIELDS) \
            or not all(raw.get(k) for k in ("model", "rule")):
        raise InputError(f"{path}: finding {i} is not a baseline entry (strings model, rule, layer, tensor)")
    return Entry(raw["model"], raw.get("layer", ""), raw.get("tensor", ""), raw["rule"], raw.get("code", ""))


def _fixed_note(fixed: list[Entry]) -> str:
    named = ", ".join(e.said() for e in fixed[:_SHOWN_FIXED])
    more = f" and {len(fixed) - _SHOWN_FIXED} more" if len(fixed) > _SHOWN_FIXED else ""
    return (f"baseline: {len(fixed)} baselined finding{'s' if len(fixed) > 1 else ''} no longer found (fixed): "
            f"{named}{more}; write the baseline again to drop {'them' if len(fixed) > 1 else 'it'}")
