"""Arrays of every dtype `value_wire` writes from memory, for its tests and `value_read`'s."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from flaap_mq.coordinator import value_wire

BIG = value_wire.MIN_DIRECT_BYTES

# Every dtype written from memory (and read in place); others are TFF's.
DTYPES = sorted((d.type for d in value_wire.DIRECT_DTYPES), key=lambda t: np.dtype(t).str)


def random_array(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes as an array of `dtype` and `shape` (any bit pattern, NaNs included)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype is np.bool_:
        return (raw[: int(np.prod(shape))] % 2).astype(np.bool_).reshape(shape)
    return raw.view(dtype).reshape(shape)


@st.composite
def any_array(draw: st.DrawFn) -> np.ndarray:
    """An array of any such dtype, rank 1 to 4, from a few bytes to 3x `BIG`."""
    dtype = draw(st.sampled_from(DTYPES))
    dims = draw(st.lists(st.integers(1, 9), min_size=0, max_size=3))
    length = draw(st.integers(0, 3 * BIG))
    last = max(1, length // np.dtype(dtype).itemsize // max(1, int(np.prod(dims))))
    return random_array(dtype, (*dims, last), draw(st.integers(0, 2**32 - 1)))
