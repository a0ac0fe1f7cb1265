"""File names shared by `split-digits` (the silos' side) and `train` (the coordinator's).

Kept free of TensorFlow, so that `flaap-mq --help` stays quick.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_NAME = "digits"  # the silos' dataset, relative to each worker's --data-dir
TEST_FILE = "test.npz"  # the coordinator's held-out set, next to the silo directories
MANIFEST_FILE = "manifest.json"


def load_test_set(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The coordinator's held-out set: x float32 [n, 64], y int32 [n] (numpy arrays)."""
    import numpy as np

    with np.load(path) as test:
        return test["x"].astype(np.float32), test["y"].astype(np.int32)
