"""Gemma 2 (GGUF `gemma2`): a tiny transformers Gemma2ForCausalLM, converted by qtool, has the tensors and
metadata llama.cpp's converter writes, llama.cpp's logits on it are transformers', and qtool's runner gives
llama.cpp's.

What the checkpoint makes matter: norm weights near 0 (the file holds 1 + w), a sliding window of 8 on layer 0
against a prompt of 48 tokens, an attention soft-cap of 3 and a final soft-cap of 10 that bind (raw logits reach
48; without the attention cap transformers' logits move by 22% of their range, without the window by 52%), and
head_dim 128 ≠ hidden_size / heads (64) with query_pre_attn_scalar 128, the scale llama.cpp's graph uses."""
from __future__ import annotations

import dataclasses
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
HIDDEN, HEADS, HEAD_DIM, WINDOW, ATTN_CAP, FINAL_CAP = 256, 4, 128, 8, 3.0, 10.0
N_CTX = 128


def _gemma2(folder: Path) -> Path:
    """A Gemma2ForCausalLM checkpoint (F32, tied embeddings, GQA) with seeded random weights and the stories260K
    tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
                                    query_pre_attn_scalar=HEAD_DIM, max_position_embeddings=N_CTX,
                                    sliding_window=WINDOW, attn_logit_softcapping=ATTN_CAP,
                                    final_logit_softcapping=FINAL_CAP, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                    rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")
    cfg.architectures = ["Gemma2ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).float()

    def value(name, p):
        if name == "lm_head.weight":
            return None  # tied
        if p.ndim == 1:
            return 0.2 * torch.randn_like(p)  # norms: Gemma's RMSNorm multiplies by 1 + w
        return (0.08 if "proj" in name else 0.2) * torch.randn_like(p)  # projections; the embedding
    return save_checkpoint(model, folder, value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, {type: qtool's GGUF})."""
    tmp = tmp_path_factory.mktemp("gemma2")
    src = _gemma2(tmp / "ckpt")
    out = {}
    for t in ("F32", "Q4_K_M"):
        out[t] = tmp / f"m.{t}.gguf"
        qtool_here("convert", src, "-o", out[t], "--type", t, "--quiet", check=True)
    return src, out


@pytest.fixture(scope="module")
def reference(files):
    """transformers' logits, eager attention (the one that soft-caps the scores)."""
    return transformers_logits(files[0], IDS, attn_implementation="eager")


@pytest.fixture(scope="module")
def llama_logits(files):
    """llama.cpp's logits of IDS on each of qtool's files (F32 KV cache)."""
    return {t: llama_cpp_logits(path, IDS, N_CTX) for t, path in files[1].items()}





def _qtool(path: Path, decoded: int = 0, patch=None) -> tuple[np.ndarray, np.ndarray]:
    return qtool_logits(path, IDS, decoded, N_CTX, patch)


