"""The runner's model: the Llama-family forward pass (GGUF architectures `llama` and `qwen2`) on a memory-mapped
GGUF file, weights left in their stored form and multiplied by kernels/matmul.py.

It follows llama.cpp's graph (src/models/llama.cpp, qwen2.cpp) and CPU math:
- RMSNorm: x / sqrt(mean(x²) + eps) with the sum of squares in double, then times the norm weight;
- RoPE in llama.cpp's layout: "normal" (pairs 2i, 2i+1; llama, whose Q/K rows the converter permuted) or NEOX
  (pairs i, i + n_rot/2; qwen2), angles pos * base^(-2i/n_rot) built by repeated float32 multiplication as ggml
  does, divided by `rope_freqs` (Llama 3 scaling) when the file has it, times 1/factor for linear scaling;
- grouped-query attention (head h reads KV head h // (n_head / n_head_kv)), scale 1/sqrt(head_dim), causal;
- SwiGLU feed-forward, q/k/v biases when present, output tied to token_embd when output.weight is absent;
- the KV cache holds K and V as F16 (default, as llama.cpp), Q8_0 or F32; queries meet K in K's type (rounded to
  F16, or quantized to Q8_0), as ggml's vec_dot does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import GGMLType
from qtool.formats.gguf_reader import GGUFFile

ARCHS = {"llama": "normal", "qwen2": "neox"}  # GGUF architecture → RoPE layout
KV_TYPES = ("f16", "q8_0", "f32")
N_BATCH = 512  # tokens per forward pass when evaluating a long prompt


@dataclass(frozen=True)
class Config:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # K and Q
    head_dim_v: int
    n_ff: int
    eps: float
    rope_base: float
    n_rot: int
    rope_mode: str  # "normal" | "neox"
    freq_scale: float
    n_ctx_train: int


class KVCache:
    """Per layer K and V as (n_head_kv, n_ctx, head_dim): float16, float32, or int8 codes + fp16 scales per 32."""

    def __init__(self, cfg: Config, n_ctx: int, kv_type: str):
        self.kv_type = kv_type
        self.n_ctx = n_ctx
        L, H = cfg.n_layer, cfg.n_head_kv
        # np.zeros memory is committed only as positions are written
        if kv_type == "q8_0":
            for d in (cfg.head_dim, cfg.head_dim_v):
                if d % 32:
                    raise QtoolError(f"a q8_0 KV cache needs head sizes that are multiples of 32 (this model: {d})")
            self.k = np.zeros((L, H, n_ctx, cfg.head_dim), np.int8)
            self.v = np.zeros((L, H, n_ctx, cfg.head_dim_v), np.int8)
            self.ks = np.zeros((L, H, n_ctx, cfg.head_dim // 32), np.float16)
            self.vs = np.zeros((L, H, n_ctx, cfg.head_dim_v // 32), np.float16)
        else:
            dt = np.float16 if kv_type == "f16" else np.float32
            self.k = np.zeros((L, H, n_ctx, cfg.head_dim), dt)
            self.v = np.zeros((L, H, n_ctx, cfg.head_dim_v), dt)
            self.ks = self.vs = None
        per_token = (self.k[:, :, 0].nbytes + self.v[:, :, 0].nbytes
                     + (self.ks[:, :, 0].nbytes + self.vs[:, :, 0].nbytes if self.ks is not None else 0))
        self.bytes_per_token = per_token

    def nbytes(self, n_tokens: int) -> int:
        return self.bytes_per_token * n_tokens

    def store(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k (T, H, hd), v (T, H, hd_v) float32 at positions pos0.."""
        T = k.shape[0]
        if self.kv_type == "q8_0":
            for src, codes, scales in ((k, self.k, self.ks), (v, self.v, self.vs)):
                c, s = _q8_0(src.transpose(1, 0, 2))
                codes[layer, :, pos0:pos0 + T] = c
                scales[layer, :, pos0:pos0 + T] = s
        else:
            self.k[layer, :, pos0:pos0 + T] = k.transpose(1, 0, 2)
            self.v[layer, :, pos0:pos0 + T] = v.transpose(1, 0, 2)

    def attend(self, layer: int, q: np.ndarray, n: int, pos0: int, T: int, scale: np.float32,
               out: np.ndarray) -> None:
        """Attention of queries q (Hkv, rows, hd) over positions 0..n-1 into out, reading K and V as stored."""
        from qtool.kernels.attention import attend
        if self.kv_type == "q8_0":
            attend(q, 1, self.k[layer], self.ks[layer].view(np.uint16), self.v[layer], self.vs[layer].view(np.uint16),
                   n, pos0, T, scale, out)
        elif self.kv_type == "f16":
            k, v = self.k[layer].view(np.uint16), self.v[layer].view(np.uint16)
            attend(q, 0, k, k, v, v, n, pos0, T, scale, out)
        else:
            attend(q, 2, self.k[layer], self.k[layer], self.v[layer], self.v[layer], n, pos0, T, scale, out)

    def load(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K, V of positions 0..n-1 as float32 (H, n, hd)."""
        if self.kv_type == "q8_0":
            out = []
            for codes, scales in ((self.k, self.ks), (self.v, self.vs)):
                c = codes[layer, :, :n].astype(np.float32)
                H, _, d = c.shape
                s = scales[layer, :, :n].astype(np.float32)
                out.append((c.reshape(H, n, d // 32, 32) * s[..., None]).reshape(H, n, d))
            return out[0], out[1]
        return self.k[layer, :, :n].astype(np.float32), self.v[layer, :, :n].astype(np.float32)


def _q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 along the last axis (as ggml's quantize_row_q8_0): int8 codes and fp16 scales per 32."""
    shp = x.shape
    b = x.reshape(*shp[:-1], shp[-1] // 32, 32).astype(np.float32)
    amax = np.abs(b).max(axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv[..., None]).astype(np.int8)
    return q.reshape(shp), d.astype(np.float16)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ss = (x * x).astype(np.float64).sum(axis=-1)
    scale = (np.float32(1.0) / np.sqrt((ss / x.shape[-1]).astype(np.float32) + np.float32(eps))).astype(np.float32)
    return (x * scale[:, None]) * w


class Model:
    """A GGUF model ready to evaluate tokens: `eval(tokens)` appends them to the KV cache and returns logits."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, kv_type: str = "f16",
                 threads: int | None = None):
        from qtool.kernels import matmul as mm
        self._mm = mm
        self.path = Path(path)
        if kv_type not in KV_TYPES:
            raise QtoolError(f"--kv-type {kv_type!r}: use one of {', '.join(KV_TYPES)}")
        if threads:
            mm.set_threads(threads)
        self.gguf = GGUFFile(self.path)
        try:
            self.cfg = self._config()
            self._load_weights()
        except BaseException:
            self.gguf.close()
            raise
        ctx_max = self.cfg.n_ctx_train or 4096
        self.n_ctx = min(n_ctx, ctx_max) if n_ctx else ctx_max
        self.kv_type = kv_type
        self.cache = KVCache(self.cfg, self.n_ctx, kv_type)
        self.n_past = 0
        self._tokenizer = None
        self._rope_theta0 = self._rope_base_angles()

    # -- loading ---------------------------------------------------------------------------------------------------
    def _fail(self, problem: str) -> QtoolError:
        return QtoolError(f"{self.path}: {problem}")

    def _config(self) -> Config:
        g = self.gguf
        arch = g.get("general.architecture")
        if arch not in ARCHS:
            raise self._fail(f"architecture {arch!r} is not supported by the runner (supported: "
                             f"{', '.join(ARCHS)})")

        def key(name, default=None, required=False):
            v = g.get(f"{arch}.{name}", default)
            if v is None and required:
                raise self._fail(f"metadata {arch}.{name} is missing")
            if isinstance(v, np.ndarray):  # per-layer arrays: only uniform ones are supported
                if v.size == 0 or not np.all(v == v.flat[0]):
                    raise self._fail(f"metadata {arch}.{name} varies by layer, which the runner does not support")
                v = v.flat[0].item()
            return v

        n_embd = int(key("embedding_length", required=True))
        n_head = int(key("attention.head_count", required=True))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise self._fail(f"{n_head} attention heads cannot share {n_head_kv} KV heads")
        head_dim = int(key("attention.key_length", n_embd // n_head))
        head_dim_v = int(key("attention.value_length", head_dim))
        n_rot = int(key("rope.dimension_count", head_dim))
        if n_rot % 2 or n_rot > head_dim:
            raise self._fail(f"rope.dimension_count {n_rot} does not fit head size {head_dim}")
        freq_scale = 1.0
        stype = key("rope.scaling.type")
        if stype in ("linear",):
            factor = float(key("rope.scaling.factor", 1.0) or 1.0)
            freq_scale = 1.0 / factor if factor else 1.0
        elif stype not in (None, "none"):
            raise self._fail(f"RoPE scaling {stype!r} is not supported by the runner (linear and Llama 3's are)")
        emb = g.tensors.get("token_embd.weight")
        if emb is None:
            raise self._fail("tensor token_embd.weight is missing")
        return Config(arch=arch, n_vocab=emb.shape[0], n_embd=n_embd, n_layer=int(key("block_count", required=True)),
                      n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
                      n_ff=int(key("feed_forward_length", 0)),
                      eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                      rope_base=float(key("rope.freq_base", 10000.0)), n_rot=n_rot, rope_mode=ARCHS[arch],
                      freq_scale=freq_scale, n_ctx_train=int(key("context_length", 0) or 0))

    def _tensor(self, name: str, shape: tuple[int, ...] | None, required: bool = True):
        t = self.gguf.tensors.get(name)
        if t is None:
            if required:
                raise self._fail(f"tensor {name} is missing")
            return None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self._fail(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def _vector(self, name: str, n: int, required: bool = True) -> np.ndarray | None:
        t = self._tensor(name, (n,), required)
        if t is None:
            return None
        if t.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            raise self._fail(f"tensor {name} has type {t.ggml_type.name}; norms and biases must be F32/F16/BF16")
        return self._mm.dequantize_rows(t.ggml_type, self.gguf.array(name).reshape(1, n), n)[0]

    def _matrix(self, name: str, n_out: int, n_in: int, required: bool = True):
        t = self._tensor(name, (n_out, n_in), required)
        if t is None:
            return None
        why = self._mm.check_type(t.ggml_type, n_in)
        if why:
            raise self._fail(f"tensor {name}: {why}")
        data = self.gguf.array(name)
        if t.ggml_type in (GGMLType.F16, GGMLType.BF16):
            data = data.view(np.uint16)
        w = self._mm.Weight(name, t.ggml_type, data, n_out, n_in)
        if w.planes is not None:  # repacked into memory: the file's pages are no longer needed
            self.gguf.release(name)
        return w

    def _load_weights(self) -> None:
        c = self.cfg
        qd, kd, vd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        emb = self._tensor("token_embd.weight", (c.n_vocab, c.n_embd))
        if emb.ggml_type not in self._mm.SUPPORTED:
            raise self._fail(f"tensor token_embd.weight: type {emb.ggml_type.name} is not supported by the runner")
        data = self.gguf.array("token_embd.weight")
        # looked up a few rows at a time, so read where it lies in the memory map
        self.tok_embd = (emb.ggml_type, data.view(np.uint16) if emb.ggml_type in (GGMLType.F16, GGMLType.BF16)
                         else data)
        self.output_norm = self._vector("output_norm.weight", c.n_embd)
        out = self._matrix("output.weight", c.n_vocab, c.n_embd, required=False)
        self.output = out if out is not None else self._matrix("token_embd.weight", c.n_vocab, c.n_embd)
        self.tied = out is None
        ff = self._tensor("rope_freqs.weight", (c.n_rot // 2,), required=False)
        self.rope_freqs = self._vector("rope_freqs.weight", c.n_rot // 2) if ff is not None else None
        self.layers = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            gate = self._tensor(p + "ffn_gate.weight", None)
            n_ff = gate.shape[0]
            self.layers.append(dict(
                attn_norm=self._vector(p + "attn_norm.weight", c.n_embd),
                wq=self._matrix(p + "attn_q.weight", qd, c.n_embd),
                wk=self._matrix(p + "attn_k.weight", kd, c.n_embd),
                wv=self._matrix(p + "attn_v.weight", vd, c.n_embd),
                bq=self._vector(p + "attn_q.bias", qd, required=False),
                bk=self._vector(p + "attn_k.bias", kd, required=False),
                bv=self._vector(p + "attn_v.bias", vd, required=False),
                wo=self._matrix(p + "attn_output.weight", c.n_embd, qd),
                bo=self._vector(p + "attn_output.bias", c.n_embd, required=False),
                ffn_norm=self._vector(p + "ffn_norm.weight", c.n_embd),
                gate=self._matrix(p + "ffn_gate.weight", n_ff, c.n_embd),
                up=self._matrix(p + "ffn_up.weight", n_ff, c.n_embd),
                down=self._matrix(p + "ffn_down.weight", c.n_embd, n_ff),
            ))

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from qtool.tokenizer import Tokenizer
            try:
                self._tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
            except QtoolError as e:
                raise self._fail(str(e)) from None
        return self._tokenizer

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.gguf.tensors.values())

    def kv_bytes(self, n_tokens: int | None = None) -> int:
        return self.cache.nbytes(self.n_past if n_tokens is None else n_tokens)

    def weight_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.gguf.tensors.values():
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + 1
        return out

    def close(self) -> None:
        self.layers = []
        self.gguf.close()

    # -- forward -----------------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the compiled kernels of both paths (numba's cache) before anything is timed."""
        if self.n_ctx > self._mm.BLAS_MIN_TOKENS:
            self.reset()
            self.eval(np.zeros(self._mm.BLAS_MIN_TOKENS, dtype=np.int64))
            self.eval([0])
            self.reset()

    def reset(self, n_past: int = 0) -> None:
        """Forget the cache from position n_past on."""
        self.n_past = max(0, min(n_past, self.n_past))

    def _rope_base_angles(self) -> np.ndarray:
        """Per rotated pair i: theta_scale^i as ggml builds it (repeated float32 multiplication), / freq factors."""
        c = self.cfg
        theta_scale = np.float32(np.power(np.float32(c.rope_base), np.float32(-2.0) / np.float32(c.n_rot)))
        return theta_scale  # kept as the step; angles are built per position in _rope_tables

    def _rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        half = c.n_rot // 2
        theta = positions.astype(np.float32)
        cos = np.empty((len(positions), half), np.float32)
        sin = np.empty((len(positions), half), np.float32)
        fs = np.float32(c.freq_scale)
        for i in range(half):
            th = theta if self.rope_freqs is None else (theta / self.rope_freqs[i]).astype(np.float32)
            th = (fs * th).astype(np.float32)
            cos[:, i] = np.cos(th.astype(np.float64)).astype(np.float32)
            sin[:, i] = np.sin(th.astype(np.float64)).astype(np.float32)
            theta = (theta * self._rope_theta0).astype(np.float32)
        return cos[:, None, :], sin[:, None, :]

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x (T, heads, head_dim) rotated in place in the first n_rot dims."""
        n_rot = self.cfg.n_rot
        if self.cfg.rope_mode == "normal":
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

    def _linear_group(self, ws, h: np.ndarray) -> list[np.ndarray]:
        """Several weights on the same input: the input is converted once per vec_dot type."""
        acts = {}
        out = []
        for w in ws:
            kind = self._mm.VEC_DOT_TYPE[w.ggml_type]
            if kind not in acts:
                acts[kind] = self._mm.Act(kind, h)
            out.append(self._mm.linear(w, h, acts[kind]))
        return out

    def _attention(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
        c = self.cfg
        T = q.shape[0]
        self.cache.store(layer, pos0, k, v)
        n = pos0 + T
        g = c.n_head // c.n_head_kv
        qh = q.transpose(1, 0, 2).reshape(c.n_head_kv, g * T, c.head_dim)
        if self.kv_type == "f16":
            qh = self._mm.round_f16(qh)
        elif self.kv_type == "q8_0":
            qh = self._mm.Act("q8_0", qh.reshape(-1, c.head_dim)).dequantized().reshape(qh.shape)
        scale = np.float32(1.0 / np.sqrt(np.float32(c.head_dim)))
        if T < self._mm.BLAS_MIN_TOKENS:  # decoding: read the cache as stored
            o = np.empty((c.n_head_kv, g * T, c.head_dim_v), np.float32)
            self.cache.attend(layer, np.ascontiguousarray(qh, dtype=np.float32), n, pos0, T, scale, o)
            return o.reshape(c.n_head, T, c.head_dim_v).transpose(1, 0, 2).reshape(T, c.n_head * c.head_dim_v)
        K, V = self.cache.load(layer, n)  # (Hkv, n, hd)
        scores = np.matmul(qh, K.transpose(0, 2, 1))  # (Hkv, g*T, n)
        scores *= scale
        scores = scores.reshape(c.n_head_kv, g, T, n)
        if T > 1 or pos0 + T < n:
            mask = np.arange(n)[None, :] > (pos0 + np.arange(T))[:, None]
            scores[:, :, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        o = np.matmul(scores.reshape(c.n_head_kv, g * T, n), V)  # (Hkv, g*T, hd_v)
        return o.reshape(c.n_head, T, c.head_dim_v).transpose(1, 0, 2).reshape(T, c.n_head * c.head_dim_v)

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
        c = self.cfg
        mm = self._mm
        T = len(tokens)
        pos0 = self.n_past
        x = mm.embedding_rows(*self.tok_embd, tokens, c.n_embd)
        cos, sin = self._rope_tables(np.arange(pos0, pos0 + T))
        for i, L in enumerate(self.layers):
            h = _rms_norm(x, L["attn_norm"], c.eps)
            q, k, v = self._linear_group((L["wq"], L["wk"], L["wv"]), h)
            if L["bq"] is not None:
                q += L["bq"]
            if L["bk"] is not None:
                k += L["bk"]
            if L["bv"] is not None:
                v += L["bv"]
            q = self._rope(q.reshape(T, c.n_head, c.head_dim), cos, sin)
            k = self._rope(k.reshape(T, c.n_head_kv, c.head_dim), cos, sin)
            v = v.reshape(T, c.n_head_kv, c.head_dim_v)
            attn = self._attention(i, q, k, v, pos0)
            o = mm.linear(L["wo"], attn)
            if L["bo"] is not None:
                o += L["bo"]
            x = x + o
            h = _rms_norm(x, L["ffn_norm"], c.eps)
            gate, up = self._linear_group((L["gate"], L["up"]), h)
            with np.errstate(over="ignore"):
                act = gate / (np.float32(1.0) + np.exp(-gate)) * up
            x = x + mm.linear(L["down"], act)
        self.n_past = pos0 + T
        if not want:
            return None
        if not all_logits:
            x = x[-1:]
        x = _rms_norm(x, self.output_norm, c.eps)
        return mm.linear(self.output, x)
