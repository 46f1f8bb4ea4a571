"""The runner's model: the Llama-family forward pass (GGUF architectures `llama`, `qwen2`, `qwen3`, `qwen3moe`,
`bitnet`, `gemma2`) on a memory-mapped GGUF file. The weights (qtool/weights.py) stay in their stored form and carry their
own products (kernels/matmul.py); the KV cache and attention are qtool/attention.py.

It follows llama.cpp's graph (src/models/llama.cpp, qwen2.cpp, qwen3.cpp, bitnet.cpp) and CPU math:
- RMSNorm: x / sqrt(mean(x²) + eps) with the sum of squares in double, then times the norm weight;
- RoPE in llama.cpp's layout: "normal" (pairs 2i, 2i+1; llama, whose Q/K rows the converter permuted) or NEOX
  (pairs i, i + n_rot/2; qwen2, qwen3, bitnet), angles pos * base^(-2i/n_rot) built by repeated float32
  multiplication as ggml does, divided by `rope_freqs` (Llama 3 scaling) when the file has it, times 1/factor
  for linear scaling;
- grouped-query attention (head h reads KV head h // (n_head / n_head_kv)), scale 1/sqrt(head_dim), causal;
- SwiGLU feed-forward, q/k/v biases when present, output tied to token_embd when output.weight is absent;
- qwen3's per-head RMSNorm of Q and K (one head_dim weight for every head) after the projections, before RoPE,
  when the layer has attn_q_norm / attn_k_norm;
- a mixture of experts when the layer has a router (build_moe_ffn with softmax gating, as llama.cpp's llama and
  qwen3moe graphs call it): router logits → softmax → the n_expert_used most probable experts → their
  probabilities renormalized to sum 1 (both graphs pass norm_w) → the weighted sum of each chosen expert's SwiGLU;
- bitnet's sub-norms when the layer has them (bitnet.cpp): RMSNorm of the attention output before
  attn_output, and of silu(gate) * up before ffn_down;
- gemma2's extras (gemma2.cpp), each said by the hparams or the layer record: embeddings times sqrt(n_embd),
  queries times query_pre_attn_scalar^-1/2, attention scores and output logits soft-capped (cap * tanh(x / cap)),
  a sliding window on the layers the pattern names, post-norms of the attention and feed-forward outputs, and a
  GELU gate (ggml's F16 table) in place of SiLU;
- the KV cache holds K and V as F16 (default, as llama.cpp), F32, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1; queries meet K
  in K's dot-product type (rounded to F16, or quantized to Q8_0 / Q8_1), as ggml's vec_dot does; long prompts go
  through flash attention in tiles.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qtool.archs import HParams, hparams_from_gguf
from qtool.attention import KV_TYPES, KVCache, bytes_per_position, check_kv_type
from qtool.errors import QtoolError
from qtool.formats.gguf_reader import GGUFFile
from qtool.kernels import matmul as mm
from qtool.weights import Embedding, LayerWeights, load_weights

__all__ = ["KV_TYPES", "Model"]

N_BATCH = 512  # tokens per forward pass when evaluating a long prompt


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ss = (x * x).astype(np.float64).sum(axis=-1)
    scale = (np.float32(1.0) / np.sqrt((ss / x.shape[-1]).astype(np.float32) + np.float32(eps))).astype(np.float32)
    return (x * scale[:, None]) * w


KV_MEMORY_FRACTION = 0.5  # of the available memory at most, for the KV cache: weights and activations need the rest


def kv_bytes_per_token(c: HParams, kv_type: str) -> int:
    """Bytes of K and V per cached position over all layers (the cache's own formula; at least 1)."""
    return max(1, bytes_per_position(c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, kv_type))


def max_ctx_for_memory(c: HParams, kv_type: str) -> int:
    """The longest context whose KV cache fits in KV_MEMORY_FRACTION of the available memory (at least 1)."""
    import psutil
    return max(1, int(psutil.virtual_memory().available * KV_MEMORY_FRACTION) // kv_bytes_per_token(c, kv_type))


class Model:
    """A GGUF model ready to evaluate tokens: `eval(tokens)` appends them to the KV cache and returns logits."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, kv_type: str = "f16",
                 threads: int | None = None):
        self.path = Path(path)
        check_kv_type(kv_type)  # before the file is read: a usage error should not wait for the load
        if threads:
            mm.set_threads(threads)
        self.gguf = GGUFFile(self.path)
        try:
            self.cfg = self._hparams()
            self.w = load_weights(self.gguf, self.cfg, self._fail)
        except BaseException:
            self.gguf.close()
            raise
        ctx_max = self.cfg.n_ctx_train or 4096
        self.n_ctx = min(n_ctx, ctx_max) if n_ctx else ctx_max
        self.kv_type = kv_type
        c = self.cfg
        # a file's context_length (2^32-1, 2^40) can ask for a cache of terabytes: cap it by the memory there is
        self.notes: list[str] = []
        fit = max_ctx_for_memory(c, kv_type)
        if self.n_ctx > fit:
            self.notes.append(f"context of {self.n_ctx} tokens capped to {fit}: a larger KV cache would not fit "
                              "in the available memory")
            self.n_ctx = fit
        self.cache = KVCache(c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, self.n_ctx, kv_type)
        self.n_past = 0
        self._tokenizer = None

    def _fail(self, problem: str) -> QtoolError:
        return QtoolError(f"{self.path}: {problem}")

    def _hparams(self) -> HParams:
        try:
            return hparams_from_gguf(self.gguf.metadata, self.gguf.tensors)
        except QtoolError as e:  # archs.py names the problem; the user also needs the file
            raise self._fail(str(e)) from None

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from qtool.tokenizer import Tokenizer
            try:
                tok = Tokenizer.from_metadata(self.gguf.metadata)
            except QtoolError as e:
                raise self._fail(str(e)) from None
            if len(tok.tokens) != self.cfg.n_vocab:  # as llama.cpp: a sampled id must have a token to print
                raise self._fail(f"the vocabulary has {len(tok.tokens)} tokens but token_embd has "
                                 f"{self.cfg.n_vocab} rows")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.gguf.tensors.values())

    def kv_bytes(self, n_tokens: int | None = None) -> int:
        return self.cache.nbytes(self.n_past if n_tokens is None else n_tokens)

    def gguf_types(self) -> list:
        """The ggml types of the file's tensors, each once."""
        return sorted({t.ggml_type for t in self.gguf.tensors.values()})

    def weight_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.gguf.tensors.values():
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + 1
        return out

    def close(self) -> None:
        self.w = None
        self.gguf.close()

    # -- forward -----------------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the compiled kernels of both paths (numba's cache) before anything is timed."""
        if self.n_ctx > mm.BLAS_MIN_TOKENS:
            self.reset()
            self.eval(np.zeros(mm.BLAS_MIN_TOKENS, dtype=np.int64))
            self.eval([0])
            self.reset()

    def reset(self, n_past: int = 0) -> None:
        """Forget the cache from position n_past on."""
        self.n_past = max(0, min(n_past, self.n_past))

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Append tokens at the current position; logits (T, vocab) for every token, or (vocab,) for the last."""
        tokens = np.asarray(tokens, dtype=np.int64).ravel()
        if len(tokens) == 0:
            raise ValueError("no tokens")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise QtoolError(f"token id out of range for a vocabulary of {self.cfg.n_vocab}")
        if self.n_past + len(tokens) > self.n_ctx:
            raise QtoolError(f"context is full ({self.n_ctx} tokens)")
        outs = []
        for s in range(0, len(tokens), N_BATCH):
            chunk = tokens[s:s + N_BATCH]
            last_chunk = s + N_BATCH >= len(tokens)
            lg = self._forward(chunk, all_logits or False, want=all_logits or last_chunk)
            if lg is not None:
                outs.append(lg)
        if all_logits:
            return np.concatenate(outs, axis=0)
        return outs[-1][-1]

    def _forward(self, tokens: np.ndarray, all_logits: bool, want: bool = True) -> np.ndarray | None:
        """One batch of tokens through every layer, appended to the KV cache; logits if `want`."""
        c, w = self.cfg, self.w
        T = len(tokens)
        pos0 = self.n_past
        # the tokens' embedding rows, dequantized: x (T, n_embd) is the residual stream
        x = embed(c, w.token_embd, tokens)
        # RoPE angles of these positions, shared by every layer
        rope = rope_tables(c, w.rope_freqs, np.arange(pos0, pos0 + T))
        for i, L in enumerate(w.layers):
            x = block(c, L, x, self.cache, i, rope, pos0)
        self.n_past = pos0 + T
        if not want:
            return None
        # logits of the last token only, unless every position's are asked for (perplexity)
        if not all_logits:
            x = x[-1:]
        # final norm, then the vocabulary projection
        return _soft_cap(w.output(_rms_norm(x, w.output_norm, c.eps)), c.final_softcap)



# ---- the layer math, shared by Model and by calibration from a checkpoint (qtool/calibrate.py) ----------------
def embed(c: HParams, token_embd: Embedding, tokens: np.ndarray) -> np.ndarray:
    """The residual stream's start (T, n_embd): the tokens' embedding rows, times sqrt(n_embd) when the graph
    scales them (gemma)."""
    x = token_embd(tokens)
    return x * np.float32(c.embd_scale) if c.embd_scale else x


def _soft_cap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap) as ggml computes it (scale by 1/cap, tanh, scale by cap, each in float32); cap 0: x."""
    if not cap:
        return x
    return np.tanh(x * np.float32(1.0 / np.float32(cap))) * np.float32(cap)


class RopeTables(NamedTuple):
    """cos, sin (T, 1, n_rot/2) of the global layers, and `swa` the windowed layers' (cos, sin) when their base
    or scale differs (gemma3), else None."""
    cos: np.ndarray
    sin: np.ndarray
    swa: tuple[np.ndarray, np.ndarray] | None = None


def rope_tables(c: HParams, rope_freqs: np.ndarray | None, positions: np.ndarray) -> RopeTables:
    """The RoPE tables of these positions for every kind of layer the model has (see _rope_angles)."""
    cos, sin = _rope_angles(c.rope_base, c.freq_scale, c.n_rot, rope_freqs, positions)
    swa = None
    if c.swa_layers and c.rope_base_swa and (c.rope_base_swa, c.freq_scale_swa) != (c.rope_base, c.freq_scale):
        swa = _rope_angles(c.rope_base_swa, c.freq_scale_swa, c.n_rot, rope_freqs, positions)
    return RopeTables(cos, sin, swa)


def _rope_angles(base: float, freq_scale: float, n_rot: int, rope_freqs: np.ndarray | None,
                 positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, 1, n_rot/2) of the angles pos * theta_scale^i, with theta_scale = base^(-2/n_rot) in float32
    pow and its powers built by repeated float32 multiplication as ggml does (not pow per pair: the last bits
    differ), / rope_freqs, * freq_scale."""
    half = n_rot // 2
    theta_scale = np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot)))
    theta = positions.astype(np.float32)
    cos = np.empty((len(positions), half), np.float32)
    sin = np.empty((len(positions), half), np.float32)
    fs = np.float32(freq_scale)
    for i in range(half):
        th = theta if rope_freqs is None else (theta / rope_freqs[i]).astype(np.float32)
        th = (fs * th).astype(np.float32)
        cos[:, i] = np.cos(th.astype(np.float64)).astype(np.float32)
        sin[:, i] = np.sin(th.astype(np.float64)).astype(np.float32)
        theta = (theta * theta_scale).astype(np.float32)
    return cos[:, None, :], sin[:, None, :]


def _rope(c: HParams, x: np.ndarray, rope: tuple[np.ndarray, ...]) -> np.ndarray:
    """x (T, heads, head_dim) rotated in place in its first n_rot dims, in the file's pair layout."""
    cos, sin = rope[0], rope[1]
    n_rot = c.n_rot
    if c.rope_mode == "normal":
        x0 = x[..., 0:n_rot:2].copy()
        x1 = x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2] = x0 * cos - x1 * sin
        x[..., 1:n_rot:2] = x0 * sin + x1 * cos
    else:
        h = n_rot // 2
        x0 = x[..., :h].copy()
        x1 = x[..., h:n_rot].copy()
        x[..., :h] = x0 * cos - x1 * sin
        x[..., h:n_rot] = x0 * sin + x1 * cos
    return x


def block(c: HParams, L: LayerWeights, x: np.ndarray, cache: KVCache, i: int, rope: RopeTables,
          pos0: int) -> np.ndarray:
    """Transformer block i on the residual stream x (T, n_embd) at positions pos0..: each half adds to the stream
    what it computes from a normed copy (pre-norm residuals)."""
    if L.window and rope.swa is not None:  # gemma3: the windowed layers rotate with their own base
        rope = rope.swa
    a = _attention(c, L, _rms_norm(x, L.attn_norm, c.eps), cache, i, rope, pos0)
    if L.attn_post_norm is not None:  # gemma2: each half's output is normed again before it is added
        a = _rms_norm(a, L.attn_post_norm, c.eps)
    x = x + a
    f = _feed_forward(c, L, _rms_norm(x, L.ffn_norm, c.eps))
    if L.ffn_post_norm is not None:
        f = _rms_norm(f, L.ffn_post_norm, c.eps)
    return x + f


def _attention(c: HParams, L: LayerWeights, h: np.ndarray, cache: KVCache, i: int,
               rope: tuple[np.ndarray, np.ndarray], pos0: int) -> np.ndarray:
    """Self-attention of the normed stream h (T, n_embd) of layer i: (T, n_embd), to add to the stream."""
    T = h.shape[0]
    # Q, K, V share one conversion of h per activation type (acts)
    acts: dict = {}
    if L.wqkv is not None:  # phi3: one product, Q, K and V its column views (as llama.cpp's build_qkv)
        qkv = L.wqkv(h)
        qd, kd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
    else:
        q, k, v = L.wq(h, acts), L.wk(h, acts), L.wv(h, acts)
    for y, b in ((q, L.bq), (k, L.bk), (v, L.bv)):
        if b is not None:
            y += b
    q, k = q.reshape(T, c.n_head, c.head_dim), k.reshape(T, c.n_head_kv, c.head_dim)
    # qwen3: each head of Q and K RMS-normed on its own, before the rotation
    if L.q_norm is not None:
        q = _rms_norm(q.reshape(-1, c.head_dim), L.q_norm, c.eps).reshape(q.shape)
    if L.k_norm is not None:
        k = _rms_norm(k.reshape(-1, c.head_dim), L.k_norm, c.eps).reshape(k.shape)
    # rotate Q and K by position; V is not rotated
    q, k = _rope(c, q, rope), _rope(c, k, rope)
    if c.q_scale:  # gemma: the rotated queries scaled (query_pre_attn_scalar), the scores then taken as they are
        q = q * np.float32(c.q_scale)
    v = v.reshape(T, c.n_head_kv, c.head_dim_v)
    # K, V into the cache, then the queries over every position so far (or the layer's window of them)
    o = cache.attend(i, q, k, v, pos0, scale=1.0 if c.q_scale else None, softcap=c.attn_softcap, window=L.window)
    if L.attn_sub_norm is not None:
        o = _rms_norm(o, L.attn_sub_norm, c.eps)
    o = L.wo(o)
    if L.bo is not None:
        o += L.bo
    return o


def _swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for very negative gates: silu is then 0
        return gate / (np.float32(1.0) + np.exp(-gate)) * up


GELU_COEF_A, SQRT_2_OVER_PI = np.float32(0.044715), np.float32(0.79788456080286535587989211986876)


def _geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """ggml's CPU geglu: GELU (tanh approximation) looked up in its F16 table (gelu of the gate rounded to F16,
    the result rounded to F16), 0 below -10 and the gate itself above 10, times up."""
    x = gate.astype(np.float16).astype(np.float32)
    half = np.float32(0.5)
    g = (half * x * (np.float32(1) + np.tanh(SQRT_2_OVER_PI * x * (np.float32(1) + GELU_COEF_A * x * x))))
    g = g.astype(np.float16).astype(np.float32)
    g = np.where(gate <= -10, np.float32(0), np.where(gate >= 10, gate, g))
    return g * up


GATES = {"silu": _swiglu, "gelu": _geglu}


def _feed_forward(c: HParams, L: LayerWeights, h: np.ndarray) -> np.ndarray:
    """The gated feed-forward of the normed stream h (T, n_embd): down(act(gate h) * up h), act SiLU or GELU
    (c.ffn_act), the product RMS-normed first when the layer has ffn_sub_norm; a mixture of experts when it has a
    router."""
    if L.ffn_gate_inp is not None:
        return _experts(c, L, h)
    acts: dict = {}
    if L.w_gate is None:  # phi3: ffn_up's rows are the gate's then up's
        gate_up = L.w_up(h)
        n_ff = gate_up.shape[1] // 2
        act = GATES[c.ffn_act](gate_up[:, :n_ff], gate_up[:, n_ff:])
    else:
        act = GATES[c.ffn_act](L.w_gate(h, acts), L.w_up(h, acts))
    if L.ffn_sub_norm is not None:
        act = _rms_norm(act, L.ffn_sub_norm, c.eps)
    return L.w_down(act)


MIN_WEIGHT_SUM = np.float32(6.103515625e-5)  # build_moe_ffn clamps the chosen weights' sum to F16's smallest normal


def _softmax(x: np.ndarray) -> np.ndarray:
    """ggml_soft_max's rows: exp(x - max) in float32, their sum in double, times the float32 reciprocal."""
    e = np.exp(x - x.max(axis=1, keepdims=True)).astype(np.float32)
    return e * (1.0 / e.sum(axis=1, dtype=np.float64)).astype(np.float32)[:, None]


def _experts(c: HParams, L: LayerWeights, h: np.ndarray) -> np.ndarray:
    """build_moe_ffn on the normed stream h (T, n_embd): each token's n_expert_used most probable experts, their
    SwiGLUs weighted by the renormalized probabilities and summed slot by slot as ggml adds them."""
    probs = _softmax(L.ffn_gate_inp(h))  # (T, n_expert)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :c.n_expert_used]  # (T, n_used), most probable first
    w = np.take_along_axis(probs, ids, axis=1)
    w = w / np.maximum(w.sum(axis=1, dtype=np.float64).astype(np.float32), MIN_WEIGHT_SUM)[:, None]
    # every slot reads the token's row; gate and up of one expert share its converted rows
    x, acts = h[:, None, :], {}
    act = _swiglu(L.ffn_gate_exps(x, ids, acts), L.ffn_up_exps(x, ids, acts))  # (T, n_used, n_ff)
    y = L.ffn_down_exps(act, ids) * w[:, :, None]  # (T, n_used, n_embd)
    out = y[:, 0]
    for slot in range(1, ids.shape[1]):
        out = out + y[:, slot]
    return out
