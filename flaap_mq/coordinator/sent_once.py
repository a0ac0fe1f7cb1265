"""A silo's part of an argument, sent to each executor at most once per invocation.

Why: TFF runs a federated computation over silos as a `MergeableCompForm`,
and hands the argument to it twice: each silo's part goes to `up_to_merge`,
and the same part again, as `original_arg`, to `after_merge`. Each of TFF's
`invoke`s ingests its argument anew, so a silo receives its part twice: a
64 MiB model of a round is serialized and sent twice, for 1.25 s of a 3.5 s
call (docs/benchmarks.md, "Profile of the data path"). TFF's own remote path
does the same.

A `SentOnce` holds one part. TFF's execution context ingests an argument that
is an `Ingestable` by asking it to ingest itself into the executor (its
`_ingest`), including as an element of the `(original_arg, merge_result)`
struct of `after_merge`; a `SentOnce` then creates the value in that executor
the first time and hands back the same executor value after that. The
executor holds it until the part is dropped at the end of the invocation
(values are disposed of when unreferenced, `silo_executor.SiloValue`).

What TFF would have done to the part before ingesting it, this does too, in
the same way (`_prepared`): its structs become Python containers and its
TensorFlow tensors numpy arrays (the contexts' `transform_args`). An executor
is recognised by identity: after a failed invocation TFF replaces a context's
executor, so a retry sends the part again, to the new one.
"""

from __future__ import annotations

from typing import Any

import tree

from flaap_mq.tff_internals import (
    cardinalities_utils,
    cardinality_carrying_base,
    computation_types,
    executor_base,
    executor_value_base,
    ingestable_base,
    structure,
    tensorflow_computation,
)


class SentOnce(ingestable_base.Ingestable, cardinality_carrying_base.CardinalityCarrying):
    """One part of an argument, created in each executor that ingests it once."""

    def __init__(self, value: object, type_spec: computation_types.Type) -> None:
        self._value = value
        self._type_spec = type_spec
        # TFF's contexts infer an executor's cardinalities from the argument;
        # they ask a CardinalityCarrying object instead of looking inside it.
        self._cardinality = cardinalities_utils.infer_cardinalities(value, type_spec)
        self._ingested: dict[int, tuple[executor_base.Executor, Any]] = {}

    @property
    def type_signature(self) -> computation_types.Type:
        return self._type_spec

    @property
    def cardinality(self) -> dict[Any, int]:
        return dict(self._cardinality)

    async def ingest(self, executor: executor_base.Executor) -> executor_value_base.ExecutorValue:
        known = self._ingested.get(id(executor))
        if known is not None and known[0] is executor:
            return known[1]
        created = await executor.create_value(_prepared(self._value), self._type_spec)
        # The executor is kept with its value, so that its id cannot be reused
        # by another executor while this part lives.
        self._ingested[id(executor)] = (executor, created)
        return created

    def __repr__(self) -> str:
        return f"SentOnce({self._type_spec}, ingested into {len(self._ingested)} executor(s))"


def _as_python(obj: object) -> object:
    return structure.to_odict_or_tuple(obj) if isinstance(obj, structure.Struct) else None


def _prepared(value: object) -> object:
    """`value` as TFF's `AsyncExecutionContext.invoke` prepares an argument.

    TFF turns the structs in it into Python containers and applies the
    context's `transform_args` (every flaap-mq context, silo or merge, uses
    TensorFlow's: tensors and variables become numpy values) before `_ingest`
    creates it. An `Ingestable` is a leaf to those steps, so it does them itself.
    """
    return tensorflow_computation.transform_args(tree.traverse(_as_python, value))


def sent_once(parts: list[object], type_spec: computation_types.Type) -> list[object]:
    """Each part as a `SentOnce`; `None` (no argument) stays `None`."""
    return [None if part is None else SentOnce(part, type_spec) for part in parts]
