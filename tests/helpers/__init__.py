"""What the tests share, imported as `from helpers import ROOT` or `from helpers.formats import save_as` from any
folder of tests/ (pyproject's pytest `pythonpath` puts tests/ and the checkout on sys.path).

formats: a module saved in each file format users produce; cli: the command line in-process and its one error
line; verdicts: the fixture models' expected findings; range_server: an HTTP server on 127.0.0.1 with ranges;
zoo, trained_models: stock and trained models built from code; readme_snippets: the README as tests read it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/helpers/__init__.py -> tests/ -> ROOT
FIXTURES = ROOT / "fixtures"
# the official SARIF 2.1.0 schema, in ../shared beside the main checkout (tests validate against it when present)
SARIF_SCHEMA = ROOT.parent / "shared" / "schemas" / "sarif-schema-2.1.0.json"
