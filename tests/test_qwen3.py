"""Qwen3 (GGUF `qwen3`): a tiny transformers Qwen3ForCausalLM, converted by qtool, has the tensors and metadata
llama.cpp's converter writes, llama.cpp's logits on it are transformers', and qtool's runner gives llama.cpp's.

The config's head_dim (128) is not hidden_size / heads (64), so a head size taken from the wrong place fails
every test; its rows (256 and 512) are whole K-quant blocks, so Q4_K_M quantizes every projection."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_metadata, qtool_here
from arch_oracle import l2, llama_cpp_logits, qtool_logits, rel, save_checkpoint, transformers_logits
from llama_oracle import need_llama_cpp

REPO = Path(__file__).resolve().parent.parent
VOCAB = 512  # the stories260K SentencePiece tokenizer's pieces
IDS = [1] + list(np.random.default_rng(0).integers(3, VOCAB, 47))
HIDDEN, HEADS, HEAD_DIM = 256, 4, 128


def _qwen3(folder: Path) -> Path:
    """A Qwen3ForCausalLM checkpoint (F32, tied embeddings, GQA) with seeded random weights and the stories260K
    tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
                                   max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                                   eos_token_id=2, rms_norm_eps=1e-6)
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).float()

    def value(name, p):
        if name == "lm_head.weight":
            return None  # tied
        if p.ndim == 1:
            return 1 + 0.2 * torch.randn_like(p)  # norms, the q/k norms among them
        return (0.05 if "proj" in name else 0.5) * torch.randn_like(p)  # projections; the embedding
    return save_checkpoint(model, folder, value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, {type: qtool's GGUF})."""
    tmp = tmp_path_factory.mktemp("qwen3")
    src = _qwen3(tmp / "ckpt")
    out = {}
    for t in ("F32", "Q4_K_M"):
        out[t] = tmp / f"m.{t}.gguf"
        qtool_here("convert", src, "-o", out[t], "--type", t, "--quiet", check=True)
    return src, out


@pytest.fixture(scope="module")
def reference(files):
    return transformers_logits(files[0], IDS)






def test_tensors_and_metadata_are_llama_cpps(files, llama_convert):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same metadata (keys, order, types, values),
    and the same tensors (names, order, shapes, types, values)."""
    from qtool.formats.gguf_reader import GGUFFile
    ours, theirs = files[1]["F32"], llama_convert(files[0])
    assert_same_metadata(ours, theirs)
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert a.metadata["general.architecture"] == "qwen3"
        assert a.metadata["qwen3.attention.key_length"] == HEAD_DIM != HIDDEN // HEADS
        assert list(a.tensors) == list(b.tensors)
        assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= set(a.tensors)
        assert "output.weight" not in a.tensors  # tied
        for name in a.tensors:
            ta, tb = a.tensors[name], b.tensors[name]
            assert (tuple(ta.shape), ta.ggml_type) == (tuple(tb.shape), tb.ggml_type), name
            np.testing.assert_array_equal(a.array(name), b.array(name), err_msg=name)


def test_quantized_file_keeps_the_qk_norms_f32(files):
    """llama-quantize keeps every "_norm.weight" in F32 (attn_q_norm / attn_k_norm among them) and quantizes
    the projections as it does llama's."""
    from qtool.formats.gguf_reader import GGUFFile
    with GGUFFile(files[1]["Q4_K_M"]) as g:
        types = {n: t.ggml_type.name for n, t in g.tensors.items()}
    assert {types[f"blk.{i}.attn_{x}_norm.weight"] for i in (0, 1) for x in "qk"} == {"F32"}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"


def test_requantizing_equals_llama_quantize(files, tmp_path):
    """llama.cpp's quantizer (what llama-quantize runs) on qtool's F32 file: qtool's Q4_K_M of the same file is
    byte-identical, and the checkpoint converted directly has the same tensors (types and bytes)."""
    import ctypes
    from test_quantize_files import assert_same_file
    from qtool.formats.constants import FILE_TYPES
    from qtool.formats.gguf_reader import GGUFFile
    llama_cpp = need_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(FILE_TYPES["Q4_K_M"]), 2
    theirs, ours = tmp_path / "llama.Q4_K_M.gguf", tmp_path / "ours.Q4_K_M.gguf"
    assert llama_cpp.llama_model_quantize(str(files[1]["F32"]).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    qtool_here("convert", files[1]["F32"], "-o", ours, "--type", "Q4_K_M", "--quiet", check=True)
    assert_same_file(ours, theirs)
    with GGUFFile(files[1]["Q4_K_M"]) as a, GGUFFile(theirs) as b:
        assert set(a.tensors) == set(b.tensors)  # llama-quantize writes them in its own order
        for name, t in b.tensors.items():
            assert a.tensors[name].ggml_type == t.ggml_type, name
            assert (a.raw(name) == b.raw(name)).all(), name


def test_llama_cpp_logits_equal_transformers(files, reference):
    assert rel(llama_cpp_logits(files[1]["F32"], IDS), reference) < 1e-4


# F32 is test_archs' bound. Quantized: both sides round activations to the weight's dot-product type (Q8_K for
# Q4_K) and sum exact integer codes, but qtool's prompt path multiplies dequantized tiles in float, so a rounding
# can flip one activation code in a later layer: position 0 agrees to 4e-7, one batch of 48 tokens to 9.0e-3
# (measured; a flip at position 15 persists through the KV cache), one token at a time to 1e-7 over the first
# 12. Without the q/k norms the runner is 0.14 off on F32.
RUNNER_BOUND = {"F32": 1e-4, "Q4_K_M": 2e-2}


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_runner_logits_equal_llama_cpps(files, reference, type_name):
    (got, decoded), want = qtool_logits(files[1][type_name], IDS, decoded=12), llama_cpp_logits(files[1][type_name], IDS)
    if type_name == "F32":
        assert rel(got, want) < RUNNER_BOUND[type_name]
        assert rel(decoded, want[:12]) < RUNNER_BOUND[type_name]
        assert rel(got, reference) < 1e-4
    else:
        assert l2(got[:1], want[:1]) < 1e-5  # the products alone: position 0 attends only to itself
        assert l2(got, want) < RUNNER_BOUND[type_name]
        assert l2(decoded, want[:12]) < RUNNER_BOUND[type_name]
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97


def test_calibration_from_the_checkpoint_equals_the_runners(files):
    """--calibrate's layer-by-layer matrix (model.block on checkpoint tensors) equals `qtool imatrix`'s on the F32
    file: the q/k norms are loaded and applied on both paths."""
    from qtool import calibrate
    from qtool import imatrix as im
    from qtool.model import Model
    text = (REPO / "examples" / "tinystories_style_eval.txt").read_text()
    streamed = calibrate.importance_matrix(str(files[0]), text, "eval", n_ctx=32, max_chunks=3)
    m = Model(files[1]["F32"], n_ctx=32)
    try:
        ran = im.collect(m, text, 32, "eval", 3)
    finally:
        m.close()
    assert sorted(streamed.data.entries) == sorted(ran.data.entries) and len(ran.data.entries) == 2 * 7
    for name, e in ran.data.entries.items():
        s = streamed.data.entries[name]
        np.testing.assert_array_equal(s.counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(s.in_sum2, e.in_sum2, err_msg=name)


def test_a_config_without_head_dim_is_refused(files, tmp_path):
    """transformers' Qwen3Config then uses 128 whatever hidden_size / heads is: refused rather than guessed."""
    src = tmp_path / "nohead"
    shutil.copytree(files[0], src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["head_dim"]
    (src / "config.json").write_text(json.dumps(cfg))
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1
    assert "config.json has none of head_dim" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                          {"rope_type": "linear", "factor": 2.0}])
def test_rope_scaling_llama_cpp_would_write_is_refused(files, tmp_path, rope_scaling):
    """llama.cpp's converter writes rope.scaling.type / factor (and YaRN's original context) for these; a file
    without them would rotate differently, so they are one-line errors."""
    src = tmp_path / "scaled"
    shutil.copytree(files[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "rope_scaling": rope_scaling}))
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"rope_scaling.rope_type '{rope_scaling['rope_type']}' is not supported" in proc.stderr
