"""converter.graph.swapped_last_axes: the tiled copy of a transposed stack equals numpy's own."""

import numpy as np
import pytest

from moefuse.converter.graph import swapped_last_axes


@pytest.mark.parametrize("shape", [(3, 5), (2, 1000, 1100), (1030, 1200), (2, 3, 700, 900), (4, 1, 300000),
                                   (2, 300000, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_equals_the_swapped_view(shape, dtype):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    b = swapped_last_axes(a)
    assert b.flags.c_contiguous and b.dtype == a.dtype
    assert np.array_equal(b, np.swapaxes(a, -1, -2))
