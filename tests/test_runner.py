"""The CPU runner against llama.cpp's measured anchors (../shared/reference/llama-cpp-on-*.md): llama-perplexity
-c 256 on the eval text, scoring the second half of each window."""
from __future__ import annotations

import re

import pytest

from conftest import SHARED
from qtool import perplexity
from qtool.attention import KV_TYPES
from qtool.model import Model


def anchor(model: str) -> float:
    """The F32 perplexity llama.cpp measured, read from the reference note."""
    path = SHARED / "reference" / f"llama-cpp-on-{model}.md"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return float(re.search(r"F32 PPL = ([\d.]+)", path.read_text()).group(1))


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
def test_f32_perplexity_equals_llama_cpp(model, converted, eval_text):
    m = Model(converted(model, "F32"), n_ctx=256)
    try:
        r = perplexity.run(m, eval_text, 256)
    finally:
        m.close()
    assert r.n_chunks == 53
    assert r.perplexity == pytest.approx(anchor(model), rel=2e-4)


def test_run_greedy_generates_the_documented_story(stories260k, converted):
    import json

    from conftest import qtool
    from test_llama_cpp_loads import documented_story
    story = documented_story(stories260k / "README.md")
    proc = qtool("run", converted("stories260K", "F32"), "-p", "Once upon a time", "--temp", "0", "-n", "200",
                 "--json", check=True)
    out = json.loads(proc.stdout)
    text = out["prompt"] + out["completion"]
    n = min(len(text), len(story))
    assert n > 400 and text[:n] == story[:n]
    assert out["decode_tokens_per_s"] > 0 and out["peak_rss_bytes"] > 0


def test_perplexity_command_json(converted, eval_text, tmp_path):
    import json

    from conftest import qtool
    text = tmp_path / "eval.txt"
    text.write_text(eval_text)
    proc = qtool("perplexity", converted("stories260K", "F32"), "--text", text, "--ctx", "256", "--json", check=True)
    d = json.loads(proc.stdout)
    assert d["perplexity"] == pytest.approx(anchor("stories260K"), rel=2e-4)
    for key in ("perplexity_error", "kl_mean", "kl_p99", "top1_agreement", "tokens_per_s", "peak_rss_bytes"):
        assert key in d


def test_run_on_a_non_gguf_is_a_clear_error(tmp_path):
    from conftest import qtool
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    proc = qtool("run", bad, "-p", "hi")
    assert proc.returncode == 1 and "x.gguf" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
def test_f32_logits_and_greedy_text_equal_transformers(model, converted, eval_text):
    """The FP reference: transformers on the original checkpoint. F32 KV cache, as float32 as transformers."""
    import numpy as np
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import shared_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(shared_model(model), torch_dtype=torch.float32)
    m = Model(converted(model, "F32"), n_ctx=256, kv_type="f32")
    try:
        ids = m.tokenizer.encode(eval_text[:1500], add_bos=True)[:256]
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        got = m.eval(ids, all_logits=True)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        prompt = m.tokenizer.encode("Once upon a time", add_bos=True)
        with torch.no_grad():
            hf_text = hf.generate(torch.tensor([prompt]), max_new_tokens=100, do_sample=False)[0].tolist()
        m.reset()
        ours = list(prompt)
        logits = m.eval(prompt)
        while len(ours) < len(hf_text):
            ours.append(int(np.argmax(logits)))
            logits = m.eval(ours[-1:])
        assert ours == hf_text
    finally:
        m.close()


@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_decode_attention_equals_batch_attention(kv_type, converted, eval_text):
    """Tokens fed a few at a time go through the attention kernels that read the KV cache as stored
    (kernels/attention.py); a batch of them through numpy's matmul on the cache converted to float32. Same math, so
    the logits agree to float rounding: bound 1e-4 relative for F16/F32, 5e-3 for the quantized caches, whose codes
    for the new tokens' K and V can round the other way when one token's projection differs from the batch's in
    the last bit, and one flipped code moves every later layer's inputs (measured Q8_0 1.7e-4, Q4_1 2.5e-3 from a
    flip at position 1 of layer 1, the others 0 to 1e-5; a flip is as likely for each type: about 1e-5 per code
    under a 1e-7 relative perturbation). A wrong mask, head mapping or scale is far above either."""
    import numpy as np
    m = Model(converted("stories3M", "F32"), n_ctx=256, kv_type=kv_type)
    try:
        tokens = m.tokenizer.encode(eval_text[:2000], add_bos=True)[:40]
        batch = m.eval(tokens, all_logits=True)
        m.reset()
        m.eval(tokens[:20])  # the batch path fills the first 20 positions, the kernels read them back
        # one token, then chunks of 4 (the causal mask inside a chunk), then one token
        one = np.concatenate([m.eval(tokens[i:j], all_logits=True)
                              for i, j in ((20, 21), (21, 25), (25, 29), (29, 33), (33, 37), (37, 39), (39, 40))])
    finally:
        m.close()
    bound = 1e-4 if kv_type in ("f16", "f32") else 5e-3
    assert np.linalg.norm(one - batch[20:]) / np.linalg.norm(batch[20:]) < bound


