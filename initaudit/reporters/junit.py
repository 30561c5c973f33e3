"""`--format junit`: JUnit XML for CI test dashboards. One test suite per model; one test case per finding,
failed when its severity is at or above --fail-on; a clean model is one passing case; an unreadable one is
an error."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import IO

from initaudit.common.printable import printable
from initaudit.judge.report import Results
from initaudit.judge.rules import SEVERITIES
from initaudit.reporters import View, message


def _fails(severity: str, fail_on: str) -> bool:
    return fail_on != "never" and SEVERITIES.index(severity) >= SEVERITIES.index(fail_on)


def to_xml(results: Results, fail_on: str) -> ET.Element:
    root = ET.Element("testsuites", name="initaudit")
    for report in results.reports:
        path = printable(report.model)
        failures = sum(_fails(f.severity, fail_on) for f in report.findings)
        why = report.no_verdict()
        suite = ET.SubElement(root, "testsuite", name=path, tests=str(max(len(report.findings), 1)),
                              failures=str(failures), errors=str(int(why is not None)))
        if report.coverage is not None:
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="coverage", value=printable(report.coverage.line()))
        if why:
            case = ET.SubElement(suite, "testcase", name="audit", classname=path)
            ET.SubElement(case, "error", message=printable(why), type="coverage")
        elif not report.findings:
            ET.SubElement(suite, "testcase", name="no findings", classname=path)
        for f in report.findings:
            case = ET.SubElement(suite, "testcase", name=printable(f"{f.layer}: {f.code} {f.rule}"), classname=path)
            if _fails(f.severity, fail_on):
                failure = ET.SubElement(case, "failure", message=message(f), type=f.severity)
                failure.text = printable(f"{path}:{f.layer}: {f.code} {f.rule} {f.severity}: {message(f)}")
            else:
                ET.SubElement(case, "system-out").text = f"{f.severity}: {message(f)}"
    for e in results.unreadable:
        suite = ET.SubElement(root, "testsuite", name=printable(e.path), tests="1", failures="0", errors="1")
        case = ET.SubElement(suite, "testcase", name="read", classname=printable(e.path))
        ET.SubElement(case, "error", message=printable(e.message), type="input")
    root.set("tests", str(sum(int(suite.get("tests")) for suite in root)))
    root.set("failures", str(sum(int(suite.get("failures")) for suite in root)))
    root.set("errors", str(sum(int(suite.get("errors")) for suite in root)))
    return root


def write(results: Results, out: IO[str], view: View) -> None:
    root = to_xml(results, view.fail_on)
    ET.indent(root)
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    out.write(ET.tostring(root, encoding="unicode"))
    out.write("\n")
