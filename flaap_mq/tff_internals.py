"""Every internal of TensorFlow Federated that flaap-mq uses, named in one place.

TFF 0.87's public API (`tff.framework`, `tff.types`) does not reach what the
coordinator needs: the types and structures of its executor values, the
mergeable-computation machinery it drives silo by silo (and corrects where
TFF splits clients wrongly, docs/tff-partitioning-bug.md), its compiler and
executor stacks for the local merge, and the retry-free `invoke`. Every
other module imports these from here, never from `tensorflow_federated.python`,
so a TFF upgrade is checked against this one file (TFF is pinned to 0.87.0
in pyproject.toml).

Importing this module imports TFF and all of TensorFlow: the silo worker,
which only forwards bytes, never does (tests/integration/test_worker_protocol.py).
"""

from __future__ import annotations

from tensorflow_federated.python.common_libs import py_typecheck, structure
from tensorflow_federated.python.core.backends.native import compiler, mergeable_comp_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import (
    tensorflow_computation,
)
from tensorflow_federated.python.core.impl.computation import computation_base, computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_base, context_stack_impl
from tensorflow_federated.python.core.impl.execution_contexts import (
    async_execution_context,
    mergeable_comp_execution_context,
)
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import (
    cardinalities_utils,
    cardinality_carrying_base,
    executor_base,
    executor_value_base,
    executors_errors,
    ingestable_base,
    remote_executor,
    remote_executor_grpc_stub,
    remote_executor_stub,
    value_serialization,
)
from tensorflow_federated.python.core.impl.federated_context.federated_computation import (
    federated_computation,
)
from tensorflow_federated.python.core.impl.types import (
    computation_types,
    placements,
    type_analysis,
    type_conversions,
    typed_object,
)

__all__ = [
    "async_execution_context",
    "cardinalities_utils",
    "cardinality_carrying_base",
    "compiler",
    "computation_base",
    "computation_impl",
    "computation_types",
    "compute_after_merged",
    "context_base",
    "context_stack_impl",
    "executor_base",
    "executor_value_base",
    "executors_errors",
    "federated_computation",
    "ingestable_base",
    "invoke_merge_in_async_pool",
    "invoke_once",
    "invoke_up_to_merge_and_return_context",
    "merge_results",
    "mergeable_comp_compiler",
    "mergeable_comp_execution_context",
    "placements",
    "py_typecheck",
    "python_executor_stacks",
    "remote_executor",
    "remote_executor_grpc_stub",
    "remote_executor_stub",
    "repackage_partitioned_values",
    "run_in_async_context_pool",
    "structure",
    "tensorflow_computation",
    "type_analysis",
    "type_conversions",
    "typed_object",
    "value_serialization",
]

# TFF's private helpers for running a `MergeableCompForm` over a pool of async
# contexts (coordinator/partitioning.py). They hold the execution logic
# (up_to_merge on every silo, merge, after_merge, repackaging) that should
# stay TFF's; only the one that loses the order of the parts
# (`_invoke_after_merge_in_async_pool`) is not used.
compute_after_merged = mergeable_comp_execution_context._compute_after_merged
invoke_up_to_merge_and_return_context = (
    mergeable_comp_execution_context._invoke_up_to_merge_and_return_context
)
merge_results = mergeable_comp_execution_context._merge_results
invoke_merge_in_async_pool = mergeable_comp_execution_context._invoke_merge_in_async_pool
repackage_partitioned_values = mergeable_comp_execution_context._repackage_partitioned_values
run_in_async_context_pool = mergeable_comp_execution_context._run_in_async_context_pool

# `AsyncExecutionContext.invoke` without its retry decorator, which retries a
# `RetryableError` forever (coordinator/context.py and local_merge.py bound
# the retries themselves).
invoke_once = async_execution_context.AsyncExecutionContext.invoke.__wrapped__
