"""The environment TFF's executor starts with: only what it needs, never a secret.

The executor runs whatever TensorFlow graph a coordinator sends, and a graph
can read `/proc/self/environ`. So it does not inherit its owner's
environment, which may hold `FLAAP_MQ_BROKER_URL` with a password: it gets
an allow-list of variables that set locale and TensorFlow's own threading
and logging, plus any an operator names in `FLAAP_MQ_EXECUTOR_ENV`
(comma-separated, e.g. `CUDA_VISIBLE_DEVICES`). No `FLAAP_MQ_*` variable
ever passes, named or not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

EXECUTOR_ENV = "FLAAP_MQ_EXECUTOR_ENV"
# Names passed through as they are, and prefixes of names passed through.
_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "GRPC_VERBOSITY", "TF_ENABLE_ONEDNN_OPTS"})
_PREFIXES = ("LC_", "TF_CPP_", "TF_NUM_", "OMP_", "KMP_")
_NEVER = "FLAAP_MQ_"
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def minimal_environment(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `source` (default: this process's environment)."""
    source = os.environ if source is None else source
    named = {n.strip() for n in source.get(EXECUTOR_ENV, "").split(",") if n.strip()}
    kept = {
        name: value
        for name, value in source.items()
        if (name in _NAMES or name in named or name.startswith(_PREFIXES))
        and not name.startswith(_NEVER)
    }
    kept.setdefault("PATH", _DEFAULT_PATH)
    return kept
