"""Q2_K, Q4_K, Q5_K (the K-quants built on make_qkx2_quants): bytes equal to llama.cpp's own quantizer, dequantize
equal to gguf-py, round-trip error within each type's usual bound.

llama.cpp is the oracle for quantization (ggml_quantize_chunk → quantize_row_q*_K_ref without an importance
matrix); those tests skip without the reference extra. The rest runs always: our vectorised make_qkx2_quants
against a plain transcription of ggml's, nearest_int against ggml's bit trick done in numpy, and dequantize
against gguf-py.
"""
import gguf
import numpy as np
import pytest
from llama_oracle import ggml_quantize, need_llama_cpp

from qtool import kernels
from qtool.formats.constants import TYPE_INFO, GGMLType
from qtool.kernels import kquant_common as kc

TYPES = [GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q5_K]
IDS = [t.name for t in TYPES]

# relative RMSE ||x - deq(q(x))|| / ||x|| on standard-normal rows (measured: 0.297, 0.071, 0.036 on 16x512)
RMSE_BOUND = {GGMLType.Q2_K: 0.32, GGMLType.Q4_K: 0.08, GGMLType.Q5_K: 0.04}


def random_rows(seed: int, scale: float, dist: str, shape=(16, 512)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif dist == "laplace":  # heavy tails, like real weights
        x = rng.laplace(size=shape)
    elif dist == "positive":  # min > 0: C clamps the min to 0
        x = rng.uniform(0.5, 2.0, shape)
    elif dist == "negative":
        x = -rng.exponential(size=shape)
    elif dist == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    else:
        raise ValueError(dist)
    return (x * scale).astype(np.float32)


def adversarial_rows() -> np.ndarray:
    """Rows of 512 (two super-blocks) that stress every branch of the reference quantizers."""
    rng = np.random.default_rng(7)
    n = 512
    rows = []

    def add(r):
        rows.append(np.asarray(r, dtype=np.float32))

    add(np.zeros(n))  # all zeros: max == min in every sub-block
    add(np.full(n, -0.0))  # all -0.0
    add(np.where(np.arange(n) % 2 == 0, 0.0, -0.0))  # mixed ±0
    add(np.full(n, 0.7))  # constant positive: min clamps to 0, max != min
    add(np.full(n, -3.0))  # constant negative: max == min
    r = rng.standard_normal(n) * 0.01
    r[37] = 1e6  # one huge outlier
    add(r)
    r = rng.standard_normal(n) * 0.01
    r[300] = -1e6  # one huge negative outlier
    add(r)
    add(rng.choice([-1.0, 1.0], n) * rng.integers(1, 100, n) * 1e-45)  # subnormals: 1/range overflows to inf
    add(rng.standard_normal(n) * 1e-39)  # subnormal and tiny normal values
    add(rng.standard_normal(n) * 1e-30)  # tiny: fp16 d, dmin underflow to 0
    for scale in (1e-38, 3e-38, 1e-37):  # ranges where nmax/range overflows only for the later refits
        add(rng.standard_normal(n) * scale)
    add(rng.standard_normal(n) * 1e-6)  # fp16 super-scales in the subnormal range
    add(rng.standard_normal(n) * 1e30)  # huge: fp16 d overflows to inf, squares overflow
    add(rng.choice([-3e38, 3e38], n))  # max - min overflows to inf
    add(rng.uniform(2e38, 3.4e38, n))  # near FLT_MAX, all positive
    add(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-20, 20, n))  # very wide dynamic range
    add(np.round(rng.standard_normal(n) * 4) / 2)  # exact halves: rounding ties
    add(rng.integers(0, 4, n))  # integer codes 0..3: exact fits
    add(np.tile(np.arange(32) - 16.0, n // 32))  # ramps
    add(np.where(np.arange(n) % 2 == 0, 1.0, -1.0))  # alternating ±1
    r = np.zeros(n)
    r[::16] = rng.standard_normal(n // 16)  # one non-zero per Q2_K sub-block
    add(r)
    r = np.full(n, 5.0)
    r[::32] = -5.0  # constant but one element per sub-block
    add(r)
    r = rng.standard_normal(n)
    r[:256] = 0  # one super-block all zero, the other normal
    add(r)
    add(np.full(n, 65504.0))  # fp16 max
    add(rng.standard_normal(n) * 65504 * 63)  # scales around fp16 overflow
    r = rng.standard_normal(n) * 1e-3
    r[::32] += 1e-38  # mixed tiny and normal
    add(r)
    return np.stack(rows)


# ---- llama.cpp oracle -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
@pytest.mark.parametrize("dist", ["normal", "uniform", "laplace", "positive", "negative", "sparse"])
def test_quantize_equals_llama_cpp_random(ggml_type, dist):
    need_llama_cpp()
    for seed, scale in enumerate([1e-3, 1.0, 300.0]):
        x = random_rows(seed, scale, dist)
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x), ggml_quantize(x, ggml_type),
                                      err_msg=f"{ggml_type.name} {dist} scale {scale}")


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_quantize_equals_llama_cpp_adversarial(ggml_type):
    need_llama_cpp()
    x = adversarial_rows()
    ours = kernels.quantize(ggml_type, x)
    ref = ggml_quantize(x, ggml_type)
    bad = [i for i in range(len(x)) if not np.array_equal(ours[i], ref[i])]
    assert not bad, f"{ggml_type.name}: adversarial rows {bad} differ from llama.cpp"


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_quantize_equals_llama_cpp_odd_shapes(ggml_type):
    """Row counts and lengths that leave partial chunks of super-blocks (chunks span rows)."""
    need_llama_cpp()
    for shape in [(1, 256), (3, 768), (5, 2304), (2, 4096)]:
        x = random_rows(11, 1.0, "laplace", shape)
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x), ggml_quantize(x, ggml_type),
                                      err_msg=f"{ggml_type.name} {shape}")


