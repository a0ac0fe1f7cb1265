"""Every repository path that README.md, docs/*.md and deploy/**/*.md mention exists.

A backticked token is taken for a path in the repository when its first
component is a directory of the repository (at its root, next to the document,
or in the `flaap_mq` package, for `worker/values.py` and the like) or it is a
top-level file; `tests/...py::name` must also define the test `name`. Markdown
links to local files are checked too. Tokens such as `training-out/...` or
`/etc/...` (made by a command, or on another host) are not repository paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy").glob("**/*.md")),
]
TOP_LEVEL_FILES = {"Makefile", "README.md", "pyproject.toml", "requirements.lock"}
# Written by a command, not in the repository (and in .gitignore).
GENERATED = {"bench/results.json", "bench/results-quick.json"}

BACKTICKED = re.compile(r"`([^`\s]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def candidate_paths(document: Path) -> list[tuple[str, list[Path]]]:
    """(token, where it may be) for every repository path `document` mentions."""
    text = document.read_text()
    found = []
    for token in BACKTICKED.findall(text):
        path, _, _ = token.partition("::")
        path = path.rstrip(".,:;")
        if path in TOP_LEVEL_FILES:
            found.append((token, [ROOT / path]))
            continue
        if "/" not in path or path.startswith(("/", ".", "~")) or "://" in path:
            continue
        if path in GENERATED or any(c in path for c in "*<>%$={}"):
            continue
        first = path.split("/", 1)[0]
        bases = [b for b in (ROOT, document.parent, ROOT / "flaap_mq") if (b / first).is_dir()]
        if bases:
            found.append((token, [b / path for b in bases]))
    for target in LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        found.append((target, [document.parent / target.split("#", 1)[0]]))
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_mentioned_path_exists(document: Path) -> None:
    missing = []
    for token, places in candidate_paths(document):
        existing = [p for p in places if p.exists()]
        if not existing:
            missing.append(token)
            continue
        _, _, test_name = token.partition("::")
        if test_name and not any(
            re.search(rf"^\s*def {re.escape(test_name)}\(", p.read_text(), re.M)
            for p in existing
            if p.is_file()
        ):
            missing.append(token)
    assert not missing, f"{document.relative_to(ROOT)} mentions paths that do not exist: {missing}"


def test_the_check_sees_the_readme_paths() -> None:
    """The check is not vacuous: it finds the README's links to docs and code."""
    tokens = {token for token, _ in candidate_paths(ROOT / "README.md")}
    assert {"docs/install.md", "flaap_mq/examples.py", "deploy/rabbitmq/"} <= tokens
