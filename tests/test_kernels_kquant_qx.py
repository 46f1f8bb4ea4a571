"""Q3_K, Q6_K (the K-quants built on make_q3_quants / make_qx_quants) and Q8_K (the K-quant activation type),
what is particular to them: the vectorised kernels against our plain transcriptions of ggml's code
(`quantize_ref`), and ggml-cpu's Q8_K quantizer (the runner's activations) against the reference one.
The checks every type gets (llama.cpp's bytes, gguf-py's dequantize, error bounds) are in test_kernels_table.py.
"""
import ctypes

import numpy as np
import pytest
from llama_oracle import need_llama_cpp
from rows import adversarial_rows, random_rows

from qtool import kernels
from qtool.formats.constants import QK_K, GGMLType
from qtool.kernels import q3_k, q6_k, q8_k

TYPES = [GGMLType.Q3_K, GGMLType.Q6_K, GGMLType.Q8_K]
IDS = [t.name for t in TYPES]
MODULES = {GGMLType.Q3_K: q3_k, GGMLType.Q6_K: q6_k, GGMLType.Q8_K: q8_k}


def quantize_ref(ggml_type: GGMLType, x: np.ndarray) -> np.ndarray:
    """Our plain transcription of ggml's quantizer (no lanes, no fast paths), one super-block at a time."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], kernels.row_bytes(ggml_type, x.shape[1])), dtype=np.uint8)
    mod = MODULES[ggml_type]
    scratch = () if ggml_type == GGMLType.Q8_K else (np.empty(QK_K + mod.SCALES, dtype=np.uint8),)
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // QK_K):
            mod.quantize_block_ref(x[r, b * QK_K:(b + 1) * QK_K], out[r], b * mod.BLOCK_BYTES, *scratch)
    return out


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
    out = np.zeros((8, kernels.row_bytes(GGMLType.Q8_K, 1024)), dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    np.testing.assert_array_equal(kernels.quantize(GGMLType.Q8_K, x), out)


# ---- always: against our plain transcriptions -------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_fast_paths_equal_plain_transcription(ggml_type):
    rows = [adversarial_rows(finite=False)]
    for seed, dist in enumerate(["normal", "laplace", "sparse", "outliers"]):
        rows.append(random_rows(seed, 10.0 ** (seed - 2), dist, (8, 512)))
    x = np.concatenate(rows)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x), quantize_ref(ggml_type, x))
