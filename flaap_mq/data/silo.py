"""Datasets that live on a silo and are read there, never sent to the coordinator.

A silo's worker runs its TFF executor with the silo's data directory as the
working directory (`flaap-mq worker --data-dir DIR`). `silo_dataset(name,
element_spec)` is a TFF computation with no argument whose body opens the
dataset `name`, a path relative to that directory, *inside the TF graph*; so
`tff.federated_eval(silo_dataset(...), tff.CLIENTS)` makes every silo load its
own copy and feed it into the round. What crosses the broker is the
computation (the path, the element spec, the ops), never an example.

Why not `tf.data.Dataset.load` itself: in TF 2.14 it opens
`<path>/snapshot.metadata` in Python while the graph is being *built*, to see
whether the snapshot is a distributed one. Built on the coordinator, that
fails (`NotFoundError: digits/snapshot.metadata`) or, worse, reads the
coordinator's own file of that name. `silo_dataset` builds the same graph
op (`LoadDataset`, what `Dataset.load` returns for a snapshot written by
`Dataset.save`) without touching the file system, so the path is resolved
only where the graph runs: on the silo, relative to its data directory.

Datasets are written with `save_silo_dataset` (`tf.data.Dataset.save` with
one shard) and read back in order, so a run is reproducible and the same
examples in the same order reach the same training on TFF's local runtime
(`read_silo_dataset`).
"""

from __future__ import annotations

import collections
import os
import posixpath
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# The `LoadDataset` op as `tf.data.Dataset.load` builds it, minus the
# coordinator-side metadata read described above.
from tensorflow.python.data.ops import load_op

__all__ = ["read_silo_dataset", "save_silo_dataset", "silo_dataset", "validate_name"]

ElementSpec = Any  # a (nested) structure of tf.TensorSpec, as `Dataset.element_spec`
Transform = Callable[[tf.data.Dataset], tf.data.Dataset]


def validate_name(name: str) -> str:
    """`name` if it is a relative path that stays inside the data directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"a silo dataset name must be a non-empty string, got {name!r}")
    normalized = posixpath.normpath(name)
    if (
        name.startswith(("/", "~"))
        or os.path.isabs(name)
        or "://" in name
        or normalized == ".."
        or normalized.startswith("../")
    ):
        raise ValueError(
            f"a silo dataset name is a path relative to the silo's data directory, "
            f"without '..'; got {name!r}"
        )
    return normalized


def _ordered(element_spec: ElementSpec) -> ElementSpec:
    """Dicts as OrderedDicts, so TFF sees the keys in a fixed order."""
    if isinstance(element_spec, Mapping):
        return collections.OrderedDict((k, _ordered(v)) for k, v in element_spec.items())
    return element_spec


def _in_order(datasets: tf.data.Dataset) -> tf.data.Dataset:
    """Reads the snapshot's shards one after another, in order (deterministic)."""
    return datasets.flat_map(lambda shard: shard)


def load_in_graph(name: str, element_spec: ElementSpec) -> tf.data.Dataset:
    """The dataset `name`, opened by the graph when it runs, not while it is built."""
    return load_op._LoadDataset(  # see the module docstring
        validate_name(name), _ordered(element_spec), None, _in_order
    )


def silo_dataset(
    name: str,
    element_spec: ElementSpec,
    *,
    transform: Transform | None = None,
) -> tff.Computation:
    """A TFF computation, no argument, that loads the silo's dataset `name`.

    Use it with `tff.federated_eval(silo_dataset(name, spec), tff.CLIENTS)`:
    each silo's executor loads the dataset saved (with `save_silo_dataset` or
    `tf.data.Dataset.save`) under `name` in its own data directory, and the
    coordinator never holds it.

    Args:
      name: path of the saved dataset relative to the silo's data directory
        (the worker's `--data-dir`); absolute paths and '..' are refused.
      element_spec: the saved dataset's `element_spec` (e.g.
        `OrderedDict(x=tf.TensorSpec([64], tf.float32), y=tf.TensorSpec([], tf.int32))`).
        The silo's data must match it; a mismatch fails on the silo.
      transform: optional preprocessing run on the silo right after loading,
        e.g. `lambda ds: ds.repeat(5).batch(20)`. It is traced on the
        coordinator (it must not read files itself) and runs on the silo.

    Returns:
      A `tff.tensorflow.computation` of type `( -> T*)`, `T*` being the
      element type after `transform`.
    """
    name = validate_name(name)
    spec = _ordered(element_spec)

    @tff.tensorflow.computation
    def load_silo_dataset() -> tf.data.Dataset:
        dataset = load_in_graph(name, spec)
        return transform(dataset) if transform is not None else dataset

    return load_silo_dataset


def save_silo_dataset(
    dataset: tf.data.Dataset, data_dir: str | os.PathLike[str], name: str
) -> Path:
    """Saves `dataset` as `data_dir/name`, in one shard so that it reads back in order."""
    path = Path(data_dir) / validate_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save(str(path), shard_func=lambda *_: np.int64(0))
    return path


def read_silo_dataset(
    data_dir: str | os.PathLike[str], name: str, element_spec: ElementSpec
) -> tf.data.Dataset:
    """Reads a silo dataset here, in the caller's process, exactly as `silo_dataset` does.

    For tests and references on one machine (e.g. the same training on TFF's
    local runtime, the data passed in from Python); the point of
    `silo_dataset` is that a real coordinator never does this.
    """
    path = Path(data_dir) / validate_name(name)
    if not (path / "snapshot.metadata").is_file():
        raise FileNotFoundError(f"no dataset saved with tf.data.Dataset.save at {path}")
    return load_op._LoadDataset(str(path), _ordered(element_spec), None, _in_order)
