"""TFF's internals are named in one module, so a TFF upgrade is checked against one file."""

from __future__ import annotations

import re
from pathlib import Path

import flaap_mq

PACKAGE = Path(flaap_mq.__file__).parent
HOME = PACKAGE / "tff_internals.py"
# An import from TFF's non-public tree, or a private attribute of one of its modules.
INTERNAL = re.compile(
    r"tensorflow_federated\.python|__wrapped__|mergeable_comp_execution_context\._"
)


def test_only_tff_internals_names_tff_internals():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != HOME
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert offenders == [], "import these from flaap_mq.tff_internals:\n" + "\n".join(offenders)


def test_the_home_module_does_name_them():
    # The pattern is known to match: the one module that may name them does.
    assert INTERNAL.search(HOME.read_text())
