"""`qtool convert --imatrix FILE`: each quantized tensor equals llama.cpp's quantizer given that tensor's importance
(ggml_quantize_chunk with in_sum2/counts, what llama-quantize --imatrix passes), types as without an imatrix on
these models (the one imatrix rule, Q4_0/Q5_0 ffn_down in the first eighth of layers, needs >= 8 layers and is a
recipe test), and the quantize.imatrix.* keys llama-quantize appends."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLE_260K, REPO, SHARED, qtool, qtool_here
from llama_oracle import ggml_quantize, need_llama_cpp
from qtool.formats.constants import FLOAT_TYPES, Keys
from qtool.formats.gguf_reader import GGUFFile
from qtool.formats.imatrix import read_imatrix

# the file-level plumbing (entries matched by name, token_embd without one, the four imatrix keys) for a legacy
# type with and without a minimum, the lowest K-quant and a mixture; test_kernels_table checks every weighted
# quantizer against llama.cpp's on real and adversarial rows
TYPES = ["Q4_0", "Q5_1", "Q2_K", "Q4_K_M"]
REFERENCE = SHARED / "reference" / "stories3M.imatrix.gguf"
Q = Keys.Quantize


def assert_tensors_equal_llama_cpp(src, out, imatrix_path, without=()):
    """Every tensor qtool quantized equals ggml_quantize_chunk on the source rows with the entry's importance."""
    need_llama_cpp()
    weights = read_imatrix(imatrix_path).importances()
    n_weighted = 0
    with GGUFFile(src) as s, GGUFFile(out) as q:
        for name, t in q.tensors.items():
            if t.ggml_type in FLOAT_TYPES:
                continue
            x = s.array(name).astype(np.float32).reshape(-1, t.shape[-1])
            w = None if any(p in name for p in without) else weights.get(name)
            n_weighted += w is not None
            ref = ggml_quantize(x, t.ggml_type, w)
            assert np.array_equal(q.raw(name).reshape(ref.shape), ref), f"{name} ({t.ggml_type.name})"
    return n_weighted


@pytest.mark.parametrize("type_name", TYPES)
def test_tensors_equal_llama_cpp_with_the_reference_imatrix(type_name, converted, tmp_path):
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is not here")
    src = converted("stories3M", "F32")
    out = tmp_path / f"{type_name}.gguf"
    proc = qtool_here("convert", src, "-o", out, "--type", type_name, "--imatrix", REFERENCE, check=True)
    assert assert_tensors_equal_llama_cpp(src, out, REFERENCE) >= 36  # 6 layers x 6-7 matrices carry weights
    # token_embd has no entry (llama-imatrix collects blk.* only): named, as llama.cpp logs it
    assert "no entry for" in proc.stderr and "token_embd.weight" in proc.stderr
    plain = tmp_path / "plain.gguf"  # the same requantization without an imatrix (llama-quantize's, byte for byte)
    qtool_here("convert", src, "-o", plain, "--type", type_name, "--quiet", check=True)
    with GGUFFile(out) as g, GGUFFile(plain) as p:
        assert {n: t.ggml_type for n, t in g.tensors.items()} == {n: t.ggml_type for n, t in p.tensors.items()}
        keys = list(g.fields)
        assert keys[:len(p.fields)] == list(p.fields)  # the same file's keys, then llama-quantize's four
        assert keys[len(p.fields):] == [Q.IMATRIX_FILE, Q.IMATRIX_DATASET, Q.IMATRIX_N_ENTRIES, Q.IMATRIX_N_CHUNKS]
        assert g.get(Q.IMATRIX_FILE) == str(REFERENCE)
        assert g.get(Q.IMATRIX_DATASET) == read_imatrix(REFERENCE).datasets[0]
        assert g.get(Q.IMATRIX_N_ENTRIES) == 42 and g.get(Q.IMATRIX_N_CHUNKS) == 178


def test_exclude_and_include_weights_filter_entries(converted, tmp_path):
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is not here")
    src = converted("stories3M", "F32")
    out = tmp_path / "ex.gguf"
    proc = qtool_here("convert", src, "-o", out, "--type", "Q4_K_M", "--imatrix", REFERENCE, "--exclude-weights", "blk.0.",
                 check=True)
    assert "blk.0.attn_q.weight" in proc.stderr
    assert_tensors_equal_llama_cpp(src, out, REFERENCE, without=("blk.0.",))
    with GGUFFile(out) as g:
        assert g.get(Q.IMATRIX_N_ENTRIES) == 42 - 7
    out = tmp_path / "in.gguf"
    qtool_here("convert", src, "-o", out, "--type", "Q4_K_M", "--imatrix", REFERENCE, "--include-weights", "ffn_",
          check=True)
    with GGUFFile(out) as g:
        assert g.get(Q.IMATRIX_N_ENTRIES) == 6 * 3
    both = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "Q4_K_M", "--imatrix", REFERENCE,
                 "--include-weights", "ffn_", "--exclude-weights", "attn")
    assert both.returncode == 2 and "cannot be used together" in both.stderr and not (tmp_path / "x.gguf").exists()


def test_bundled_model_with_its_own_imatrix(tmp_path):
    """No ../shared needed: qtool imatrix on the bundled model (calibrated on the repository's README, not on any
    evaluation text), then convert with it."""
    f32 = tmp_path / "s.F32.gguf"
    qtool_here("convert", EXAMPLE_260K, "-o", f32, "--type", "F32", "--quiet", check=True)
    imx = tmp_path / "imatrix.gguf"
    qtool_here("imatrix", f32, "--text", REPO / "README.md", "--ctx", "64", "--chunks", "4", "-o", imx, "--quiet",
          check=True)
    out = tmp_path / "s.Q4_0.gguf"
    qtool_here("convert", f32, "-o", out, "--type", "Q4_0", "--imatrix", imx, "--quiet", check=True)
    assert assert_tensors_equal_llama_cpp(f32, out, imx) > 0
    bad = qtool("convert", f32, "-o", tmp_path / "y.gguf", "--type", "Q4_0", "--imatrix", tmp_path / "none.gguf")
    assert bad.returncode == 1 and "no such importance-matrix file" in bad.stderr and "Traceback" not in bad.stderr