def test_tensors_and_metadata_are_llama_cpps(files, llama_convert):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same metadata (keys, order, types, values:
    the soft-caps, the window, add_space_prefix false after the vocabulary), and the same tensors (names, order,
    shapes, types, values: the norms written as 1 + w)."""
    from qtool.formats.gguf_reader import GGUFFile
    ours, theirs = files[1]["F32"], llama_convert(files[0])
    assert_same_metadata(ours, theirs)
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert a.metadata["general.architecture"] == "gemma2"
        assert a.metadata["gemma2.attention.sliding_window"] == WINDOW
        assert a.metadata["gemma2.attn_logit_softcapping"] == ATTN_CAP
        assert list(a.tensors) == list(b.tensors)
        assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"} <= set(a.tensors)
        assert "output.weight" not in a.tensors  # tied
        assert abs(float(a.array("output_norm.weight").mean()) - 1) < 0.1  # 1 + w, w ~ 0.2 N(0, 1)
        for name in a.tensors:
            ta, tb = a.tensors[name], b.tensors[name]
            assert (tuple(ta.shape), ta.ggml_type) == (tuple(tb.shape), tb.ggml_type), name
            np.testing.assert_array_equal(a.array(name), b.array(name), err_msg=name)


def test_requantizing_equals_llama_quantize(files, tmp_path):
    """llama.cpp's quantizer on qtool's F32 file: qtool's Q4_K_M of the same file is byte-identical (the four
    norms per layer kept F32), and the checkpoint converted directly has the same tensors."""
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
        assert set(a.tensors) == set(b.tensors)
        for name, t in b.tensors.items():
            assert a.tensors[name].ggml_type == t.ggml_type, name
            assert (a.raw(name) == b.raw(name)).all(), name
        assert a.tensors["blk.0.post_ffw_norm.weight"].ggml_type.name == "F32"
        assert a.tensors["blk.0.attn_q.weight"].ggml_type.name == "Q4_K"


def test_llama_cpp_logits_equal_transformers(reference, llama_logits):
    """llama.cpp's CPU GELU reads an F16 table (the gate rounded to F16, the result too), transformers computes
    it in float32: 1.6e-4 of the largest logit (measured); a missing cap, window or norm shift is 0.2 or more."""
    assert rel(llama_logits["F32"], reference) < 5e-4


# F32: measured 4.7e-5 batch, 3.3e-5 token by token (tanh and the F16 GELU table's rounding boundaries). Q4_K_M
# (relative L2): 8.6e-4 batch, 1.3e-7 token by token; qtool's prompt path multiplies dequantized tiles in float,
# so an activation code can flip (see test_qwen3).
RUNNER_BOUND = {"F32": 1e-4, "Q4_K_M": 2e-2}


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_runner_logits_equal_llama_cpps(files, reference, llama_logits, type_name):
    """Batch (the tiled attention, window as a mask) and token by token (windowed, soft-capped decode)."""
    (got, decoded), want = _qtool(files[1][type_name], decoded=16), llama_logits[type_name]
    if type_name == "F32":
        assert rel(got, want) < RUNNER_BOUND[type_name]
        assert rel(decoded, want[:16]) < RUNNER_BOUND[type_name]
        assert rel(got, reference) < 5e-4
    else:
        assert l2(got[:1], want[:1]) < 1e-5  # the products alone: position 0 attends only to itself
        assert l2(got, want) < RUNNER_BOUND[type_name]
        assert l2(decoded, want[:16]) < RUNNER_BOUND[type_name]
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97


@pytest.mark.parametrize("change", ["no window", "no attention cap"])
def test_the_window_and_the_cap_bind(files, llama_logits, change):
    """The runner without the window (or the attention soft-cap) is far from llama.cpp: both are exercised."""
    def patch(m):
        if change == "no window":
            m.w.layers[0] = dataclasses.replace(m.w.layers[0], window=0)
        else:
            m.cfg = dataclasses.replace(m.cfg, attn_softcap=0.0)
    got, _ = _qtool(files[1]["F32"], patch=patch)
    assert rel(got, llama_logits["F32"]) > 100 * RUNNER_BOUND["F32"]


def test_greedy_text_equals_llama_cpps(files):
    """32 tokens after an 8-token prompt, greedy, past the window; compared up to a near-tie in llama.cpp's
    logits (none in this checkpoint: asserted)."""
    llama_cpp = need_llama_cpp()
    from qtool.model import Model
    prompt, n_new = IDS[:8], 32
    llm = llama_cpp.Llama(model_path=str(files[1]["F32"]), n_ctx=N_CTX, n_threads=2, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    theirs, margins = list(prompt), []
    llm.eval(prompt)
    while len(theirs) < len(prompt) + n_new:
        logits = np.array(llm.scores[llm.n_tokens - 1])
        top = np.sort(logits)[-2:]
        margins.append(top[1] - top[0])
        theirs.append(int(np.argmax(logits)))
        llm.eval(theirs[-1:])
    del llm
    m = Model(files[1]["F32"], n_ctx=N_CTX, kv_type="f32")
    try:
        ours = list(prompt)
        logits = m.eval(prompt)
        while len(ours) < len(theirs):
            ours.append(int(np.argmax(logits)))
            logits = m.eval(ours[-1:])
    finally:
        m.close()
    assert min(margins) > 1e-2
    assert ours == theirs


def test_calibration_from_the_checkpoint_equals_the_runners(files):
    """--calibrate's layer-by-layer matrix equals `qtool imatrix`'s on the F32 file: the scaled embeddings, the
    window and the post-norms are the same on both paths."""
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


@pytest.mark.parametrize("field, value, message", [
    ("hidden_activation", "gelu", "hidden_activation is 'gelu'; llama.cpp's gemma2 graph computes gelu_pytorch_tanh"),
    ("query_pre_attn_scalar", 64, "query_pre_attn_scalar is 64; llama.cpp's gemma2 graph scales queries by 128"),
    ("tie_word_embeddings", False, None)])
def test_what_llama_cpp_would_run_differently_is_refused(files, tmp_path, field, value, message):
    """Another GELU, a query scale llama.cpp does not use, or an lm_head of its own (llama.cpp's graph reads
    token_embd) are one-line errors, not files that run differently."""
    src = tmp_path / "changed"
    shutil.copytree(files[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, field: value}))
    if field == "tie_word_embeddings":
        from safetensors.numpy import load_file, save_file
        state = load_file(src / "model.safetensors")
        save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, src / "model.safetensors")
        message = "tensor lm_head.weight has no GGUF equivalent: llama.cpp's gemma2 graph reads no output"
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