# ---- always ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_row_layout_and_chunking(ggml_type):
    """Shape and size per TYPE_INFO; quantizing rows together equals quantizing them one at a time."""
    x = random_rows(3, 1.0, "normal", (7, 768))
    q = kernels.quantize(ggml_type, x)
    info = TYPE_INFO[ggml_type]
    assert q.shape == (7, 768 // info.block_size * info.type_size) and q.dtype == np.uint8
    for r in range(len(x)):
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x[r:r + 1]), q[r:r + 1])


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_dequantize_equals_gguf_py(ggml_type):
    x = np.concatenate([random_rows(5, 1.0, "laplace"), adversarial_rows()])
    q = kernels.quantize(ggml_type, x)
    rng = np.random.default_rng(9)  # plus random blocks (finite fp16 scales): every code and scale pattern
    raw = rng.integers(0, 256, size=(8, q.shape[1]), dtype=np.uint8)
    block = TYPE_INFO[ggml_type].type_size
    dpos = [80, 82] if ggml_type == GGMLType.Q2_K else [0, 2]
    for b in range(q.shape[1] // block):
        for p in dpos:
            raw[:, b * block + p:b * block + p + 2] = np.float16(rng.uniform(-2, 2, (8, 1))).view(np.uint8)
    q = np.concatenate([q, raw])
    ours = kernels.dequantize(ggml_type, q, x.shape[1])
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType(int(ggml_type)))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_round_trip_error(ggml_type):
    x = random_rows(1, 1.0, "normal")
    y = kernels.dequantize(ggml_type, kernels.quantize(ggml_type, x), x.shape[1])
    rel = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))
    assert rel < RMSE_BOUND[ggml_type], f"{ggml_type.name}: relative RMSE {rel:.4f}"
    # and the scales adapt: the same relative error at any magnitude
    y2 = kernels.dequantize(ggml_type, kernels.quantize(ggml_type, x * 1e-3), x.shape[1])
    assert float(np.sqrt(np.mean((y2 - x * 1e-3) ** 2) / np.mean((x * 1e-3) ** 2))) < RMSE_BOUND[ggml_type]


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
