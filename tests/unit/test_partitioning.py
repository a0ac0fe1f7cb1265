"""Property tests of `flaap_mq.coordinator.partitioning.split_over_silos`.

Arguments are random nested structs (up to 3 struct levels) mixing per-client
CLIENTS values, all-equal CLIENTS values, SERVER values and unplaced values,
held in every Python container TFF accepts.  Each per-client value is a list
(or tuple) of markers that are distinct across clients and leaves, so where
every client ended up can be read back from the parts.

The tests at the bottom pin TFF 0.87's own `_split_value_into_subrounds` bug
(the reason `partitioning` exists).  If they fail after a TFF upgrade, TFF has
fixed the bug; see docs/tff-partitioning-bug.md.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import attrs
import numpy as np
import pytest
import tensorflow_federated as tff
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.execution_contexts import (
    mergeable_comp_execution_context as tff_mergeable,
)

from flaap_mq.coordinator.partitioning import PartitionedArgument, split_over_silos

# --------------------------------------------------------------------------
# Random arguments: a tree of `Leaf` / `Branch`, from which both the TFF type
# and the Python value are built.

CLIENTS = "clients"  # non-all-equal: one member per client; the only kind split
CLIENTS_ALL_EQUAL = "clients_all_equal"
SERVER = "server"
UNPLACED = "unplaced"

LEAF_TYPES = {
    CLIENTS: tff.FederatedType(np.int32, tff.CLIENTS),
    CLIENTS_ALL_EQUAL: tff.FederatedType(np.int32, tff.CLIENTS, all_equal=True),
    SERVER: tff.FederatedType(np.float32, tff.SERVER),
    UNPLACED: tff.TensorType(np.int32),
}

# Python containers for a struct value; the last four need every element named.
UNNAMED_OK_CONTAINERS = ("struct", "list", "tuple")
NAMED_ONLY_CONTAINERS = ("dict", "ordered_dict", "namedtuple", "attrs")

Path = tuple[int, ...]


@dataclasses.dataclass
class Leaf:
    kind: str
    value: object


@dataclasses.dataclass
class Branch:
    names: list[str | None]
    children: list[Leaf | Branch]
    container: str


def leaf_value(kind: str, path: Path, num_clients: int, as_tuple: bool) -> object:
    if kind == CLIENTS:
        # Markers distinct across clients and leaves: "where did client i of
        # this leaf go" is answerable from any part.
        markers = [f"{'.'.join(map(str, path))}#{i}" for i in range(num_clients)]
        return tuple(markers) if as_tuple else markers
    # Non-client leaves get a value unique to their path, so a value from the
    # wrong position would not compare equal.
    marker = sum((i + 1) * 10**d for d, i in enumerate(path))
    return float(marker) if kind == SERVER else marker


@st.composite
def trees(draw, num_clients: int, max_depth: int = 3, path: Path = ()) -> Leaf | Branch:
    # The top level is a struct most of the time (that is where TFF's bug
    # lives), but a bare leaf is a valid argument too.
    is_leaf = draw(st.booleans()) if path else draw(st.integers(0, 7)) == 0
    if max_depth == 0 or is_leaf:
        kind = draw(st.sampled_from(sorted(LEAF_TYPES)))
        return Leaf(kind, leaf_value(kind, path, num_clients, draw(st.booleans())))
    size = draw(st.integers(1, 4))
    naming = draw(st.sampled_from(["all", "none", "mixed"]))
    if naming == "mixed":
        named = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    else:
        named = [naming == "all"] * size
    names = [f"e{i}" if is_named else None for i, is_named in enumerate(named)]
    containers = UNNAMED_OK_CONTAINERS
    if all(named):
        containers += NAMED_ONLY_CONTAINERS
    container = draw(st.sampled_from(containers))
    children = [draw(trees(num_clients, max_depth - 1, (*path, i))) for i in range(size)]
    return Branch(names, children, container)


def type_of(node: Leaf | Branch) -> tff.Type:
    if isinstance(node, Leaf):
        return LEAF_TYPES[node.kind]
    return tff.StructType(
        [(name, type_of(child)) for name, child in zip(node.names, node.children, strict=True)]
    )


def value_of(node: Leaf | Branch) -> object:
    if isinstance(node, Leaf):
        return node.value
    values = [value_of(child) for child in node.children]
    pairs = list(zip(node.names, values, strict=True))
    if node.container == "struct":
        return structure.Struct(pairs)
    if node.container == "list":
        return values
    if node.container == "tuple":
        return tuple(values)
    if node.container == "dict":
        return dict(pairs)
    if node.container == "ordered_dict":
        return collections.OrderedDict(pairs)
    if node.container == "namedtuple":
        return collections.namedtuple("Row", node.names)(*values)
    if node.container == "attrs":
        return attrs.make_class("Row", node.names)(*values)
    raise AssertionError(node.container)


def leaves(node: Leaf | Branch, path: Path = ()) -> list[tuple[Path, Leaf]]:
    if isinstance(node, Leaf):
        return [(path, node)]
    return [found for i, child in enumerate(node.children) for found in leaves(child, (*path, i))]


def branches_above_clients(node: Leaf | Branch, path: Path = ()) -> list[tuple[Path, Branch]]:
    """Struct nodes with a CLIENTS leaf below them (the ones that get rebuilt)."""
    if isinstance(node, Leaf):
        return []
    below = [
        found
        for i, child in enumerate(node.children)
        for found in branches_above_clients(child, (*path, i))
    ]
    if any(leaf.kind == CLIENTS for _, leaf in leaves(node)):
        below.insert(0, (path, node))
    return below


def at(value: object, path: Path) -> object:
    """The element of `value` at `path`, whatever container holds it."""
    for index in path:
        value = structure.from_container(value)[index]
    return value


def canonical(value: object, type_spec: tff.Type) -> object:
    """`value` with every struct as a tuple of (name, element): to compare
    parts whose structs are held in different Python containers."""
    if isinstance(type_spec, tff.StructType):
        elements = structure.iter_elements(structure.from_container(value))
        return tuple(
            (name, canonical(element, element_type))
            for (_, element), (name, element_type) in zip(
                elements, structure.iter_elements(type_spec), strict=True
            )
        )
    return value


def tff_bookkeeping_advances(type_spec: tff.Type) -> bool:
    """Whether TFF's `_partition_value` advances to the next clients.

    It takes its bookkeeping from the last element of each struct, so it
    advances only if following last elements down ends at a per-client leaf.
    """
    while isinstance(type_spec, tff.StructType):
        type_spec = type_spec[len(type_spec) - 1]
    return isinstance(type_spec, tff.FederatedType) and (
        type_spec.placement is tff.CLIENTS and not type_spec.all_equal
    )


@st.composite
def arguments(draw) -> tuple[Leaf | Branch, int, int]:
    num_clients = draw(st.integers(0, 20))
    num_silos = draw(st.integers(1, 10))
    return draw(trees(num_clients)), num_clients, num_silos


PROPERTY_SETTINGS = settings(max_examples=400, deadline=None, database=None)

# --------------------------------------------------------------------------
# Properties of split_over_silos.


@PROPERTY_SETTINGS
@given(arguments())
@example(
    (
        Branch(
            ["readings", "limit"],
            [Leaf(CLIENTS, ["c0", "c1", "c2"]), Leaf(SERVER, 10.0)],
            "struct",
        ),
        3,
        3,
    )
)
def test_split_over_silos_places_every_client_on_exactly_one_silo_in_order(argument):
    tree, num_clients, num_silos = argument
    type_spec, value = type_of(tree), value_of(tree)

    parts = split_over_silos(value, type_spec, num_silos)

    all_leaves = leaves(tree)
    client_leaves = [(path, leaf) for path, leaf in all_leaves if leaf.kind == CLIENTS]
    other_leaves = [(path, leaf) for path, leaf in all_leaves if leaf.kind != CLIENTS]

    if not client_leaves:
        # Nothing to split: every silo gets the whole argument.
        assert len(parts) == num_silos
        assert all(part is value for part in parts)
        return
    if num_clients == 0:
        # Run once, over no clients.
        assert len(parts) == 1
        assert parts[0] is value
        return

    assert len(parts) == min(num_silos, num_clients)

    sizes_per_leaf = []
    for path, leaf in client_leaves:
        slices = [list(at(part, path)) for part in parts]
        # Every silo that is used gets at least one client.
        assert all(len(clients) >= 1 for clients in slices)
        # Every client is on exactly one silo ...
        silo_of = collections.defaultdict(list)
        for silo, clients in enumerate(slices):
            for client in clients:
                silo_of[client].append(silo)
        assert {client: len(silos) for client, silos in silo_of.items()} == {
            client: 1 for client in leaf.value
        }
        # ... and the silos hold consecutive runs of clients, in order.
        assert list(itertools.chain.from_iterable(slices)) == list(leaf.value)
        # The leaf's list/tuple type is kept.
        assert all(type(at(part, path)) is type(leaf.value) for part in parts)
        sizes_per_leaf.append([len(clients) for clients in slices])

    # The same split applies to every CLIENTS leaf, wherever it sits ...
    assert all(sizes == sizes_per_leaf[0] for sizes in sizes_per_leaf)
    # ... and is as even as possible, earlier silos taking the extra client.
    sizes = sizes_per_leaf[0]
    assert sizes == sorted(sizes, reverse=True)
    assert max(sizes) - min(sizes) <= 1

    # Everything else reaches every silo unchanged.
    for path, leaf in other_leaves:
        for part in parts:
            assert at(part, path) == leaf.value

    # Structs leading to CLIENTS leaves are rebuilt as `Struct`s with the
    # type's names, like TFF does.
    for path, branch in branches_above_clients(tree):
        for part in parts:
            rebuilt = at(part, path)
            assert isinstance(rebuilt, structure.Struct)
            assert structure.name_list_with_nones(rebuilt) == branch.names


@PROPERTY_SETTINGS
@given(arguments())
def test_split_over_silos_matches_tff_wherever_tff_is_right(argument):
    """Same contract as TFF's `_split_value_into_subrounds`: identical parts
    whenever TFF's bookkeeping advances (the argument ends in a per-client
    value) or there is nothing to get wrong; and TFF is wrong otherwise."""
    tree, num_clients, num_silos = argument
    type_spec, value = type_of(tree), value_of(tree)
    has_clients = any(leaf.kind == CLIENTS for _, leaf in leaves(tree))

    ours = split_over_silos(value, type_spec, num_silos)
    tffs = tff_mergeable._split_value_into_subrounds(value, type_spec, num_silos)

    tff_is_right = (
        not has_clients or num_clients == 0 or num_silos == 1 or tff_bookkeeping_advances(type_spec)
    )
    same = [canonical(part, type_spec) for part in ours] == [
        canonical(part, type_spec) for part in tffs
    ]
    assert same == tff_is_right


@pytest.mark.parametrize(
    ("num_clients", "num_silos", "expected_sizes"),
    [
        (10, 3, [4, 3, 3]),
        (11, 3, [4, 4, 3]),
        (3, 3, [1, 1, 1]),
        (2, 5, [1, 1]),  # more silos than clients: no empty silo
        (7, 1, [7]),
    ],
)
def test_split_over_silos_sizes(num_clients, num_silos, expected_sizes):
    type_spec = tff.StructType(
        [("x", LEAF_TYPES[CLIENTS]), ("y", LEAF_TYPES[SERVER])],
    )
    clients = list(range(num_clients))
    parts = split_over_silos([clients, 1.0], type_spec, num_silos)
    assert [len(part.x) for part in parts] == expected_sizes
    assert [part.y for part in parts] == [1.0] * len(expected_sizes)


def test_split_over_silos_top_level_clients_value():
    parts = split_over_silos([1, 2, 3, 4, 5], LEAF_TYPES[CLIENTS], 2)
    assert parts == [[1, 2, 3], [4, 5]]


def test_split_over_silos_rejects_no_silos():
    with pytest.raises(ValueError, match="at least one silo"):
        split_over_silos([1, 2], LEAF_TYPES[CLIENTS], 0)


def test_split_over_silos_rejects_non_type():
    with pytest.raises(TypeError, match=r"tff\.Type"):
        split_over_silos([1, 2], "int32@CLIENTS", 2)


def test_split_over_silos_rejects_disagreeing_client_counts():
    type_spec = tff.StructType([LEAF_TYPES[CLIENTS], LEAF_TYPES[CLIENTS]])
    with pytest.raises(ValueError, match="Conflicting cardinalities"):
        split_over_silos([[1, 2], [1, 2, 3]], type_spec, 2)


def test_partitioned_argument_holds_type_and_parts():
    type_spec = tff.StructType([("x", LEAF_TYPES[CLIENTS]), ("y", LEAF_TYPES[SERVER])])
    argument = PartitionedArgument([[1, 2, 3], 5.0], type_spec, 3)
    assert argument.type_signature is type_spec
    assert [(part.x, part.y) for part in argument.value()] == [([1], 5.0), ([2], 5.0), ([3], 5.0)]


# --------------------------------------------------------------------------
# TFF 0.87's bug, pinned.  These fail once TFF splits correctly: then
# flaap_mq.coordinator.partitioning can be retired in favour of TFF's class.


def test_tff_split_value_into_subrounds_bug_sends_first_client_to_every_silo():
    """TFF bug: with a (CLIENTS, SERVER) argument the bookkeeping is taken
    from the SERVER element, never advances, and all three silos get client 0;
    clients 1 and 2 are dropped."""
    type_spec = tff.StructType(
        [
            ("readings", tff.FederatedType(tff.SequenceType(np.float32), tff.CLIENTS)),
            ("limit", tff.FederatedType(np.float32, tff.SERVER)),
        ]
    )
    readings = [[0.0], [1.0, 1.0], [2.0, 2.0, 2.0]]
    value = structure.Struct([("readings", readings), ("limit", 10.0)])

    tff_parts = tff_mergeable._split_value_into_subrounds(value, type_spec, 3)

    assert [part.readings for part in tff_parts] == [readings[:1]] * 3, (
        "TFF's _split_value_into_subrounds no longer duplicates the first "
        "client: TFF may have fixed the bug documented in "
        "docs/tff-partitioning-bug.md"
    )
    # What it should be, and what split_over_silos gives:
    ours = split_over_silos(value, type_spec, 3)
    assert [part.readings for part in ours] == [readings[:1], readings[1:2], readings[2:]]


def test_tff_mergeable_value_bug_is_what_partitioned_argument_fixes():
    """Same bug through TFF's `MergeableCompExecutionContextValue`, the class
    `PartitionedArgument` replaces."""
    type_spec = tff.StructType([("x", LEAF_TYPES[CLIENTS]), ("y", LEAF_TYPES[SERVER])])
    value = [[1, 2, 3, 4], 5.0]
    tff_value = tff_mergeable.MergeableCompExecutionContextValue(value, type_spec, 2)
    assert [part.x for part in tff_value.value()] == [[1, 2], [1, 2]]
    ours = PartitionedArgument(value, type_spec, 2)
    assert [part.x for part in ours.value()] == [[1, 2], [3, 4]]
