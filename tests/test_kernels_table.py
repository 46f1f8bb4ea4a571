"""Every quantizable type of the traits table (kernels/traits.py), the same checks for each (llama.cpp's
test-quantize-fns.cpp loops over type_traits the same way): bytes equal to llama.cpp's quantizer
(ggml_quantize_chunk without an importance matrix; quantize_row_q8_K_ref for Q8_K, which ggml_quantize_chunk does
not take), dequantize equal to gguf-py's (ggml's for Q8_K, which gguf-py lacks), a round-trip error bound, and
the table's own consistency; with an importance matrix (every type whose row names a weighted quantizer),
bytes equal to ggml_quantize_chunk's with that imatrix on random, real (stories3M's llama-imatrix output on its
own weights), adversarial and non-finite rows under every kind of importance vector (zeros included). The fused
decode kernels against the dequantized product are in test_runner_kernels.py. Inputs come from rows.py.

Family-specific checks stay beside their family: test_kernels_legacy.py (32-weight blocks, gguf-py's quantizer),
test_kernels_kquant_qkx.py (make_qkx2_quants), test_kernels_kquant_qx.py (fast paths against plain
transcriptions), test_kernels_q8_0.py (fp16 encoding).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from llama_oracle import ggml_quantize, need_llama_cpp
from rows import (DISTS, IMPORTANCE_KINDS, adversarial_rows, imatrix_entries, importance, random_rows,
                  safetensors_rows)

from qtool import kernels
from qtool.formats.constants import QK_K, TYPE_INFO, GGMLType
from qtool.kernels import matmul as mm
from qtool.kernels.traits import TRAITS

TYPES = kernels.quantizable_types()
IDS = [t.name for t in TYPES]
# the types llama.cpp quantizes without an importance matrix (the others refuse, and so does qtool)
PLAIN = tuple(t for t in TYPES if not TRAITS[t].needs_imatrix)
PIDS = [t.name for t in PLAIN]
# (type, with importance weights): every type plain, and every type that takes weights with them
CASES = [pytest.param(t, False, id=t.name) for t in PLAIN] + \
    [pytest.param(t, True, id=f"{t.name}-imatrix") for t in TYPES if TRAITS[t].weighted is not None]

# relative RMSE ||x - deq(q(x))|| / ||x|| on standard-normal rows 16x512 (measured: Q8_0 0.0054 … Q3_K 0.151)
RMSE_BOUND = {
    GGMLType.Q8_0: 0.0065, GGMLType.Q4_0: 0.10, GGMLType.Q4_1: 0.095, GGMLType.Q5_0: 0.052, GGMLType.Q5_1: 0.046,
    GGMLType.Q2_K: 0.32, GGMLType.Q3_K: 0.17, GGMLType.Q4_K: 0.08, GGMLType.Q5_K: 0.04, GGMLType.Q6_K: 0.021,
    GGMLType.Q8_K: 0.0085,
    GGMLType.IQ3_XXS: 0.25, GGMLType.IQ3_S: 0.194,  # measured 0.2169 / 0.1680
    GGMLType.IQ4_NL: 0.088, GGMLType.IQ4_XS: 0.092,  # measured 0.0766 / 0.0801 (scale 1e-3)
    GGMLType.TQ1_0: 0.945, GGMLType.TQ2_0: 0.945,  # ternary: d = amax, measured 0.821 on normal rows
    GGMLType.IQ2_XXS: 0.40, GGMLType.IQ2_XS: 0.35, GGMLType.IQ2_S: 0.31,  # measured 0.3464 / 0.3015 / 0.2664
    GGMLType.IQ1_S: 0.57, GGMLType.IQ1_M: 0.68,  # measured 0.4904 (ones imatrix) / 0.5878 (plain)
}


def gguf():
    return pytest.importorskip("gguf", reason="needs gguf-py (the test extra)")


def _lib():
    need_llama_cpp()
    import llama_oracle
    return llama_oracle._libggml()


def llama_quantize(x: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """llama.cpp's bytes for float32 rows x."""
    if ggml_type != GGMLType.Q8_K:
        need_llama_cpp()
        return ggml_quantize(x, ggml_type)
    fn = _lib().quantize_row_q8_K_ref
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float32)
    # zeroed: for an all-zero super-block C leaves bsums untouched (qtool writes zeros there)
    out = np.zeros((x.shape[0], kernels.row_bytes(ggml_type, x.shape[1])), dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def llama_dequantize_q8_k(q: np.ndarray, n_cols: int) -> np.ndarray:
    fn = _lib().dequantize_row_q8_K
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    q = np.ascontiguousarray(q)
    out = np.empty((q.shape[0], n_cols), dtype=np.float32)
    fn(q.ctypes.data, out.ctypes.data, out.size)
    return out


# llama.cpp's IQ1, IQ2 and IQ3 quantizers GGML_ASSERT (abort the process) on super-blocks whose weights overflow
# float32 or hold NaN (no grid neighbour compares below FLT_MAX, or the scale comes out NaN): for these types the
# rows are first tried in a forked child, and the rows llama.cpp aborts on are left out of the comparison
ORACLE_ABORTS = {GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S,
                 GGMLType.IQ1_S, GGMLType.IQ1_M}


def rows_llama_cpp_takes(ggml_type: GGMLType, x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    if ggml_type not in ORACLE_ABORTS:
        return x
    import os

    import llama_oracle
    llama_oracle._libggml().ggml_quantize_init(int(ggml_type))  # its tables built here, not in every child

    def survives(rows):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                import faulthandler
                faulthandler.disable()  # pytest's would print the abort's traceback
                os.environ["GGML_NO_BACKTRACE"] = "1"
                os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
                with np.errstate(all="ignore"):
                    ggml_quantize(rows, ggml_type, qw)
                code = 0
            finally:
                os._exit(code)
        return os.waitpid(pid, 0)[1] == 0

    if survives(x):
        return x
    # the rows it aborts on are those whose sum of squares is not a finite float32: leave them out and check the
    # rest in one child; only if that is wrong, try every row alone (a fork each, ~50 ms)
    with np.errstate(all="ignore"):
        finite = np.isfinite((x.astype(np.float32) ** 2).sum(axis=1, dtype=np.float32))
    if finite.any() and survives(x[finite]):
        return x[finite]
    return x[[i for i in range(len(x)) if survives(x[i:i + 1])]]


def assert_rows_equal(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    bad = [i for i in range(len(got)) if not np.array_equal(got[i], ref[i])]
    assert not bad, f"{what}: rows {bad} differ from llama.cpp"


# ---- the table ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", list(TRAITS), ids=[t.name for t in TRAITS])
def test_traits_row(ggml_type):
    """Fields lie inside the block in ascending order; the derived tables agree with the row."""
    row = TRAITS[ggml_type]
    assert (row.block_size, row.type_size) == (TYPE_INFO[ggml_type].block_size, TYPE_INFO[ggml_type].type_size)
    offsets = list(row.fields.values())
    assert offsets == sorted(set(offsets)) and all(0 <= o < row.type_size for o in offsets)
    if row.codec is not None:
        assert ggml_type in kernels.quantizable_types()
        assert kernels._MODULES[ggml_type] == row.codec
        x = np.zeros((1, row.block_size), np.float32)
        if row.weighted is None and not row.ignores_imatrix:
            with pytest.raises(NotImplementedError):
                kernels.quantize(ggml_type, x, quant_weights=np.ones(row.block_size, np.float32))
        else:
            assert kernels.quantize(ggml_type, x, quant_weights=np.ones(row.block_size, np.float32)).shape == \
                (1, row.type_size)
            with pytest.raises(ValueError, match="one value per column"):
                kernels.quantize(ggml_type, x, quant_weights=np.ones(row.block_size + 1, np.float32))
    assert (ggml_type in mm.SUPPORTED) == (row.vec_dot is not None)
    if row.vec_dot is not None:
        assert mm.VEC_DOT_TYPE[ggml_type] == row.vec_dot
        assert mm.check_type(ggml_type, 11 * max(row.block_size, mm.ACT_BLOCK.get(row.vec_dot, 1))) is None
    if row.fused is not None:
        assert callable(row.fused_kernel())
    from qtool.kernels import matvec as mv
    assert (row.fused is not None and row.fused_kernel() in mv._block32()) == row.int16_vectors


@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t not in PLAIN] or [None])
def test_types_that_need_an_imatrix_refuse_to_quantize_without(ggml_type):
    if ggml_type is None:
        pytest.skip("no type needs an importance matrix")
    with pytest.raises(ValueError, match="needs an importance matrix"):
        kernels.quantize(ggml_type, np.ones((1, TRAITS[ggml_type].block_size), np.float32))


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="no kernel"):
        kernels.quantize(GGMLType.F16, np.zeros((1, 32), np.float32))


