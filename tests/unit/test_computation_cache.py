"""Each computation is sent to an executor once (pure logic)."""

from __future__ import annotations

import asyncio

import numpy as np
import tensorflow_federated as tff

from flaap_mq.coordinator.computation_cache import ComputationCache


@tff.tensorflow.computation(np.float32)
def _double(x):
    return x * 2.0


@tff.tensorflow.computation(np.float32)
def _triple(x):
    return x * 3.0


class _Creator:
    def __init__(self) -> None:
        self.created: list[object] = []

    def __call__(self, value: object):
        async def create() -> object:
            made = object()
            self.created.append(value)
            return made

        return create


def _value_for(cache: ComputationCache, creator: _Creator, value: object) -> object:
    return asyncio.run(cache.value_for(value, creator(value)))


def test_the_same_computation_is_created_once():
    cache, creator = ComputationCache(), _Creator()
    first = _value_for(cache, creator, _double)
    assert _value_for(cache, creator, _double) is first
    assert creator.created == [_double]
    assert cache.hits == 1


def test_another_computation_is_created_anew():
    cache, creator = ComputationCache(), _Creator()
    assert _value_for(cache, creator, _double) is not _value_for(cache, creator, _triple)
    assert creator.created == [_double, _triple]


def test_plain_values_are_never_cached():
    cache, creator = ComputationCache(), _Creator()
    value = np.float32(1.0)
    _value_for(cache, creator, value)
    _value_for(cache, creator, value)
    assert creator.created == [value, value]
    assert len(cache) == 0


def test_the_least_recently_used_computation_is_evicted():
    cache, creator = ComputationCache(max_entries=1), _Creator()
    _value_for(cache, creator, _double)
    _value_for(cache, creator, _triple)
    _value_for(cache, creator, _double)
    assert creator.created == [_double, _triple, _double]
    assert len(cache) == 1


def test_clear_forgets_everything():
    cache, creator = ComputationCache(), _Creator()
    _value_for(cache, creator, _double)
    cache.clear()
    _value_for(cache, creator, _double)
    assert creator.created == [_double, _double]
