"""The runner's weights as typed records (llama2.c's TransformerWeights), loaded from a memory-mapped GGUF file
under the names of formats/constants.py's TENSOR_NAMES.

Matrices are `qtool.kernels.matmul.Weight` objects that carry their own product (`w(x, acts)` is x @ W.T in
llama.cpp's math for the weight's type), so the forward pass never looks at a type. Shapes are numpy's
(rows, columns) = (out, in); GGUF lists them the other way round. In the comments qd = n_head * head_dim,
kd = n_head_kv * head_dim, vd = n_head_kv * head_dim_v. A mixture-of-experts layer has a router and three
`Experts` (a stacked tensor as one Weight per expert) in place of the dense SwiGLU weights.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qtool.archs import ARCHS, HParams
from qtool.errors import QtoolError
from qtool.formats.constants import GGMLType, ModelTensor as M, tensor_name
from qtool.formats.gguf_reader import GGUFFile
from qtool.kernels import matmul as mm
from qtool.kernels.matmul import Weight


class Experts:
    """A stacked (n_expert, n_out, n_in) tensor, one Weight per expert's 2-D slice: ggml_mul_mat_id's product.
    The tokens routed to an expert go through its Weight as one batch, so a prompt stays batched."""
    __slots__ = ("name", "experts", "n_out", "n_in")

    def __init__(self, name: str, experts: list[Weight]):
        self.name, self.experts = name, experts
        self.n_out, self.n_in = experts[0].n_out, experts[0].n_in

    def __call__(self, x: np.ndarray, ids: np.ndarray, acts: dict | None = None) -> np.ndarray:
        """x (T, n_x, n_in), n_x 1 (every slot reads the token's row) or n_used; ids (T, n_used) the experts each
        token was routed to → (T, n_used, n_out). `acts`, shared by the Experts applied to the same x and ids,
        keeps each expert's converted input (expert → the Weight's acts dict)."""
        out = np.empty((*ids.shape, self.n_out), np.float32)
        for e in np.unique(ids):
            t, slot = np.nonzero(ids == e)
            rows = np.ascontiguousarray(x[t, slot % x.shape[1]])
            out[t, slot] = self.experts[e](rows, None if acts is None else acts.setdefault(int(e), {}))
        return out


@dataclass
class LayerWeights:
    """One transformer block."""
    attn_norm: np.ndarray  # (n_embd,) RMSNorm weight before attention
    wq: Weight | None  # (qd, n_embd) queries (None when fused into wqkv)
    wk: Weight | None  # (kd, n_embd) keys
    wv: Weight | None  # (vd, n_embd) values
    wo: Weight  # (n_embd, qd) attention output
    ffn_norm: np.ndarray  # (n_embd,) RMSNorm weight before the feed-forward
    w_gate: Weight | None = None  # (n_ff, n_embd) SwiGLU gate (dense layers; None when fused into w_up)
    w_up: Weight | None = None  # (n_ff, n_embd) SwiGLU up; (2 n_ff, n_embd) gate rows then up rows when fused
    w_down: Weight | None = None  # (n_embd, n_ff) SwiGLU down
    ffn_gate_inp: Weight | None = None  # (n_expert, n_embd) router logits (mixture-of-experts layers)
    ffn_gate_exps: Experts | None = None  # (n_expert, n_ff, n_embd) each expert's SwiGLU gate
    ffn_up_exps: Experts | None = None  # (n_expert, n_ff, n_embd) each expert's SwiGLU up
    ffn_down_exps: Experts | None = None  # (n_expert, n_embd, n_ff) each expert's SwiGLU down
    bq: np.ndarray | None = None  # (qd,) biases, when the file has them (qwen2: q, k, v)
    bk: np.ndarray | None = None  # (kd,)
    bv: np.ndarray | None = None  # (vd,)
    bo: np.ndarray | None = None  # (n_embd,)
    attn_sub_norm: np.ndarray | None = None  # (n_embd,) RMSNorm of the attention output before wo (bitnet)
    ffn_sub_norm: np.ndarray | None = None  # (n_ff,) RMSNorm of silu(gate) * up before w_down (bitnet)
    q_norm: np.ndarray | None = None  # (head_dim,) RMSNorm of each query head before RoPE (qwen3)
    k_norm: np.ndarray | None = None  # (head_dim,) RMSNorm of each key head before RoPE (qwen3)
    attn_post_norm: np.ndarray | None = None  # (n_embd,) RMSNorm of the attention output before the add (gemma2)
    ffn_post_norm: np.ndarray | None = None  # (n_embd,) RMSNorm of the feed-forward output before the add (gemma2)
    wqkv: Weight | None = None  # (qd + kd + vd, n_embd) Q, K and V in one matrix, when the file fuses them (phi3)
    window: int = 0  # a sliding-window layer's window (queries see that many newest positions); 0: all of them


class ScaledWeight:
    """A Weight times the one number of its `.scale` tensor, as llama.cpp's build_lora_mm multiplies the product
    (bitnet files from other converters store ternary codes and each projection's scale apart)."""
    __slots__ = ("inner", "scale")

    def __init__(self, inner: Weight, scale: np.float32):
        self.inner, self.scale = inner, np.float32(scale)

    def __call__(self, x: np.ndarray, acts: dict | None = None) -> np.ndarray:
        return self.inner(x, acts) * self.scale

    def __getattr__(self, attr: str):
        return getattr(self.inner, attr)


@dataclass
class Embedding:
    """The token embedding as stored: a few rows are looked up per call, so it stays in the memory map."""
    ggml_type: GGMLType
    data: np.ndarray  # (n_vocab, row) as stored: packed bytes, fp16/bf16 bits as uint16, or float32
    n_embd: int

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 (T, n_embd)."""
        return mm.embedding_rows(self.ggml_type, self.data, ids, self.n_embd)


@dataclass
class ModelWeights:
    """Everything the forward pass reads besides the hparams."""
    token_embd: Embedding  # (n_vocab, n_embd)
    layers: list[LayerWeights]  # n_layer blocks
    output_norm: np.ndarray  # (n_embd,) final RMSNorm weight
    output: Weight  # (n_vocab, n_embd) logits; token_embd's tensor when tied
    tied: bool  # the file has no output.weight
    rope_freqs: np.ndarray | None  # (n_rot / 2,) Llama 3 frequency divisors, when the file has them


def _as_stored(ggml_type: GGMLType, data: np.ndarray) -> np.ndarray:
    """The memory-mapped array in the form the kernels read: fp16/bf16 as uint16 bits."""
    return data.view(np.uint16) if ggml_type in (GGMLType.F16, GGMLType.BF16) else data


class _Loader:
    def __init__(self, gguf: GGUFFile, fail: Callable[[str], QtoolError]):
        self.gguf, self.fail = gguf, fail

    def tensor(self, name: str, shape: tuple[int, ...] | None, required: bool = True):
        t = self.gguf.tensors.get(name)
        if t is None:
            if required:
                raise self.fail(f"tensor {name} is missing")
            return None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.fail(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def vector(self, name: str, n: int, required: bool = True) -> np.ndarray | None:
        """A norm weight or bias, as float32 in memory (small, and added to every token)."""
        t = self.tensor(name, (n,), required)
        if t is None:
            return None
        if t.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            raise self.fail(f"tensor {name} has type {t.ggml_type.name}; norms and biases must be F32/F16/BF16")
        return mm.dequantize_rows(t.ggml_type, self.gguf.array(name).reshape(1, n), n)[0]

    def matrix(self, name: str, n_out: int, n_in: int, required: bool = True) -> Weight | None:
        t = self.tensor(name, (n_out, n_in), required)
        if t is None:
            return None
        why = mm.check_type(t.ggml_type, n_in)
        if why:
            raise self.fail(f"tensor {name}: {why}")
        w = Weight(name, t.ggml_type, _as_stored(t.ggml_type, self.gguf.array(name)), n_out, n_in)
        if w.planes is not None:  # repacked into memory: the file's pages are no longer needed
            self.gguf.release(name)
        scale = self.vector(name.removesuffix(".weight") + ".scale", 1, required=False)
        return w if scale is None else ScaledWeight(w, scale[0])

    def experts(self, name: str, n_expert: int, n_out: int, n_in: int) -> Experts:
        t = self.tensor(name, (n_expert, n_out, n_in))
        why = mm.check_type(t.ggml_type, n_in)
        if why:
            raise self.fail(f"tensor {name}: {why}")
        # float: (n_expert, n_out, n_in); quantized: packed rows, n_out per expert
        data = _as_stored(t.ggml_type, self.gguf.array(name)).reshape(n_expert, n_out, -1)
        ws = [Weight(name, t.ggml_type, data[e], n_out, n_in) for e in range(n_expert)]
        if ws[0].planes is not None:
            self.gguf.release(name)
        return Experts(name, ws)

    def _feed_forward(self, cfg: HParams, i: int) -> dict:
        """The layer's feed-forward weights: dense, or a router and experts when the file has a router."""
        c = cfg
        router = tensor_name(M.FFN_GATE_INP, i)
        if ARCHS[c.arch].fused_gate_up:  # ffn_up: the gate's rows, then up's (2 n_ff of them)
            n_ff = c.n_ff
            return dict(w_up=self.matrix(tensor_name(M.FFN_UP, i), 2 * n_ff, c.n_embd),
                        w_down=self.matrix(tensor_name(M.FFN_DOWN, i), c.n_embd, n_ff), n_ff=n_ff)
        if self.tensor(router, None, required=False) is None:
            n_ff = self.tensor(tensor_name(M.FFN_GATE, i), None).shape[0]  # the tensor decides, as llama.cpp
            mat = lambda kind, n_out, n_in: self.matrix(tensor_name(kind, i), n_out, n_in)  # noqa: E731
            return dict(w_gate=mat(M.FFN_GATE, n_ff, c.n_embd), w_up=mat(M.FFN_UP, n_ff, c.n_embd),
                        w_down=mat(M.FFN_DOWN, c.n_embd, n_ff), n_ff=n_ff)
        if not c.n_expert:
            raise self.fail(f"tensor {router} is a mixture-of-experts router, but the metadata counts no experts")
        gate = self.tensor(tensor_name(M.FFN_GATE_EXP, i), None)
        n_ff = gate.shape[1] if len(gate.shape) == 3 else 0  # a wrong rank is reported by experts()
        exps = lambda kind, n_out, n_in: self.experts(tensor_name(kind, i), c.n_expert, n_out, n_in)  # noqa: E731
        return dict(ffn_gate_inp=self.matrix(router, c.n_expert, c.n_embd),
                    ffn_gate_exps=exps(M.FFN_GATE_EXP, n_ff, c.n_embd), ffn_up_exps=exps(M.FFN_UP_EXP, n_ff, c.n_embd),
                    ffn_down_exps=exps(M.FFN_DOWN_EXP, c.n_embd, n_ff), n_ff=n_ff)

    def layer(self, cfg: HParams, i: int) -> LayerWeights:
        c = cfg
        qd, kd, vd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        mat = lambda kind, n_out, n_in: self.matrix(tensor_name(kind, i), n_out, n_in)  # noqa: E731
        bias = lambda kind, n: self.vector(tensor_name(kind, i, "bias"), n, required=False)  # noqa: E731
        ffn = self._feed_forward(c, i)
        n_ff = ffn.pop("n_ff")
        # Q, K and V fused when the file has attn_qkv (llama.cpp's create_tensor_qkv), else apart
        fused = self.tensor(tensor_name(M.ATTN_QKV, i), None, required=False) is not None
        qkv = (dict(wqkv=mat(M.ATTN_QKV, qd + kd + vd, c.n_embd), wq=None, wk=None, wv=None) if fused else
               dict(wq=mat(M.ATTN_Q, qd, c.n_embd), wk=mat(M.ATTN_K, kd, c.n_embd), wv=mat(M.ATTN_V, vd, c.n_embd)))
        return LayerWeights(
            attn_norm=self.vector(tensor_name(M.ATTN_NORM, i), c.n_embd), **qkv,
            wo=mat(M.ATTN_OUT, c.n_embd, qd),
            ffn_norm=self.vector(tensor_name(M.FFN_NORM, i), c.n_embd), **ffn,
            bq=bias(M.ATTN_Q, qd), bk=bias(M.ATTN_K, kd), bv=bias(M.ATTN_V, vd), bo=bias(M.ATTN_OUT, c.n_embd),
            attn_sub_norm=self.vector(tensor_name(M.ATTN_SUB_NORM, i), c.n_embd, required=False),
            ffn_sub_norm=self.vector(tensor_name(M.FFN_SUB_NORM, i), n_ff, required=False),
            q_norm=self.vector(tensor_name(M.ATTN_Q_NORM, i), c.head_dim, required=False),
            k_norm=self.vector(tensor_name(M.ATTN_K_NORM, i), c.head_dim, required=False),
            attn_post_norm=self.vector(tensor_name(M.ATTN_POST_NORM, i), c.n_embd, required=False),
            ffn_post_norm=self.vector(tensor_name(M.FFN_POST_NORM, i), c.n_embd, required=False),
            window=c.n_swa if c.swa_layers and c.swa_layers[i] else 0)


def load_weights(gguf: GGUFFile, cfg: HParams, fail: Callable[[str], QtoolError]) -> ModelWeights:
    """Every tensor the forward pass reads, checked against the hparams `cfg`; `fail(problem)` makes the error
    (naming the file)."""
    ld = _Loader(gguf, fail)
    c = cfg
    emb_name = tensor_name(M.TOKEN_EMBD)
    emb = ld.tensor(emb_name, (c.n_vocab, c.n_embd))
    if emb.ggml_type not in mm.SUPPORTED:
        raise fail(f"tensor {emb_name}: type {emb.ggml_type.name} is not supported by the runner")
    token_embd = Embedding(emb.ggml_type, _as_stored(emb.ggml_type, gguf.array(emb_name)), c.n_embd)
    output_norm = ld.vector(tensor_name(M.OUTPUT_NORM), c.n_embd)
    out = ld.matrix(tensor_name(M.OUTPUT), c.n_vocab, c.n_embd, required=False)
    output = out if out is not None else ld.matrix(emb_name, c.n_vocab, c.n_embd)
    rope_freqs = ld.vector(tensor_name(M.ROPE_FREQS), c.n_rot // 2, required=False)
    return ModelWeights(token_embd=token_embd, layers=[ld.layer(c, i) for i in range(c.n_layer)],
                        output_norm=output_norm, output=output, tied=out is None, rope_freqs=rope_freqs)


class ObservedExperts:
    """Experts that first hand their input and routing to `observer.experts(name, x, ids, n_expert)` (llama-imatrix's
    MUL_MAT_ID statistics: per expert, the rows routed to it)."""
    __slots__ = ("inner", "observer")

    def __init__(self, inner: Experts, observer):
        self.inner, self.observer = inner, observer

    def __call__(self, x: np.ndarray, ids: np.ndarray, acts: dict | None = None) -> np.ndarray:
        self.observer.experts(self.inner.name, x, ids, len(self.inner.experts))
        return self.inner(x, ids, acts)

    def __getattr__(self, attr: str):
        return getattr(self.inner, attr)


class ObservedWeight:
    """A Weight that first hands its input to `observer(name, x)`: how the importance matrix sees every product
    without the forward pass knowing. Only installed by `observed`, so the plain runner pays nothing."""
    __slots__ = ("inner", "observer")

    def __init__(self, inner: Weight, observer: Callable[[str, np.ndarray], None]):
        self.inner, self.observer = inner, observer

    def __call__(self, x: np.ndarray, acts: dict | None = None) -> np.ndarray:
        self.observer(self.inner.name, x)
        return self.inner(x, acts)

    def __getattr__(self, attr: str):
        return getattr(self.inner, attr)


def observed_layer(L: LayerWeights, observer: Callable[[str, np.ndarray], None]):
    """A copy of the record L (a layer, or ModelWeights' own fields) whose matrices report each product's input
    to `observer` (and whose experts to `observer.experts`)."""
    from dataclasses import fields, replace
    wrap = {f.name: ObservedWeight(getattr(L, f.name), observer) for f in fields(L)
            if isinstance(getattr(L, f.name), (Weight, ScaledWeight))}
    wrap.update({f.name: ObservedExperts(getattr(L, f.name), observer) for f in fields(L)
                 if isinstance(getattr(L, f.name), Experts)})
    return replace(L, **wrap)


def observed(w: ModelWeights, observer: Callable[[str, np.ndarray], None]) -> ModelWeights:
    """A copy of `w` whose matrices report each product's input to `observer` (the original is untouched)."""
    from dataclasses import replace
    return replace(observed_layer(w, observer), layers=[observed_layer(L, observer) for L in w.layers])