@pytest.mark.parametrize("kv_type", ["f16", "q4_1"])
def test_flash_attention_tiles_equal_one_tile(kv_type, converted, eval_text, monkeypatch):
    """The prompt path's online softmax over tiles of 16 queries x 32 keys (120 tokens: partial tiles, masked
    and unmasked ones) gives the logits of a single tile to float rounding (measured 8e-6; 1.4e-5 for Q4_1,
    whose codes can flip)."""
    import numpy as np

    from qtool import attention
    m = Model(converted("stories3M", "F32"), n_ctx=256, kv_type=kv_type)
    try:
        tokens = m.tokenizer.encode(eval_text[:3000], add_bos=True)[:120]
        whole = m.eval(tokens, all_logits=True)
        m.reset()
        monkeypatch.setattr(attention, "Q_TILE", 16)
        monkeypatch.setattr(attention, "KV_TILE", 32)
        tiled = m.eval(tokens, all_logits=True)
    finally:
        m.close()
    assert np.linalg.norm(tiled - whole) / np.linalg.norm(whole) < 1e-4


def _window_perplexity(logits, tokens) -> float:
    import numpy as np
    lp = logits - logits.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    half = len(tokens) // 2  # llama-perplexity scores the second half
    return float(np.exp(-lp[np.arange(half - 1, len(tokens) - 1), tokens[half:]].mean()))


@pytest.mark.parametrize("kv_type", [k for k in KV_TYPES if k != "f32"])
def test_kv_cache_types_equal_llama_cpp(kv_type, converted, eval_text):
    """Each cache type against llama.cpp with the same -ctk/-ctv (flash attention, which a quantized V needs), on
    one 256-token window of stories3M F32: logits within 5e-3 relative (measured 3e-5 F16 … 2.0e-3 Q4_1, whose
    Q8_1 query sums llama.cpp rounds to fp16) and the window's perplexity within 1e-3 (measured at most 4e-4),
    where the cache types themselves move it by up to 1%."""
    import numpy as np
    from llama_oracle import need_llama_cpp

    from qtool.formats.constants import KV_CACHE_TYPES
    llama_cpp = need_llama_cpp()
    path = converted("stories3M", "F32")
    m = Model(path, n_ctx=256, kv_type=kv_type)
    try:
        tokens = m.tokenizer.encode(eval_text[:3000], add_bos=True)[:256]
        ours = m.eval(tokens, all_logits=True)
    finally:
        m.close()
    t = int(KV_CACHE_TYPES[kv_type])
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=t, type_v=t, flash_attn=True)
    try:
        llm.eval(tokens)
        ref = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 5e-3
    assert _window_perplexity(ours, tokens) == pytest.approx(_window_perplexity(ref, tokens), rel=1e-3)


def test_weights_are_typed_records_and_a_missing_tensor_is_named(converted):
    """The layer record holds every weight at its documented shape; loading names the file and the tensor that
    is absent."""
    from qtool.errors import QtoolError
    from qtool.weights import load_weights
    m = Model(converted("stories260K", "Q8_0"), n_ctx=16)
    try:
        c = m.cfg
        assert len(m.w.layers) == c.n_layer
        L = m.w.layers[1]
        qd, kd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        shapes = {name: (getattr(L, name).n_out, getattr(L, name).n_in)
                  for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
        n_ff = L.w_gate.n_out
        assert shapes == {"wq": (qd, c.n_embd), "wk": (kd, c.n_embd), "wv": (kd, c.n_embd), "wo": (c.n_embd, qd),
                          "w_gate": (n_ff, c.n_embd), "w_up": (n_ff, c.n_embd), "w_down": (c.n_embd, n_ff)}
        assert L.attn_norm.shape == L.ffn_norm.shape == (c.n_embd,) and L.bq is None
        assert m.w.token_embd([3, 4]).shape == (2, c.n_embd)
        del m.gguf.tensors["blk.1.ffn_up.weight"]
        with pytest.raises(QtoolError, match=r"stories260K.*: tensor blk\.1\.ffn_up\.weight is missing"):
            load_weights(m.gguf, m.cfg, m._fail)
    finally:
        m.close()