# ---- llama.cpp's quantizer ---------------------------------------------------------------------------------------

def assert_equals_llama_cpp(ggml_type, x, qw, what):
    """qtool's bytes for rows x (with importance qw, or None) equal llama.cpp's."""
    x = rows_llama_cpp_takes(ggml_type, x, qw)
    with np.errstate(all="ignore"):
        ref = ggml_quantize(x, ggml_type, qw) if qw is not None else llama_quantize(x, ggml_type)
    np.testing.assert_array_equal(kernels.quantize(ggml_type, x, quant_weights=qw), ref,
                                  err_msg=f"{ggml_type.name} {what}{' imatrix' if qw is not None else ''}")


@pytest.mark.parametrize("ggml_type,weighted", CASES)
@pytest.mark.parametrize("dist", DISTS)
def test_quantize_equals_llama_cpp_random(ggml_type, weighted, dist):
    """Random rows of every distribution and scale; with weights, random positive importance vectors."""
    need_llama_cpp()
    for seed, scale in enumerate([1e-3, 1.0, 300.0]):
        x = random_rows(seed, scale, dist)
        for kind in (("uniform", "lognormal") if weighted else (None,)):
            qw = importance(seed, x.shape[1], kind) if kind else None
            assert_equals_llama_cpp(ggml_type, x, qw, f"{dist} scale {scale} {kind or ''}")


