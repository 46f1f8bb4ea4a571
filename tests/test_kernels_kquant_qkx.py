"""Q2_K, Q4_K, Q5_K (the K-quants built on make_qkx2_quants), what is particular to them: our vectorised
make_qkx2_quants against a plain transcription of ggml's, nearest_int against ggml's bit trick done in numpy.
The checks every type gets (llama.cpp's bytes, gguf-py's dequantize, error bounds) are in test_kernels_table.py.
"""
import numpy as np
import pytest
from rows import adversarial_rows, random_rows

from qtool.kernels import kquant_common as kc


def test_nearest_int_matches_ggml_bit_trick():
    """ggml_nearest_int(f) == (bits of float32(f + 12582912) & 0x7fffff) - 0x400000, also past ±4194303."""
    from numba import njit

    @njit(cache=False)
    def ours(v):
        out = np.empty(v.size, dtype=np.int64)
        for i in range(v.size):
            out[i] = kc.ggml_nearest_int(v[i])
        return out

    rng = np.random.default_rng(2)
    v = np.concatenate([
        rng.uniform(-40, 40, 2000), np.arange(-20, 20, 0.5), rng.uniform(-5e6, 5e6, 1000),
        10.0 ** rng.uniform(-45, 38, 1000) * rng.choice([-1, 1], 1000), [4194303.0, 4194304.5, -4194304.5, 1.2e7,
                                                                         -1.2582912e7, -1.2582913e7, 3e38, -3e38,
                                                                         np.inf, -np.inf, 0.0, -0.0, 1e-45]
    ]).astype(np.float32)
    with np.errstate(over="ignore"):
        s = v + np.float32(12582912.0)
    expected = (s.view(np.int32).astype(np.int64) & 0x7FFFFF) - 0x400000
    np.testing.assert_array_equal(ours(v), expected)


@pytest.mark.parametrize("n, nmax, rmin, nstep, use_mad, av", [
    (16, 3, -0.5, 15, True, False),  # Q2_K
    (32, 15, -1.0, 20, False, True),  # Q4_K
    (32, 31, -0.5, 15, False, True),  # Q5_K
])
def test_lanes_equal_plain_make_qkx2_quants(n, nmax, rmin, nstep, use_mad, av):
    """The vectorised search (all sub-blocks of a chunk at once) equals a plain transcription of ggml's."""
    nsub = 256 // n
    x = np.concatenate([random_rows(4, 1.0, "laplace", (8, 256)), random_rows(5, 1.0, "positive", (2, 256)),
                        adversarial_rows()[:, :256]])
    nblk = len(x)
    L = np.empty(nblk * 256, dtype=np.uint8)
    scales = np.empty(nblk * nsub, dtype=np.float32)
    mins = np.empty(nblk * nsub, dtype=np.float32)
    work = np.empty((4, n, nblk * nsub), dtype=np.float32)
    st = np.empty((kc.QKX2_STATE, nblk * nsub), dtype=np.float32)
    kc.qkx2_search(x, 0, nblk, nsub, n, av, nmax, np.float32(rmin), np.float32(0.1), nstep, use_mad, L, scales,
                   mins, work, st)
    for k in range(nblk):
        for j in range(nsub):
            xs = x[k, n * j:n * j + n].copy()
            with np.errstate(all="ignore"):
                if av:
                    s2 = np.float32(0)
                    for v in xs:
                        s2 = np.float32(s2 + v * v)
                    w = (np.sqrt(np.float32(s2 / np.float32(n))) + np.abs(xs)).astype(np.float32)
                else:
                    w = np.abs(xs)
            Lr = np.empty(n, dtype=np.uint8)
            sc, mn = kc.make_qkx2_quants_ref(xs, n, nmax, w, Lr, np.float32(rmin), np.float32(0.1), nstep,
                                             use_mad)
            got = (scales[k * nsub + j], mins[k * nsub + j])
            assert np.array_equal(np.float32([sc, mn]), np.float32(got), equal_nan=True), (k, j, (sc, mn), got)
            np.testing.assert_array_equal(L[k * 256 + n * j:k * 256 + n * j + n], Lr, err_msg=f"{k} {j}")
