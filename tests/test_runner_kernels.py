"""The runner's fused decode kernels (kernels/matvec.py) on their own: every weight type, rows whose block count
is not a multiple of the SIMD lane count (padding), several tokens at once, weights repacked into planes and back.

Reference: the weights dequantized by gguf-py (llama.cpp's Python package) times the activations as the integer
dot sees them (codes times scales), in float64. The kernels multiply the same integers, so only float32 rounding
differs — except Q4_1/Q5_1, where llama.cpp (and we) take each block's activation sum rounded to fp16."""
import numpy as np
import pytest

from qtool import kernels
from qtool.formats.constants import TYPE_INFO, GGMLType
from qtool.kernels import matmul as mm
from qtool.kernels import matvec as mv

from qtool.kernels.traits import TRAITS

# every quantized type of the traits table with a fused kernel (F16/BF16 below)
TYPES = [t.name for t, r in TRAITS.items() if r.fused is not None and r.codec is not None]
FP16_SUMS = {"Q4_1", "Q5_1"}
gguf = pytest.importorskip("gguf", reason="needs gguf-py (the test extra)")


@pytest.mark.parametrize("type_name", TYPES)
def test_fused_kernel_equals_dequantized_product(type_name):
    t = GGMLType[type_name]
    bs = TYPE_INFO[t].block_size
    rng = np.random.default_rng(7)
    n_out, n_in = 37, bs * 11  # 11 blocks: padded to 16 lanes
    w_f = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.2, 3.0, (n_out, 1))).astype(np.float32)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    qw = np.ones(n_in, np.float32) if TRAITS[t].needs_imatrix else None  # IQ2_XXS, IQ2_XS: llama.cpp's way
    packed = kernels.quantize(t, w_f, quant_weights=qw).reshape(n_out, -1)
    w = mm.Weight("w", t, packed, n_out, n_in)
    g = w.group  # rows per planes row (matvec.py's row groups): 11 blocks are too few for one row alone
    assert g > 1 and w.planes.shape == (-(-n_out // g), TYPE_INFO[t].type_size, mv.n_lanes(11 * g, TRAITS[t].lanes))
    assert np.array_equal(w.stored_rows(5, 30), packed[5:30])

    act = mm.Act(mm.VEC_DOT_TYPE[t], x)
    out = mm.matvec(w, act)
    w_deq = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType(int(t))).reshape(n_out, n_in).astype(np.float64)
    ref = act.dequantized().astype(np.float64) @ w_deq.T
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < (1e-3 if type_name in FP16_SUMS else 1e-6), err
    # one token at a time gives the same numbers as three together
    single = np.concatenate([mm.matvec(w, mm.Act(mm.VEC_DOT_TYPE[t], x[i:i + 1])) for i in range(3)])
    assert np.array_equal(single, out)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_fused_float_kernels(kind):
    rng = np.random.default_rng(3)
    w_f = rng.standard_normal((29, 200)).astype(np.float32)
    x = rng.standard_normal((2, 200)).astype(np.float32)
    if kind == "f16":
        t, bits = GGMLType.F16, w_f.astype(np.float16).view(np.uint16)
        w_seen = w_f.astype(np.float16).astype(np.float64)
    else:
        t, bits = GGMLType.BF16, (mm.round_bf16(w_f).view(np.uint32) >> 16).astype(np.uint16)
        w_seen = mm.round_bf16(w_f).astype(np.float64)
    act = mm.Act(kind, x)
    out = mm.matvec(mm.Weight("w", t, bits, 29, 200), act)
    ref = act.x.astype(np.float64) @ w_seen.T
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_weight_call_shares_one_act_per_kind():
    """w(x, acts) is linear(w, x): the weights applied to one x convert it once per vec_dot kind, into acts."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    ws = [mm.Weight(t.name, t, kernels.quantize(t, rng.standard_normal((24, 512)).astype(np.float32)), 24, 512)
          for t in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0)]
    acts = {}
    outs = [w(x, acts) for w in ws]
    assert sorted(acts) == ["q8_0", "q8_k"]
    q8_k = acts["q8_k"]
    for w, out in zip(ws, outs):
        np.testing.assert_array_equal(out, mm.linear(w, x))
        np.testing.assert_array_equal(w(x), out)
    ws[0](x, acts)
    assert acts["q8_k"] is q8_k  # reused, not converted again
