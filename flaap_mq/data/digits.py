"""Per-silo, label-skewed partitions of scikit-learn's bundled handwritten digits.

`split_digits(num_silos, out_dir)` lays out what a real deployment has on
separate machines, in one directory for a demo or a test::

    OUT/silo-1/digits/     silo-1's examples (tf.data.Dataset.save)
    OUT/silo-2/digits/     ...
    OUT/test.npz           the held-out test set, for the coordinator (x, y)
    OUT/manifest.json      how it was made, and each silo's label counts

`OUT/<silo>` is what that silo's worker gets as `--data-dir`. The digits are
`sklearn.datasets.load_digits()` (1,797 8x8 images, shipped inside
scikit-learn: nothing is downloaded), pixels scaled to [0, 1].

Label skew: for each label, the share of its training examples that each silo
gets is drawn from a symmetric Dirichlet distribution with concentration
`skew` (smaller is more skewed: 0.1 gives most silos a few labels, 100 is
close to an even split). A draw that would leave a silo with fewer than
`min_examples` is drawn again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from flaap_mq.data.layout import DEFAULT_NAME, MANIFEST_FILE, TEST_FILE, load_test_set
from flaap_mq.data.silo import save_silo_dataset

__all__ = [
    "DEFAULT_NAME",
    "ELEMENT_SPEC",
    "MANIFEST_FILE",
    "TEST_FILE",
    "load_test_set",
    "split_digits",
]

NUM_CLASSES = 10
NUM_FEATURES = 64

# What every silo's saved digits look like, one example per element.
ELEMENT_SPEC = collections.OrderedDict(
    x=tf.TensorSpec([NUM_FEATURES], tf.float32),
    y=tf.TensorSpec([], tf.int32),
)


def silo_ids(num_silos: int) -> list[str]:
    return [f"silo-{i}" for i in range(1, num_silos + 1)]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: x float32 [n, 64] in [0, 1], y int32 [n]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def dirichlet_partition(
    labels: np.ndarray,
    num_silos: int,
    skew: float,
    rng: np.random.Generator,
    *,
    min_examples: int = 10,
    max_draws: int = 1000,
) -> list[np.ndarray]:
    """Indices of `labels` for each silo, label shares drawn from Dirichlet(`skew`)."""
    if num_silos < 1:
        raise ValueError(f"need at least one silo, got {num_silos}")
    if skew <= 0:
        raise ValueError(f"skew (the Dirichlet concentration) must be positive, got {skew}")
    if min_examples * num_silos > len(labels):
        raise ValueError(
            f"{len(labels)} examples cannot give {num_silos} silos {min_examples} each"
        )
    for _ in range(max_draws):
        parts: list[list[int]] = [[] for _ in range(num_silos)]
        for label in np.unique(labels):
            indices = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_silos, skew))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).round().astype(int)
            for silo, chunk in enumerate(np.split(indices, cuts)):
                parts[silo].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_examples:
            return [rng.permutation(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no draw in {max_draws} gave every silo {min_examples} examples; "
        f"use fewer silos or a larger skew than {skew}"
    )


def save_examples(
    data_dir: str | os.PathLike[str], x: np.ndarray, y: np.ndarray, name: str = DEFAULT_NAME
) -> Path:
    """Saves examples in the silo format (`ELEMENT_SPEC`) as `data_dir/name`."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int32)
    if x.ndim != 2 or x.shape[1] != NUM_FEATURES or y.shape != (len(x),):
        raise ValueError(f"expected x [n, {NUM_FEATURES}] and y [n], got {x.shape}, {y.shape}")
    dataset = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    return save_silo_dataset(dataset, data_dir, name)


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    out_dir: Path
    name: str
    silos: dict[str, Path]  # silo id -> its data directory
    label_counts: dict[str, list[int]]
    test_examples: int
    manifest: dict

    def table(self) -> str:
        """Per-silo label counts, readable in a terminal."""
        header = "silo      " + "".join(f"{d:>5}" for d in range(NUM_CLASSES)) + "  total"
        rows = [
            f"{silo:<10}" + "".join(f"{n:>5}" for n in counts) + f"  {sum(counts):>5}"
            for silo, counts in self.label_counts.items()
        ]
        return "\n".join([header, *rows, f"test set: {self.test_examples} examples"])


def split_digits(
    num_silos: int,
    out_dir: str | os.PathLike[str],
    *,
    skew: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    name: str = DEFAULT_NAME,
    ids: Sequence[str] | None = None,
    min_examples: int = 10,
) -> DigitsSplit:
    """Writes label-skewed silo partitions and a held-out test set; see the module docstring."""
    ids = list(ids) if ids is not None else silo_ids(num_silos)
    if len(ids) != num_silos or len(set(ids)) != num_silos:
        raise ValueError(f"need {num_silos} distinct silo ids, got {ids}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.model_selection import train_test_split

    out = Path(out_dir)
    for silo in ids:
        if (out / silo / name).exists():
            raise ValueError(f"{out / silo / name} exists already; choose an empty --out")
    x, y = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    rng = np.random.default_rng(seed)
    parts = dirichlet_partition(y_train, num_silos, skew, rng, min_examples=min_examples)
    out.mkdir(parents=True, exist_ok=True)
    silos: dict[str, Path] = {}
    label_counts: dict[str, list[int]] = {}
    for silo, indices in zip(ids, parts, strict=True):
        save_examples(out / silo, x_train[indices], y_train[indices], name)
        silos[silo] = out / silo
        label_counts[silo] = np.bincount(y_train[indices], minlength=NUM_CLASSES).tolist()
    np.savez(out / TEST_FILE, x=x_test, y=y_test)
    manifest = {
        "dataset": "sklearn.datasets.load_digits",
        "name": name,
        "element_spec": {"x": f"float32[{NUM_FEATURES}] in [0, 1]", "y": "int32[] in 0..9"},
        "skew": skew,
        "seed": seed,
        "test_fraction": test_fraction,
        "silos": {
            silo: {"data_dir": silo, "examples": sum(counts), "label_counts": counts}
            for silo, counts in label_counts.items()
        },
        "test": {"file": TEST_FILE, "examples": len(y_test)},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return DigitsSplit(out, name, silos, label_counts, len(y_test), manifest)
