"""The coordinator merges the silos' partial results in part order, whoever finishes first.

Floating-point sums are not associative: merged in finishing order (as TFF
0.87 does), the same round on the same inputs gave results differing in their
last bits from run to run. Fake contexts here, no TFF runtime: each silo
answers `up_to_merge` with the name of its part, and the merge context writes
down how it was asked to merge.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from flaap_mq.coordinator.partitioning import _invoke_merge_on_coordinator

COMP = types.SimpleNamespace(up_to_merge="up_to_merge", merge="merge")


class Silo:
    """Answers part `n` with "pn", `delay_s` late."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def invoke(self, comp: object, arg: object) -> str:
        assert comp == "up_to_merge"
        await asyncio.sleep(self.delay_s)
        return f"p{arg}"


class Merger:
    async def invoke(self, comp: object, arg: object) -> str:
        assert comp == "merge"
        left, right = arg  # a Struct of the running merge and the next part
        return f"({left}+{right})"


def merge(parts: list[int], delays_s: list[float]) -> tuple[object, object, list[Silo]]:
    silos = [Silo(delay) for delay in delays_s]
    merged, last = asyncio.run(_invoke_merge_on_coordinator(COMP, parts, silos, Merger()))
    return merged, last, silos


@pytest.mark.parametrize(
    "delays_s",
    [[0.0, 0.05, 0.1], [0.1, 0.05, 0.0], [0.05, 0.1, 0.0]],
    ids=["in-order", "reversed", "mixed"],
)
def test_partial_results_are_merged_in_part_order(delays_s: list[float]) -> None:
    merged, last, silos = merge([0, 1, 2], delays_s)
    assert merged == "((p0+p1)+p2)"
    # As in TFF: the silo that finished last is returned.
    assert last is silos[delays_s.index(max(delays_s))]


def test_more_parts_than_silos_are_merged_in_part_order() -> None:
    # Silo 1 is fast and takes the extra parts, finishing them before part 0.
    merged, _, _ = merge([0, 1, 2, 3, 4], [0.2, 0.01])
    assert merged == "((((p0+p1)+p2)+p3)+p4)"


def test_a_single_part_is_not_merged() -> None:
    merged, _, _ = merge([0], [0.0])
    assert merged == "p0"
