"""Phi-3 (GGUF `phi3`): a tiny transformers Phi3ForCausalLM (Phi-3-mini-4k's shape, reduced), converted by qtool,
has the tensors and metadata llama.cpp's converter writes, llama.cpp's logits on it are transformers', and qtool's
runner gives llama.cpp's.

What the checkpoint makes matter: Q, K and V in one qkv_proj and gate and up in one gate_up_proj (llama.cpp's
attn_qkv and a 2 × intermediate_size ffn_up, which the runner multiplies once and reads as column views), GQA,
partial_rotary_factor 0.5 (RoPE on half of each head), an lm_head of its own, and the stories260K SentencePiece
tokenizer written as Phi3MiniModel does (its added tokens scored -1000, control). The sliding window (2047, as
Phi-3-mini-4k's) is longer than the prompt: llama.cpp's phi3 graph reads it and disables it, so does qtool."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_metadata, qtool_here
from arch_oracle import greedy_texts, l2, llama_cpp_logits, qtool_logits, rel, save_checkpoint, transformers_logits
from llama_oracle import need_llama_cpp

VOCAB = 512  # the stories260K SentencePiece tokenizer's pieces
IDS = [1] + list(np.random.default_rng(0).integers(3, VOCAB, 47))
HIDDEN, HEADS, KV_HEADS, FF, ROTARY = 256, 4, 2, 512, 0.5
N_CTX = 128


def _phi3(folder: Path) -> Path:
    """A Phi3ForCausalLM checkpoint (F32, untied lm_head) with seeded random weights and the stories260K
    tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=2,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, partial_rotary_factor=ROTARY,
                                  max_position_embeddings=N_CTX, original_max_position_embeddings=N_CTX,
                                  sliding_window=2047, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.architectures = ["Phi3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).float()

    def value(name, p):
        if p.ndim == 1:
            return 1 + 0.1 * torch.randn_like(p)  # norms
        return (0.08 if "proj" in name else 0.2) * torch.randn_like(p)  # projections; embedding and lm_head
    return save_checkpoint(model, folder, value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, {type: qtool's GGUF})."""
    tmp = tmp_path_factory.mktemp("phi3")
    src = _phi3(tmp / "ckpt")
    out = {}
    for t in ("F32", "Q4_K_M"):
        out[t] = tmp / f"m.{t}.gguf"
        qtool_here("convert", src, "-o", out[t], "--type", t, "--quiet", check=True)
    return src, out


@pytest.fixture(scope="module")
def llama_logits(files):
    """llama.cpp's logits of IDS on each of qtool's files (F32 KV cache)."""
    return {t: llama_cpp_logits(path, IDS, N_CTX) for t, path in files[1].items()}


def test_tensors_and_metadata_are_llama_cpps(files, llama_convert):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same metadata (keys, order, types, values:
    the original context, RoPE on 32 of 64 dimensions, the window; the vocabulary's added tokens as Phi3MiniModel
    scores them), and the same tensors (names, order, shapes, types, values: fused attn_qkv and ffn_up)."""
    from qtool.formats.gguf_reader import GGUFFile
    ours, theirs = files[1]["F32"], llama_convert(files[0])
    assert_same_metadata(ours, theirs)
    head_dim = HIDDEN // HEADS
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        md = a.metadata
        assert md["general.architecture"] == "phi3"
        assert md["phi3.rope.dimension_count"] == int(ROTARY * head_dim)
        assert md["phi3.attention.sliding_window"] == 2047
        assert list(md["tokenizer.ggml.scores"][:3]) == [-1000.0] * 3  # <unk>, <s>, </s>: tokenizer.json's added
        assert list(a.tensors) == list(b.tensors)
        assert a.tensors["blk.0.attn_qkv.weight"].shape == ((HEADS + 2 * KV_HEADS) * head_dim, HIDDEN)
        assert a.tensors["blk.0.ffn_up.weight"].shape == (2 * FF, HIDDEN)
        assert "output.weight" in a.tensors and "blk.0.attn_q.weight" not in a.tensors
        for name in a.tensors:
            ta, tb = a.tensors[name], b.tensors[name]
            assert (tuple(ta.shape), ta.ggml_type) == (tuple(tb.shape), tb.ggml_type), name
            np.testing.assert_array_equal(a.array(name), b.array(name), err_msg=name)


def test_requantizing_equals_llama_quantize(files, tmp_path):
    """llama.cpp's quantizer on qtool's F32 file: qtool's Q4_K_M of the same file is byte-identical (attn_qkv
    takes llama-quantize's attn_v rules), and the checkpoint converted directly has the same tensors."""
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
        # Q4_K_M's attn_v rule: more bits for the layers use_more_bits picks (here the second)
        assert [a.tensors[f"blk.{i}.attn_qkv.weight"].ggml_type.name for i in (0, 1)] == ["Q4_K", "Q6_K"]


def test_llama_cpp_logits_equal_transformers(files, llama_logits):
    """SiLU and float32 throughout: measured 9.5e-7 of the largest logit."""
    assert rel(llama_logits["F32"], transformers_logits(files[0], IDS)) < 1e-5


# F32: measured 1.0e-6 batch, 3.8e-7 token by token. Q4_K_M (relative L2): the prompt path multiplies dequantized
# tiles in float, so an activation code can flip (see test_qwen3).
RUNNER_BOUND = {"F32": 1e-5, "Q4_K_M": 2e-2}


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_runner_logits_equal_llama_cpps(files, llama_logits, type_name):
    """Batch and token by token; one product for Q, K and V and one for gate and up, read as column views."""
    (got, decoded), want = qtool_logits(files[1][type_name], IDS, 16, N_CTX), llama_logits[type_name]
    if type_name == "F32":
        assert rel(got, want) < RUNNER_BOUND[type_name]
        assert rel(decoded, want[:16]) < RUNNER_BOUND[type_name]
    else:
        assert l2(got[:1], want[:1]) < 1e-5  # the products alone: position 0 attends only to itself
        assert l2(got, want) < RUNNER_BOUND[type_name]
        assert l2(decoded, want[:16]) < RUNNER_BOUND[type_name]
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97


def test_the_runner_keeps_the_fused_weights_whole(files):
    """The fused tensors stay one Weight each (no split copies at load); a token's Q, K, V and gate, up are
    column views of one product each, as llama.cpp's graph views them."""
    from qtool.model import Model
    m = Model(files[1]["Q4_K_M"], n_ctx=N_CTX)
    try:
        L = m.w.layers[0]
        assert L.wq is None and L.w_gate is None
        assert (L.wqkv.n_out, L.w_up.n_out) == ((HEADS + 2 * KV_HEADS) * HIDDEN // HEADS, 2 * FF)
        assert m.cfg.n_rot == int(ROTARY * HIDDEN // HEADS) and not m.cfg.swa_layers
    finally:
        m.close()


def test_greedy_text_equals_llama_cpps(files):
    """32 tokens after an 8-token prompt, greedy; compared up to a near-tie in llama.cpp's logits (none in this
    checkpoint: asserted)."""
    ours, theirs, margin = greedy_texts(files[1]["F32"], IDS[:8], 32, N_CTX)
    assert margin > 1e-2
    assert ours == theirs


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 16, "short_factor": [1.0] * 16}},
     "rope_type 'longrope' is not supported for phi3"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear' is not supported for phi3"),
    ({"head_dim": 32}, "head_dim is 32; llama.cpp's phi3 converter writes none")])
def test_what_llama_cpp_would_run_differently_is_refused(files, tmp_path, change, message):
    """LongRoPE (not yet supported), a RoPE scaling Phi3MiniModel does not write, and a head_dim llama.cpp would
    not use are one-line errors, not files that run differently."""
    src = tmp_path / "changed"
    shutil.copytree(files[0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
