"""Gemma 3 text (GGUF `gemma3`): a tiny transformers Gemma3ForCausalLM, converted by qtool, has the tensors and
metadata llama.cpp's converter writes, llama.cpp's logits on it are transformers', and qtool's runner gives
llama.cpp's.

What the checkpoint makes matter: 7 layers, so layer 5 is global and the others windowed (llama.cpp's fixed
pattern of 6), a window of 8 against a prompt of 48 tokens; the windowed layers' RoPE base 500 apart from the
global layers' 100000, which alone are scaled linearly (factor 2); per-head q/k norms and the other norms near 0
(the file holds 1 + w); a final soft-cap of 10 that binds; head_dim 64 ≠ hidden_size / heads (128) with
query_pre_attn_scalar 64, the scale llama.cpp's graph uses."""
from __future__ import annotations

import dataclasses
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
HIDDEN, HEADS, HEAD_DIM, LAYERS, WINDOW, FINAL_CAP = 512, 4, 64, 7, 8, 10.0
GLOBAL_BASE, LOCAL_BASE, FACTOR = 100000.0, 500.0, 2.0
N_CTX = 128


def _gemma3(folder: Path) -> Path:
    """A Gemma3ForCausalLM checkpoint (F32, tied embeddings, GQA) with seeded random weights and the stories260K
    tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        max_position_embeddings=N_CTX, sliding_window=WINDOW, final_logit_softcapping=FINAL_CAP, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": FACTOR, "rope_theta": GLOBAL_BASE},
                         "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_BASE}})
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).float()

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
    tmp = tmp_path_factory.mktemp("gemma3")
    src = _gemma3(tmp / "ckpt")
    out = {}
    for t in ("F32", "Q4_K_M"):
        out[t] = tmp / f"m.{t}.gguf"
        qtool_here("convert", src, "-o", out[t], "--type", t, "--quiet", check=True)
    return src, out


@pytest.fixture(scope="module")
def reference(files):
    return transformers_logits(files[0], IDS, attn_implementation="eager")


@pytest.fixture(scope="module")
def llama_logits(files):
    """llama.cpp's logits of IDS on each of qtool's files (F32 KV cache)."""
    return {t: llama_cpp_logits(path, IDS, N_CTX) for t, path in files[1].items()}


def test_tensors_and_metadata_are_llama_cpps(files, llama_convert):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same metadata (keys, order, types, values:
    the linear scaling, both RoPE bases, the final soft-cap, the window and no pattern key), and the same tensors
    (names, order, shapes, types, values: every norm, q/k ones too, written as 1 + w)."""
    from qtool.formats.gguf_reader import GGUFFile
    ours, theirs = files[1]["F32"], llama_convert(files[0])
    assert_same_metadata(ours, theirs)
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        md = a.metadata
        assert md["general.architecture"] == "gemma3"
        assert (md["gemma3.rope.freq_base"], md["gemma3.rope.freq_base_swa"]) == (GLOBAL_BASE, LOCAL_BASE)
        assert (md["gemma3.rope.scaling.type"], md["gemma3.rope.scaling.factor"]) == ("linear", FACTOR)
        assert md["gemma3.attention.sliding_window"] == WINDOW
        assert "gemma3.attention.sliding_window_pattern" not in md
        assert list(a.tensors) == list(b.tensors)
        assert {"blk.0.attn_q_norm.weight", "blk.6.post_ffw_norm.weight"} <= set(a.tensors)
        assert abs(float(a.array("blk.0.attn_k_norm.weight").mean()) - 1) < 0.1  # 1 + w, w ~ 0.2 N(0, 1)
        for name in a.tensors:
            ta, tb = a.tensors[name], b.tensors[name]
            assert (tuple(ta.shape), ta.ggml_type) == (tuple(tb.shape), tb.ggml_type), name
            np.testing.assert_array_equal(a.array(name), b.array(name), err_msg=name)


