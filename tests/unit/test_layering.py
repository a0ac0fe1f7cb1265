"""The layout's rules, checked.

TFF's internals are named in one module; the product never imports testing/.
"""

from __future__ import annotations

import re
from pathlib import Path

import flaap_mq

PACKAGE = Path(flaap_mq.__file__).parent
TFF_HOME = PACKAGE / "tff_internals.py"
# An import from TFF's non-public tree, or a private attribute of one of its modules.
TFF_INTERNAL = re.compile(
    r"tensorflow_federated\.python|__wrapped__|mergeable_comp_execution_context\._"
)
TESTING_IMPORT = re.compile(
    r"^\s*(from flaap_mq\.testing\b|import flaap_mq\.testing\b|from flaap_mq import testing\b)"
)


def _lines(paths, pattern):
    return [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(paths)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]


def test_only_tff_internals_names_tff_internals():
    offenders = _lines((p for p in PACKAGE.rglob("*.py") if p != TFF_HOME), TFF_INTERNAL)
    assert offenders == [], "import these from flaap_mq.tff_internals:\n" + "\n".join(offenders)


def test_the_tff_home_module_does_name_them():
    # The pattern is known to match: the one module that may name them does.
    assert _lines([TFF_HOME], TFF_INTERNAL)


def test_no_product_module_imports_testing():
    testing = PACKAGE / "testing"
    product = (p for p in PACKAGE.rglob("*.py") if testing not in p.parents)
    offenders = _lines(product, TESTING_IMPORT)
    assert offenders == [], "the product imports test helpers:\n" + "\n".join(offenders)


def test_the_testing_pattern_matches_an_import_of_testing():
    assert TESTING_IMPORT.search("from flaap_mq.testing.cli import run_cli")
    assert TESTING_IMPORT.search("    from flaap_mq.testing import tff_local")
    assert not TESTING_IMPORT.search("from flaap_mq.local.workers import WorkerFleet")
