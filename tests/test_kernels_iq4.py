"""IQ4_NL / IQ4_XS checks the type table (test_kernels_table.py) does not make: the branch-free nearest-level
search (thresholds between neighbouring levels) against best_index_int8's binary search transcribed, and the
fused kernels' select tree against the level table on every byte."""
import numpy as np
from numba import njit

from qtool.kernels import iq4
from qtool.kernels.iq_grids import kvalues_iq4nl


@njit(cache=False)
def _searches(xs):
    fast = np.empty(xs.size, np.int64)
    ref = np.empty(xs.size, np.int64)
    level = np.empty(xs.size, np.float32)
    for i in range(xs.size):
        fast[i] = iq4.best_index(xs[i])
        ref[i] = iq4.best_index_ref(xs[i])
        level[i] = iq4.nearest_level(xs[i])
    return fast, ref, level


@njit(cache=False)
def _tree(bytes_):
    lo = np.empty(bytes_.size, np.int64)
    hi = np.empty(bytes_.size, np.int64)
    for i in range(bytes_.size):
        lo[i] = iq4._level(bytes_[i])
        hi[i] = iq4._level(bytes_[i] >> 4)
    return lo, hi


def test_nearest_level_equals_binary_search():
    """Random values over the levels' range and far beyond, every threshold and level with its float32
    neighbours, ±0, subnormals, ±inf and NaN (which the binary search sends to the last level)."""
    rng = np.random.default_rng(0)
    t, lv = iq4.THRESHOLDS, iq4.LEVELS
    edges = np.concatenate([t, lv])
    xs = np.concatenate([
        rng.uniform(-140, 140, 100_000), rng.standard_normal(10_000) * 1e4, rng.standard_normal(1000) * 1e-40,
        edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf)),
        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38],
    ]).astype(np.float32)
    with np.errstate(all="ignore"):
        fast, ref, level = _searches(xs)
    bad = np.flatnonzero(fast != ref)
    assert bad.size == 0, f"best_index differs at {xs[bad[:10]]}"
    np.testing.assert_array_equal(level, lv[ref])
    assert ref[np.isnan(xs)].tolist() == [15]
    assert np.all(np.diff(t) > 0) and np.all((t > lv[:-1]) & (t <= lv[1:]))


def test_select_tree_equals_level_table():
    b = np.arange(256, dtype=np.uint8)
    lo, hi = _tree(b)
    np.testing.assert_array_equal(lo, kvalues_iq4nl[b & 15])
    np.testing.assert_array_equal(hi, kvalues_iq4nl[b >> 4])