@pytest.mark.parametrize("ggml_type", PLAIN, ids=PIDS)
def test_quantize_equals_llama_cpp_adversarial(ggml_type):
    need_llama_cpp()
    x = rows_llama_cpp_takes(ggml_type, adversarial_rows())
    with np.errstate(all="ignore"):
        ref = llama_quantize(x, ggml_type)
    assert_rows_equal(kernels.quantize(ggml_type, x), ref, f"{ggml_type.name} adversarial")


# (Q8_0 on a block of NaN: ggml's MAX(amax, fabsf(x)) keeps the NaN and writes d = NaN, codes 0.)
NON_FINITE = PLAIN


@pytest.mark.parametrize("ggml_type", NON_FINITE, ids=PIDS)
def test_quantize_equals_llama_cpp_non_finite(ggml_type):
    """inf and NaN weights: their blocks still come out as llama.cpp writes them."""
    need_llama_cpp()
    x = rows_llama_cpp_takes(ggml_type, adversarial_rows(finite=False)[-5:])
    with np.errstate(all="ignore"):
        ref = llama_quantize(x, ggml_type)
    assert_rows_equal(kernels.quantize(ggml_type, x), ref, f"{ggml_type.name} non-finite")


SHAPES = [(1, 256), (3, 256), (3, 768), (5, 768), (7, 1280), (5, 2304), (2, 4096)]


