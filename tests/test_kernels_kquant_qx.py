"""Q3_K, Q6_K (the K-quants built on make_q3_quants / make_qx_quants) and Q8_K (the K-quant activation type):
bytes equal to llama.cpp's own quantizers, dequantize equal to gguf-py (Q3_K, Q6_K) and to ggml (Q8_K), round-trip
error within each type's usual bound.

llama.cpp is the oracle for quantization: ggml_quantize_chunk (→ quantize_row_q3_K_ref / _q6_K_ref without an
importance matrix) and, for Q8_K (which ggml_quantize_chunk does not take), quantize_row_q8_K_ref called directly
from libggml-base; those tests skip without the reference extra. The rest runs always: the vectorised kernels
against our plain transcriptions of ggml's code (`quantize_ref`), dequantize against gguf-py.
"""
import ctypes

import gguf
import numpy as np
import pytest
from llama_oracle import ggml_quantize, need_llama_cpp

from qtool import kernels
from qtool.formats.constants import QK_K, TYPE_INFO, GGMLType
from qtool.kernels import q3_k, q6_k, q8_k

TYPES = [GGMLType.Q3_K, GGMLType.Q6_K, GGMLType.Q8_K]
IDS = [t.name for t in TYPES]
MODULES = {GGMLType.Q3_K: q3_k, GGMLType.Q6_K: q6_k, GGMLType.Q8_K: q8_k}

# relative RMSE ||x - deq(q(x))|| / ||x|| on standard-normal rows 16x512 (measured: 0.151, 0.0176, 0.0069)
RMSE_BOUND = {GGMLType.Q3_K: 0.17, GGMLType.Q6_K: 0.021, GGMLType.Q8_K: 0.0085}


# ---- oracles --------------------------------------------------------------------------------------------------

def llama_quantize(x: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """llama.cpp's bytes for float32 rows x: ggml_quantize_chunk, or quantize_row_q8_K_ref for Q8_K."""
    need_llama_cpp()
    if ggml_type != GGMLType.Q8_K:
        return ggml_quantize(x, ggml_type)
    import llama_oracle
    lib = llama_oracle._libggml()
    fn = lib.quantize_row_q8_K_ref
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float32)
    # zeroed: for an all-zero super-block C leaves bsums untouched (qtool writes zeros there)
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_INFO[GGMLType.Q8_K].type_size), dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def llama_dequantize_q8_k(q: np.ndarray, n_cols: int) -> np.ndarray:
    need_llama_cpp()
    import llama_oracle
    lib = llama_oracle._libggml()
    fn = lib.dequantize_row_q8_K
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    q = np.ascontiguousarray(q)
    out = np.empty((q.shape[0], n_cols), dtype=np.float32)
    fn(q.ctypes.data, out.ctypes.data, out.size)
    return out


