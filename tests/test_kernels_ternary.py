"""TQ1_0 and TQ2_0 (kernels/ternary.py) beyond the table's checks (test_kernels_table.py, test_runner_kernels.py):
an importance matrix is taken and ignored, as llama.cpp's quantize_tq1_0 / tq2_0 do (`qtool convert --imatrix`
with these types included); rows whose weights exceed the block's maximum (a NaN drops out of ggml's MAX), where
lroundf's out-of-range results reach the packed bytes; the decode kernels' int16 partial sums at their largest."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED, qtool_here
from llama_oracle import ggml_quantize, need_llama_cpp
from rows import importance, random_rows

from qtool import kernels
from qtool.formats.constants import GGMLType
from qtool.kernels import matmul as mm

TYPES = [GGMLType.TQ1_0, GGMLType.TQ2_0]
IDS = [t.name for t in TYPES]


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_importance_is_ignored(ggml_type):
    need_llama_cpp()
    x = random_rows(3, 1.0, "laplace", (5, 768))
    plain = kernels.quantize(ggml_type, x)
    for seed, kind in enumerate(("uniform", "lognormal")):
        qw = importance(seed, x.shape[1], kind)
        got = kernels.quantize(ggml_type, x, quant_weights=qw)
        np.testing.assert_array_equal(got, plain)
        np.testing.assert_array_equal(got, ggml_quantize(x, ggml_type, qw))
    with pytest.raises(ValueError, match="one value per column"):
        kernels.quantize(ggml_type, x, quant_weights=np.ones(x.shape[1] + 1, np.float32))


def beyond_the_maximum_rows() -> np.ndarray:
    """Blocks with a NaN after large values (whose quotients by the later maximum reach 2^63 and inf), inf,
    +-2^63 and magnitudes from 1e-40 to 1e37."""
    rng = np.random.default_rng(0)
    blocks = []
    with np.errstate(all="ignore"):
        for i in range(64):
            x = rng.standard_normal(256).astype(np.float32) * np.float32(10.0 ** rng.integers(-40, 38))
            if i % 2 == 0:
                k = rng.integers(1, 255)
                x[k] = np.nan
                x[:k] *= np.float32(10.0 ** rng.integers(0, 30))
                x[k + 1:] *= np.float32(10.0 ** -rng.integers(0, 40))
            if i % 5 == 0:
                x[rng.integers(0, 256)] = np.inf
            if i % 7 == 0:
                x[-1] = np.nan
            if i % 3 == 0:
                x[rng.integers(0, 256, 3)] = [2.0 ** 63, -2.0 ** 63, 2.0 ** 62]
            blocks.append(x)
    return np.stack(blocks).reshape(8, -1)


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_weights_beyond_the_block_maximum(ggml_type):
    need_llama_cpp()
    x = beyond_the_maximum_rows()
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(kernels.quantize(ggml_type, x), ggml_quantize(x, ggml_type))


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_fused_kernel_largest_partial_sums(ggml_type):
    """Every code at its largest (bytes 0xFF: TQ2_0 code 3, TQ1_0 trits of 255) against activations of
    +-127: the int16 partial sums must not wrap."""
    gguf = pytest.importorskip("gguf", reason="needs gguf-py (the test extra)")
    n_out, n_in = 9, 256 * 3
    packed = kernels.quantize(ggml_type, random_rows(1, 1.0, "normal", (n_out, n_in)))
    bpb = kernels.row_bytes(ggml_type, 256)
    blocks = packed.reshape(n_out, -1, bpb)
    d_pos = 64 if ggml_type == GGMLType.TQ2_0 else 52
    blocks[:, :, :d_pos] = 0xFF
    w = mm.Weight("w", ggml_type, packed, n_out, n_in)
    x = np.stack([np.full(n_in, 3.0, np.float32), np.full(n_in, -2.0, np.float32)])
    act = mm.Act("q8_k", x)
    assert np.abs(act.q).max() == 127
    out = mm.matvec(w, act)
    w_deq = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType(int(ggml_type))).reshape(n_out, n_in)
    ref = act.dequantized().astype(np.float64) @ w_deq.astype(np.float64).T
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


@pytest.mark.parametrize("type_name", IDS)
def test_convert_with_an_imatrix(type_name, converted, tmp_path):
    """`qtool convert --imatrix` with a ternary type: every tensor equals llama.cpp's quantizer given its entry
    (which it ignores), as llama-quantize --imatrix writes it."""
    reference = SHARED / "reference" / "stories3M.imatrix.gguf"
    if not reference.is_file():
        pytest.skip(f"{reference} is not here")
    from test_convert_imatrix import assert_tensors_equal_llama_cpp
    src = converted("stories3M", "F32")
    out = tmp_path / f"{type_name}.gguf"
    qtool_here("convert", src, "-o", out, "--type", type_name, "--imatrix", reference, check=True)
    assert assert_tensors_equal_llama_cpp(src, out, reference) >= 36
