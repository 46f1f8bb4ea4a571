"""Each supported architecture end to end: a synthetic checkpoint converted by qtool, loaded by llama.cpp,
gives the logits transformers gives on the original (which exercises metadata keys, Q/K permutation, biases,
GQA, tied embeddings and Llama-3 rope scaling)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_metadata, qtool
from llama_oracle import need_llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_checkpoint import make_checkpoint  # noqa: E402

CASES = {
    "llama-gqa-untied": dict(arch="llama", kv_heads=2),
    "llama-tied": dict(arch="llama", kv_heads=4, tie_embeddings=True),
    "llama3-rope-scaling": dict(arch="llama", kv_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2-biases": dict(arch="qwen2", kv_heads=2),
}


def convert_case(case: str, tmp_path: Path, folder: str = "ckpt", config: dict | None = None) -> tuple[Path, Path]:
    """(checkpoint folder, qtool's F32 GGUF of it); `config` is merged into config.json."""
    params = dict(CASES[case])
    rope_scaling = params.pop("rope_scaling", None)
    src = Path(make_checkpoint(tmp_path / folder, hidden=128, layers=2, heads=4, intermediate=256, vocab=512,
                               dtype="f32", seed=7, **params))
    cfg_path = src / "config.json"
    cfg = {**json.loads(cfg_path.read_text()), **(config or {})}
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    qtool("convert", src, "-o", out, "--type", "F32", "--quiet", check=True)
    return src, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_equals_convert_hf_to_gguf(case, tmp_path, llama_convert):
    src, out = convert_case(case, tmp_path)
    assert_same_metadata(out, llama_convert(src))


@pytest.mark.parametrize("folder, name_or_path", [("Tiny-Story-Teller-420K-Instruct-v0.2", None),
                                                  ("ckpt", "acme-labs/storyteller-2-420k-chat")])
def test_naming_and_sampling_metadata_equal_convert_hf_to_gguf(folder, name_or_path, tmp_path, llama_convert):
    """general.name, basename, size label, finetune, version and organization come from the folder's name or
    config.json's _name_or_path, and general.sampling.* from generation_config.json, as llama.cpp derives them."""
    extra = {"_name_or_path": name_or_path} if name_or_path else {}
    params = dict(CASES["llama-gqa-untied"])
    src = Path(make_checkpoint(tmp_path / folder, hidden=128, layers=2, heads=4, intermediate=256, vocab=512,
                               dtype="f32", seed=7, **params))
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **extra}))
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
         "repetition_penalty": 1.1}))
    out = tmp_path / "m.gguf"
    qtool("convert", src, "-o", out, "--type", "F32", "--quiet", check=True)
    assert_same_metadata(out, llama_convert(src))


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_logits_equal_transformers(case, tmp_path):
    llama_cpp = need_llama_cpp()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src, out = convert_case(case, tmp_path)

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    ids = [1] + list(np.random.default_rng(0).integers(3, 512, 95))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # F32 KV cache
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    spread = want.std()
    assert spread > 0
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, err


def test_hparams_from_gguf_reads_what_convert_wrote(converted):
    from qtool.archs import hparams_from_gguf
    from qtool.formats.gguf_reader import GGUFFile
    with GGUFFile(converted("stories260K", "F32")) as g:
        hp = hparams_from_gguf(g.metadata, g.tensors)
    assert (hp.arch, hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.head_dim_v, hp.n_ff,
            hp.rope_base, hp.n_rot, hp.rope_mode, hp.freq_scale, hp.n_ctx_train) == \
        ("llama", 512, 64, 5, 8, 4, 8, 8, 172, 10000.0, 8, "normal", 1.0, 512)
    assert hp.eps == pytest.approx(1e-5)


@pytest.mark.parametrize("metadata, problem", [
    ({"general.architecture": "gpt2"}, "architecture 'gpt2' is not supported by the runner (supported: llama, qwen2, bitnet, qwen3, qwen3moe, gemma2, gemma3, phi3)"),
    ({"general.architecture": "llama", "llama.attention.head_count": 8}, "metadata llama.embedding_length is missing"),
    ({"general.architecture": "qwen2", "qwen2.embedding_length": 64, "qwen2.attention.head_count": 8,
      "qwen2.attention.head_count_kv": 3}, "8 attention heads cannot share 3 KV heads"),
    ({"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 8,
      "llama.attention.head_count_kv": np.array([4, 2], np.uint32)},
     "metadata llama.attention.head_count_kv varies by layer, which the runner does not support"),
    ({"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 8,
      "llama.block_count": 1, "llama.rope.scaling.type": "yarn"},
     "RoPE scaling 'yarn' is not supported by the runner (linear and Llama 3's are)"),
])
def test_hparams_from_gguf_problems_are_one_line(metadata, problem):
    from qtool.archs import hparams_from_gguf
    from qtool.errors import QtoolError
    with pytest.raises(QtoolError) as e:
        hparams_from_gguf(metadata)
    assert str(e.value) == problem


def test_checkpoint_biases_only_where_the_architecture_has_them():
    from qtool.archs import ARCHS, gguf_tensor_name
    from qtool.errors import QtoolError
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.bias", ARCHS["qwen2"]) == "blk.3.attn_q.bias"
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj.bias", ARCHS["llama"]) == "blk.3.attn_output.bias"
    with pytest.raises(QtoolError, match="no GGUF equivalent"):
        gguf_tensor_name("model.layers.3.self_attn.o_proj.bias", ARCHS["qwen2"])
    with pytest.raises(QtoolError, match="no GGUF equivalent"):
        gguf_tensor_name("model.layers.0.mlp.up_proj.bias", ARCHS["llama"])