def quantize_ref(ggml_type: GGMLType, x: np.ndarray) -> np.ndarray:
    """Our plain transcription of ggml's quantizer (no lanes, no fast paths)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], kernels.row_bytes(ggml_type, x.shape[1])), dtype=np.uint8)
    MODULES[ggml_type].quantize_ref(x, out)
    return out


# ---- inputs ---------------------------------------------------------------------------------------------------

def random_rows(seed: int, scale: float, dist: str, shape=(16, 512)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif dist == "laplace":  # heavy tails, like real weights
        x = rng.laplace(size=shape)
    elif dist == "positive":
        x = rng.uniform(0.5, 2.0, shape)
    elif dist == "negative":
        x = -rng.exponential(size=shape)
    elif dist == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    elif dist == "outliers":  # a few sub-blocks hold values far above the rest: small or zero 6-bit scales
        x = rng.standard_normal(shape) * np.where(rng.random((shape[0], shape[1] // 16, 1)) < 0.05, 100.0, 1.0
                                                  ).repeat(16, axis=2).reshape(shape)
    else:
        raise ValueError(dist)
    return (x * scale).astype(np.float32)


def adversarial_rows(finite: bool = True) -> np.ndarray:
    """Rows of 512 (two super-blocks) that stress every branch of the reference quantizers."""
    rng = np.random.default_rng(7)
    n = 512
    rows = []

    def add(r):
        rows.append(np.asarray(r, dtype=np.float32))

    add(np.zeros(n))  # all zeros
    add(np.full(n, -0.0))  # all -0.0
    add(np.where(np.arange(n) % 2 == 0, 0.0, -0.0))  # mixed ±0
    add(np.full(n, 0.7))  # constant positive
    add(np.full(n, -3.0))  # constant negative
    r = rng.standard_normal(n) * 0.01
    r[37] = 1e6  # one huge outlier
    add(r)
    r = rng.standard_normal(n) * 0.01
    r[300] = -1e6  # one huge negative outlier
    add(r)
    add(rng.choice([-1.0, 1.0], n) * rng.integers(1, 100, n) * 1e-45)  # subnormals only (below GROUP_MAX_EPS)
    add(rng.standard_normal(n) * 1e-39)  # subnormal and tiny normal values
    add(rng.standard_normal(n) * 1e-15)  # around GROUP_MAX_EPS
    add(rng.standard_normal(n) * 1e-30)  # tiny: fp16 super-scales underflow to 0
    for scale in (1e-38, 3e-38, 1e-37, 4e-37):  # Q8_K: -127/max overflows to inf
        add(rng.standard_normal(n) * scale)
    add(rng.standard_normal(n) * 1e-6)  # fp16 super-scales in the subnormal range
    add(rng.standard_normal(n) * 1e12)  # x^3 (the rmse weights times x) overflows
    add(rng.standard_normal(n) * 1e30)  # huge: fp16 d overflows to inf, squares overflow
    add(rng.choice([-3e38, 3e38], n))  # near FLT_MAX
    add(rng.uniform(2e38, 3.4e38, n))  # near FLT_MAX, all positive
    add(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-20, 20, n))  # very wide dynamic range
    add(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-40, 38, n))  # the whole float32 range
    add(np.round(rng.standard_normal(n) * 4) / 2)  # exact halves: rounding ties
    add(rng.integers(-4, 4, n))  # integer codes: exact fits
    add(rng.integers(-32, 32, n))
    add(np.tile(np.arange(16) - 8.0, n // 16))  # ramps
    add(np.where(np.arange(n) % 2 == 0, 1.0, -1.0))  # alternating ±1
    r = np.zeros(n)
    r[::16] = rng.standard_normal(n // 16)  # one non-zero per sub-block
    add(r)
    r = np.zeros(n)
    r[5] = 1.0  # a single non-zero weight
    add(r)
    r = np.full(n, 5.0)
    r[::16] = -5.0  # constant but one element per sub-block
    add(r)
    r = rng.standard_normal(n)
    r[:256] = 0  # one super-block all zero, the other normal
    add(r)
    r = rng.standard_normal(n)
    r[16:32] *= 1e-4  # one sub-block far below the others: its 6-bit / int8 scale rounds to 0
    r[256 + 48:256 + 64] *= 1e-9
    add(r)
    add(np.full(n, 65504.0))  # fp16 max
    add(rng.standard_normal(n) * 65504 * 32)  # super-scales around fp16 overflow
    r = rng.standard_normal(n) * 1e-3
    r[::16] += 1e-38  # mixed tiny and normal
    add(r)
    r = rng.standard_normal(n)
    r[3] = -9.0  # ties for the largest magnitude: the first one wins
    r[7] = 9.0
    add(r)
    if not finite:
        for bad in (np.inf, -np.inf, np.nan):
            r = rng.standard_normal(n)
            r[100] = bad  # one non-finite weight in the first super-block only
            add(r)
        add(np.full(n, np.inf))
        add(np.full(n, np.nan))
    return np.stack(rows)


# ---- llama.cpp oracle -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
@pytest.mark.parametrize("dist", ["normal", "uniform", "laplace", "positive", "negative", "sparse", "outliers"])
def test_quantize_equals_llama_cpp_random(ggml_type, dist):
    need_llama_cpp()
    for seed, scale in enumerate([1e-3, 1.0, 300.0]):
        x = random_rows(seed, scale, dist)
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x), llama_quantize(x, ggml_type),
                                      err_msg=f"{ggml_type.name} {dist} scale {scale}")


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_quantize_equals_llama_cpp_adversarial(ggml_type):
    need_llama_cpp()
    x = adversarial_rows()
    with np.errstate(all="ignore"):
        ref = llama_quantize(x, ggml_type)
    got = kernels.quantize(ggml_type, x)
    for i in range(x.shape[0]):
        np.testing.assert_array_equal(got[i], ref[i], err_msg=f"{ggml_type.name} adversarial row {i}")


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_quantize_equals_llama_cpp_non_finite(ggml_type):
    """inf and NaN weights take the plain transcription; their blocks still come out as llama.cpp writes them."""
    need_llama_cpp()
    x = adversarial_rows(finite=False)[-5:]
    with np.errstate(all="ignore"):
        ref = llama_quantize(x, ggml_type)
    np.testing.assert_array_equal(kernels.quantize(ggml_type, x), ref)


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (5, 768), (7, 1280), (2, 4096)])
def test_quantize_equals_llama_cpp_shapes(ggml_type, shape):
    """Super-blocks are processed in groups counted row after row: partial groups, groups spanning rows."""
    need_llama_cpp()
    x = random_rows(sum(shape), 2.0, "laplace", shape)
    np.testing.assert_array_equal(kernels.quantize(ggml_type, x), llama_quantize(x, ggml_type))


def test_q8_k_cpu_quantizer_is_the_reference():
    """ggml-cpu's quantize_row_q8_K (what the runner's dot products use) equals quantize_row_q8_K_ref on x86."""
    llama_cpp = need_llama_cpp()
    import pathlib
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(libdir.glob("libggml-cpu.*"))
    if not candidates:
        pytest.skip("no libggml-cpu in the reference extra")
    lib = ctypes.CDLL(str(candidates[0]))
    fn = lib.quantize_row_q8_K
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = random_rows(3, 1.0, "laplace", (8, 1024))
    out = np.zeros((8, 4 * 292), dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    np.testing.assert_array_equal(kernels.quantize(GGMLType.Q8_K, x), out)


# ---- always: against our plain transcriptions and gguf-py --------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_fast_paths_equal_plain_transcription(ggml_type):
    rows = [adversarial_rows(finite=False)]
    for seed, dist in enumerate(["normal", "laplace", "sparse", "outliers"]):
        rows.append(random_rows(seed, 10.0 ** (seed - 2), dist, (8, 512)))
    x = np.concatenate(rows)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x), quantize_ref(ggml_type, x))


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_row_layout(ggml_type):
    """Each row is its own run of blocks; quantizing rows one by one gives the same bytes."""
    x = random_rows(11, 1.0, "normal", (9, 768))
    q = kernels.quantize(ggml_type, x)
    assert q.shape == (9, 3 * TYPE_INFO[ggml_type].type_size)
    for i in range(9):
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x[i:i + 1]), q[i:i + 1])


@pytest.mark.parametrize("ggml_type", [GGMLType.Q3_K, GGMLType.Q6_K], ids=["Q3_K", "Q6_K"])
def test_dequantize_equals_gguf_py(ggml_type):
    x = np.concatenate([random_rows(4, 1.0, "laplace"), adversarial_rows()])
    q = kernels.quantize(ggml_type, x)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(kernels.dequantize(ggml_type, q, x.shape[1]),
                                      gguf.quants.dequantize(q, gguf.GGMLQuantizationType(int(ggml_type))))
    # arbitrary block contents (every code, scale and bit pattern), with finite fp16 super-scales
    rng = np.random.default_rng(9)
    size = TYPE_INFO[ggml_type].type_size
    blocks = rng.integers(0, 256, (64, size), dtype=np.uint8)
    blocks[:, size - 2:] = (rng.standard_normal((64, 1)) * 0.01).astype(np.float16).view(np.uint8)
    data = blocks.reshape(8, 8 * size)
    np.testing.assert_array_equal(kernels.dequantize(ggml_type, data, 8 * QK_K),
                                  gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(ggml_type))))


def test_q8_k_dequantize():
    """x = d * q (ggml's dequantize_row_q8_K; gguf-py has no Q8_K): against numpy and, if present, ggml."""
    x = random_rows(5, 3.0, "laplace")
    q = kernels.quantize(GGMLType.Q8_K, x)
    blocks = q.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    qs = blocks[:, 4:260].view(np.int8).astype(np.float32)
    expect = (d * qs).reshape(x.shape)
    np.testing.assert_array_equal(kernels.dequantize(GGMLType.Q8_K, q, x.shape[1]), expect)
    bsums = blocks[:, 260:].copy().view(np.int16)
    np.testing.assert_array_equal(bsums, blocks[:, 4:260].view(np.int8).reshape(-1, 16, 16).sum(axis=2))
    try:
        need_llama_cpp()
    except pytest.skip.Exception:
        return
    np.testing.assert_array_equal(kernels.dequantize(GGMLType.Q8_K, q, x.shape[1]),
                                  llama_dequantize_q8_k(q, x.shape[1]))


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_round_trip_error(ggml_type):
    x = random_rows(5, 1.0, "normal")
    dq = kernels.dequantize(ggml_type, kernels.quantize(ggml_type, x), x.shape[1])
    rel = np.sqrt(np.mean((x - dq) ** 2) / np.mean(x ** 2))
    assert rel < RMSE_BOUND[ggml_type], f"{ggml_type.name} relative RMSE {rel:.4f}"
    if ggml_type == GGMLType.Q8_K:  # round to nearest on a step of max/127: at most half a step per weight
        step = np.abs(x.reshape(-1, QK_K)).max(axis=1, keepdims=True) / 127
        assert (np.abs(dq - x).reshape(-1, QK_K) <= step * (0.5 + 1e-5)).all()
