"""normalise_vectors: unit rows, the caller's array untouched, and no more memory than one float32 copy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from index.errors import IndexStoreError
from index.snapshot import normalise_vectors


def _expected(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rows_become_unit_vectors_and_the_input_is_left_as_it_was(dtype: type) -> None:
    x = (np.random.default_rng(0).standard_normal((10000, 8)) * 3).astype(dtype)  # more rows than one norm block
    x[5] = 0.0
    before = x.copy()
    out = normalise_vectors(x, 8)
    np.testing.assert_array_equal(x, before)
    assert out.dtype == np.float32 and out.flags.c_contiguous and not np.shares_memory(out, x)
    np.testing.assert_array_equal(out, _expected(before))  # bit for bit what the unblocked formula gives
    assert (out[5] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(np.delete(out, 5, axis=0), axis=1), 1.0, atol=1e-5)


def test_lists_single_vectors_and_bad_input() -> None:
    rows = [np.array([3.0, 4.0]), np.array([0.0, 2.0])]
    np.testing.assert_allclose(normalise_vectors(rows, 2), [[0.6, 0.8], [0.0, 1.0]])
    np.testing.assert_allclose(normalise_vectors(np.array([3.0, 4.0], np.float32), 2), [[0.6, 0.8]])
    with pytest.raises(IndexStoreError, match="shape"):
        normalise_vectors(np.ones((2, 3)), 2)
    with pytest.raises(IndexStoreError, match="NaN or infinite"):
        normalise_vectors(np.array([[1.0, np.inf]]), 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_at_most_one_float32_copy_is_allocated(dtype: type) -> None:
    x = np.random.default_rng(1).standard_normal((20000, 512)).astype(dtype)
    out_bytes = 20000 * 512 * 4
    tracemalloc.start()
    try:
        out = normalise_vectors(x, 512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == out_bytes
    # the result, the norms and the finiteness mask (a byte a component); a squared copy or a second
    # float32 array for the quotient would each add another out_bytes
    assert peak <= 1.3 * out_bytes, peak / out_bytes
