"""Each supported architecture end to end: a synthetic checkpoint converted by qtool, loaded by llama.cpp,
gives the logits transformers gives on the original (which exercises metadata keys, Q/K permutation, biases,
GQA, tied embeddings and Llama-3 rope scaling)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import qtool
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_logits_equal_transformers(case, tmp_path):
    llama_cpp = need_llama_cpp()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params = dict(CASES[case])
    rope_scaling = params.pop("rope_scaling", None)
    src = make_checkpoint(tmp_path / "ckpt", hidden=128, layers=2, heads=4, intermediate=256, vocab=512,
                          dtype="f32", seed=7, **params)
    cfg_path = Path(src) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
        cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    qtool("convert", src, "-o", out, "--type", "F32", "--quiet", check=True)

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