def test_requantizing_equals_llama_quantize(files, tmp_path):
    """llama.cpp's quantizer on qtool's F32 file: qtool's Q4_K_M of the same file is byte-identical, and the
    checkpoint converted directly has the same tensors."""
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
        assert a.tensors["blk.0.attn_q_norm.weight"].ggml_type.name == "F32"
        assert a.tensors["blk.0.attn_q.weight"].ggml_type.name == "Q4_K"


def test_llama_cpp_logits_equal_transformers(reference, llama_logits):
    """llama.cpp's CPU GELU reads an F16 table, transformers computes it in float32: 3.7e-4 of the largest logit
    (measured); a missing window, base, scaling or norm shift is 0.1 or more."""
    assert rel(llama_logits["F32"], reference) < 1e-3


# F32: measured 1.4e-4 batch, 1.0e-4 token by token (tanh and the F16 GELU table's rounding boundaries, over
# 7 layers). Q4_K_M (relative L2): the prompt path multiplies dequantized tiles in float, so an activation code can
# flip (see test_qwen3).
RUNNER_BOUND = {"F32": 5e-4, "Q4_K_M": 2e-2}


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_runner_logits_equal_llama_cpps(files, reference, llama_logits, type_name):
    """Batch (the tiled attention, window as a mask) and token by token (windowed decode), each layer with its
    own RoPE base and scale."""
    (got, decoded), want = qtool_logits(files[1][type_name], IDS, 16, N_CTX), llama_logits[type_name]
    if type_name == "F32":
        assert rel(got, want) < RUNNER_BOUND[type_name]
        assert rel(decoded, want[:16]) < RUNNER_BOUND[type_name]
        assert rel(got, reference) < 1e-3
    else:
        assert l2(got[:1], want[:1]) < 1e-5  # the products alone: position 0 attends only to itself
        assert l2(got, want) < RUNNER_BOUND[type_name]
        assert l2(decoded, want[:16]) < RUNNER_BOUND[type_name]
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97


@pytest.mark.parametrize("change", ["no window", "global base on local layers", "no linear scaling",
                                    "no final cap"])
def test_what_the_checkpoint_makes_matter_binds(files, llama_logits, change):
    """The runner without each of them is far from llama.cpp: all are exercised."""
    def patch(m):
        c = m.cfg
        if change == "no window":
            m.w.layers = [dataclasses.replace(L, window=0) for L in m.w.layers]
        elif change == "global base on local layers":
            m.cfg = dataclasses.replace(c, rope_base_swa=c.rope_base)
        elif change == "no linear scaling":
            m.cfg = dataclasses.replace(c, freq_scale=1.0)
        else:
            m.cfg = dataclasses.replace(c, final_softcap=0.0)
    got, _ = qtool_logits(files[1]["F32"], IDS, 0, N_CTX, patch)
    assert rel(got, llama_logits["F32"]) > 20 * RUNNER_BOUND["F32"]


def test_greedy_text_equals_llama_cpps(files):
    """32 tokens after an 8-token prompt, greedy, past the window; compared up to a near-tie in llama.cpp's
    logits (none in this checkpoint: asserted)."""
    ours, theirs, margin = greedy_texts(files[1]["F32"], IDS[:8], 32, N_CTX)
    assert margin > 1e-2
    assert ours == theirs


@pytest.mark.parametrize("change, message", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is 50.0; llama.cpp's gemma3 graph applies no attention"),
    ({"layer_types": ["full_attention"] * LAYERS}, "are not every 6th layer global"),
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar is 256; llama.cpp's gemma3 graph scales queries by 64"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_type 'yarn' is not supported for gemma3"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}},
     "the sliding-attention layers' rope_type 'linear' is not supported for gemma3")])
def test_what_llama_cpp_would_run_differently_is_refused(files, tmp_path, change, message):
    """An attention soft-cap (llama.cpp's converter refuses it), another layer pattern, a query scale llama.cpp
    does not use, and RoPE scalings its graph does not apply are one-line errors, not files that run
    differently."""
    src = tmp_path / "changed"
    shutil.copytree(files[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
