"""The README's coordinator program runs as written, against real silo workers.

The program is README.md's `python` block that calls
`flaap_mq.set_execution_context` with a broker URL file (step 4), with only
what ties it to a federation replaced: the URL file's path (a private file
holding the test broker's URL) and this test's topology prefix. The silos
keep the README's names. It runs in a fresh interpreter, as a user would run it, and must print
the value its last line's comment promises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
URL_FILE_ARGUMENT = 'flaap_mq.read_broker_url_file("/etc/flaap-mq/coordinator.url"),'
TIMEOUT_ARGUMENT = "task_timeout=600,"


def readme_program() -> str:
    """The README's `python` block that sets the context from a URL file, dedented."""
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", README.read_text(), re.M | re.S)
    programs = [
        textwrap.dedent(body)
        for _, body in blocks
        if "flaap_mq.set_execution_context(" in body and URL_FILE_ARGUMENT in body
    ]
    assert len(programs) == 1, f"expected one README program, found {len(programs)}"
    return programs[0]


def silos_of(program: str) -> list[str]:
    match = re.search(r"^ *\[((?:\"[\w-]+\",? ?)+)\],$", program, re.M)
    assert match, "the README program names no silos"
    return re.findall(r'"([\w-]+)"', match.group(1))


def promised_output(program: str) -> str:
    match = re.search(r"^print\(.*\)  # (\S+)$", program, re.M)
    assert match, "the README program's print has no `# expected` comment"
    return match.group(1)


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the README program no longer contains {old!r} once"
    return text.replace(old, new)


def test_readme_program_prints_its_promised_result(
    workers, broker_url: str, prefix: str, tmp_path: Path
) -> None:
    program = readme_program()
    silos = silos_of(program)
    assert silos == ["hospital-a", "hospital-b", "hospital-c"]
    workers(silos)

    url_file = tmp_path / "coordinator.url"
    url_file.touch(mode=0o600)
    url_file.write_text(broker_url + "\n")
    program = replace_once(
        program, URL_FILE_ARGUMENT, f"flaap_mq.read_broker_url_file({str(url_file)!r}),"
    )
    # The test's own topology; its workers share one login, so any silo user.
    program = replace_once(
        program,
        TIMEOUT_ARGUMENT,
        f"topology_prefix={prefix!r}, silo_users='any', {TIMEOUT_ARGUMENT}",
    )
    script = tmp_path / "program.py"
    script.write_text(program)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAAP_MQ_BROKER_URL")}
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the README program did not finish in 300 s; output: {e.stdout!r}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert promised_output(program) in done.stdout.splitlines(), done.stdout[-4000:]