@pytest.mark.parametrize("ggml_type,weighted", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_llama_cpp_shapes(ggml_type, weighted, shape):
    """Super-blocks are processed in chunks counted row after row: partial chunks, chunks spanning rows; with
    weights, each row's sigma2 is its own."""
    need_llama_cpp()
    for seed, scale in ((sum(shape), 2.0), (11, 1.0)):
        x = random_rows(seed, scale, "laplace", shape)
        qw = importance(seed, shape[1], "lognormal") if weighted else None
        assert_equals_llama_cpp(ggml_type, x, qw, f"{shape} seed {seed}")


# ---- layout, dequantize, error -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", PLAIN, ids=PIDS)
def test_row_layout(ggml_type):
    """Shape and size per TYPE_INFO; each row is its own run of blocks: rows one by one give the same bytes."""
    info = TYPE_INFO[ggml_type]
    for seed, n_rows in ((11, 9), (3, 7)):
        x = random_rows(seed, 1.0, "normal", (n_rows, 768))
        q = kernels.quantize(ggml_type, x)
        assert q.shape == (n_rows, 768 // info.block_size * info.type_size) and q.dtype == np.uint8
        for i in range(n_rows):
            np.testing.assert_array_equal(kernels.quantize(ggml_type, x[i:i + 1]), q[i:i + 1])


def quantize_any(ggml_type: GGMLType, x: np.ndarray) -> np.ndarray:
    """Quantize plainly, or with a ones importance vector for the types that need one (IQ2_XXS, IQ2_XS ...)."""
    qw = np.ones(x.shape[1], np.float32) if TRAITS[ggml_type].needs_imatrix else None
    return kernels.quantize(ggml_type, x, quant_weights=qw)


def random_blocks(ggml_type: GGMLType, n_rows: int, n_blocks: int, seed: int, scale: float) -> np.ndarray:
    """Random bytes (every code, scale and bit pattern) with finite fp16 super-scales (uniform in ±2*scale) in
    the type's d and dmin."""
    row = TRAITS[ggml_type]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_rows, n_blocks, row.type_size), dtype=np.uint8)
    for name in ("d", "dmin"):
        if name in row.fields:
            p = row.fields[name]
            raw[:, :, p:p + 2] = np.float16(rng.uniform(-2, 2, (n_rows, n_blocks, 1)) * scale).view(np.uint8)
    return raw.reshape(n_rows, -1)


@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t != GGMLType.Q8_K], ids=[t.name for t in TYPES
                                                                                    if t != GGMLType.Q8_K])
def test_dequantize_equals_gguf_py(ggml_type):
    g = gguf()
    gt = g.GGMLQuantizationType(int(ggml_type))
    for seed, scale in ((4, 0.01), (5, 1.0)):  # 32 rows of 2 random blocks each, 64 blocks
        x = np.concatenate([random_rows(seed, 1.0, "laplace"), adversarial_rows()])
        q = quantize_any(ggml_type, x)
        n_blocks = q.shape[1] // TRAITS[ggml_type].type_size
        q = np.concatenate([q, random_blocks(ggml_type, 32, n_blocks, seed + 5, scale)])
        with np.errstate(all="ignore"):
            ref = g.quants.dequantize(q, gt)
        np.testing.assert_array_equal(kernels.dequantize(ggml_type, q, x.shape[1]), ref, err_msg=f"seed {seed}")


def test_q8_k_dequantize():
    """x = d * q (ggml's dequantize_row_q8_K; gguf-py has no Q8_K): against numpy and, if present, ggml."""
    x = random_rows(5, 3.0, "laplace")
    q = kernels.quantize(GGMLType.Q8_K, x)
    d_pos, qs_pos, bsums_pos = (TRAITS[GGMLType.Q8_K].fields[f] for f in ("d", "qs", "bsums"))
    blocks = q.reshape(-1, TRAITS[GGMLType.Q8_K].type_size)
    d = blocks[:, d_pos:qs_pos].copy().view(np.float32)
    qs = blocks[:, qs_pos:bsums_pos].view(np.int8).astype(np.float32)
    expect = (d * qs).reshape(x.shape)
    np.testing.assert_array_equal(kernels.dequantize(GGMLType.Q8_K, q, x.shape[1]), expect)
    bsums = blocks[:, bsums_pos:].copy().view(np.int16)
    np.testing.assert_array_equal(bsums, blocks[:, qs_pos:bsums_pos].view(np.int8).reshape(-1, 16, 16).sum(axis=2))
    try:
        need_llama_cpp()
    except pytest.skip.Exception:
        return
    np.testing.assert_array_equal(kernels.dequantize(GGMLType.Q8_K, q, x.shape[1]),
                                  llama_dequantize_q8_k(q, x.shape[1]))


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_round_trip_error(ggml_type):
    for seed, scale in ((1, 1.0), (5, 1.0), (1, 1e-3)):  # 1e-3: fp16 super-scales lose bits (Q6_K 0.0210)
        if True:
            x = random_rows(seed, scale, "normal")
            dq = kernels.dequantize(ggml_type, quantize_any(ggml_type, x), x.shape[1])
            rel = float(np.sqrt(np.mean((x - dq) ** 2) / np.mean(x ** 2)))
            assert rel < RMSE_BOUND[ggml_type], f"{ggml_type.name} seed {seed} scale {scale}: relative RMSE {rel:.4f}"
    if ggml_type == GGMLType.Q8_K:  # round to nearest on a step of max/127: at most half a step per weight
        x = random_rows(5, 1.0, "normal")
        dq = kernels.dequantize(ggml_type, kernels.quantize(ggml_type, x), x.shape[1])
        step = np.abs(x.reshape(-1, QK_K)).max(axis=1, keepdims=True) / 127
        assert (np.abs(dq - x).reshape(-1, QK_K) <= step * (0.5 + 1e-5)).all()


# ---- with an importance matrix (ggml_quantize_chunk with a non-NULL imatrix: quantize_row_*_impl) -----------------

WEIGHTED = tuple(t for t in TYPES if TRAITS[t].weighted is not None)
WIDS = [t.name for t in WEIGHTED]


def assert_weighted_equal(ggml_type, x, qw, what):
    x = rows_llama_cpp_takes(ggml_type, x, qw)
    with np.errstate(all="ignore"):
        ref = ggml_quantize(x, ggml_type, qw)
    assert_rows_equal(kernels.quantize(ggml_type, x, quant_weights=qw), ref, f"{ggml_type.name} imatrix {what}")


def test_imatrix_types():
    """Every type llama-quantize applies an imatrix to has a weighted quantizer (Q8_0 takes and ignores it, as
    the ternary types do; Q8_K is never in a file)."""
    T = GGMLType
    assert set(WEIGHTED) == set(TYPES) - {T.Q8_K, T.TQ1_0, T.TQ2_0}




def _shared_imatrix():
    from conftest import SHARED
    path = SHARED / "reference" / "stories3M.imatrix.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    gguf()
    return SHARED, imatrix_entries(path)


_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj"}


@pytest.mark.parametrize("ggml_type", WEIGHTED, ids=WIDS)
def test_imatrix_equals_llama_cpp_real(ggml_type):
    """llama-imatrix's own importance vectors for stories3M (../shared/reference), applied to that model's own
    weights (blocks 0 and 7, every kind of tensor: rows of 256 and 768) and to random rows."""
    need_llama_cpp()
    shared, entries = _shared_imatrix()
    weights = shared / "models" / "stories3M" / "model.safetensors"
    for name, qw in entries.items():
        blk, kind = name.split(".")[1:3]
        if blk not in ("0", "7"):
            continue
        x = random_rows(int(blk) + len(kind), 0.05, "laplace", (4, qw.size))
        assert_weighted_equal(ggml_type, x, qw, f"{name} on random rows")
        if weights.is_file():
            x = np.ascontiguousarray(safetensors_rows(weights, f"model.layers.{blk}.{_HF[kind]}.weight"))
            assert x.shape[1] == qw.size
            assert_weighted_equal(ggml_type, x, qw, f"{name} on the model's weights")


@pytest.mark.parametrize("ggml_type", WEIGHTED, ids=WIDS)
def test_imatrix_equals_llama_cpp_adversarial(ggml_type):
    """Adversarial rows (zeros, tiny, huge, outliers, constant rows ...) under every kind of importance vector,
    zeros and all-zero included."""
    need_llama_cpp()
    x = adversarial_rows()
    for seed, kind in enumerate(IMPORTANCE_KINDS):
        assert_weighted_equal(ggml_type, x, importance(seed, x.shape[1], kind), f"adversarial, {kind}")


@pytest.mark.parametrize("ggml_type", WEIGHTED, ids=WIDS)
def test_imatrix_equals_llama_cpp_non_finite(ggml_type):
    need_llama_cpp()
    x = adversarial_rows(finite=False)[-5:]
    assert_weighted_equal(ggml_type, x, importance(3, x.shape[1]), "non-finite")




def test_imatrix_row_layout():
    """Rows one by one give the bytes of all rows at once (the kernels are parallel over rows)."""
    x = random_rows(3, 1.0, "normal", (7, 768))
    qw = importance(4, 768)
    for ggml_type in WEIGHTED:
        q = kernels.quantize(ggml_type, x, quant_weights=qw)
        for i in range(len(x)):
            np.testing.assert_array_equal(kernels.quantize(ggml_type, x[i:i + 1], quant_weights=qw), q[i:i + 1])
