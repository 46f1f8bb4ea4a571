"""`qtool convert SRC --type T --calibrate TEXT --method gptq`: error-compensating quantization (GPTQ/OBQ, Frantar
et al. 2022) written into ordinary GGUF blocks of the recipe's types, so llama.cpp loads the file as any other.

Per linear layer, H = XᵀX of its inputs on the calibration chunks (float64). Columns are quantized in order;
each column's rounding error, divided by the diagonal of U (the upper Cholesky factor of H⁻¹, H dampened by
`damp` × its mean diagonal), is subtracted from the later columns along U's row, so the layer's output error
‖XWᵀ − XQᵀ‖ is what is minimised, not the weight error. GGUF has no column permutation, so no act-order.

GGUF blocks constrain the grid: on stories3M a q/k/v row of 256 columns is one K-quant super-block, so rounding
a whole block and compensating after it would gain nothing. Instead, when the sweep reaches a block's first
column, its scales (and mins) are chosen from the error-updated weights by the type's own importance-weighted
quantizer with diag(H)/tokens (the imatrix) as the weights; then every column of the block is rounded to that
fixed grid with error feedback inside the block (kernels/error_feedback.py), and the block is packed with those
scales and the final codes (kernels/fixed_scales.py). Types without a fixed-grid kernel (IQ*, TQ*) and the token
embedding (a lookup, no inputs to weigh) are quantized as `--imatrix` would, with diag(H)/tokens.

The model is walked layer by layer as `--calibrate` walks it (qtool/calibrate.py): one layer's float32 weights
and the chunks' residual stream in memory. Each layer sees the stream produced by the already-quantized layers
before it (run with the quantized bytes, in llama.cpp's arithmetic); inside a layer, o and down see the inputs
of the float q/k/v and gate/up of that layer (the statistics are collected in one float pass of the layer).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import FLOAT_TYPES, GGMLType, Keys, ModelTensor as M, ValueType, tensor_name

DAMP = 0.01  # H += DAMP * mean(diag H) * I, as GPTQ's reference code (percdamp)
METHOD = "gptq"


class Hessians:
    """The observer (qtool.weights.observed_layer): Σ xᵀx per weight over every product's input rows."""

    def __init__(self) -> None:
        self.h: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = {}
        self._x: np.ndarray | None = None  # q, k and v (gate and up) get the same input: its product once
        self._xtx: np.ndarray | None = None

    def __call__(self, name: str, x: np.ndarray) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        if x is not self._x:
            x64 = x2.astype(np.float64)
            self._x, self._xtx = x, x64.T @ x64
        xtx = self._xtx
        acc = self.h.get(name)
        self.h[name] = xtx.copy() if acc is None else acc + xtx
        self.tokens[name] = self.tokens.get(name, 0) + x2.shape[0]

    def experts(self, name: str, x, ids, n_expert: int) -> None:
        raise QtoolError("--method gptq: mixture-of-experts layers are not supported yet (use --calibrate alone)")

    def importance(self, name: str) -> np.ndarray:
        """diag(H) / tokens: the imatrix entry (llama-imatrix's in_sum2 / counts) of the same activations."""
        return (np.diag(self.h[name]) / max(self.tokens[name], 1)).astype(np.float32)


def upper_cholesky_inverse(H: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U, upper triangular, with UᵀU = (H + damp·mean(diag H)·I)⁻¹ (float64); damping grows tenfold until
    H + λI is positive definite."""
    H = np.array(H, dtype=np.float64)
    mean = float(np.mean(np.diag(H))) or 1.0
    for attempt in range(6):
        Hd = H + (damp * 10 ** attempt) * mean * np.eye(len(H))
        try:
            L = np.linalg.cholesky(Hd)
            Linv = np.linalg.inv(L)
            return np.linalg.cholesky(Linv.T @ Linv).T
        except np.linalg.LinAlgError:
            continue
    raise QtoolError("--method gptq: the calibration statistics are singular even with damping")


def quantize_matrix(W: np.ndarray, H: np.ndarray, ggml_type: GGMLType, importance: np.ndarray | None = None,
                    damp: float = DAMP) -> np.ndarray:
    """GPTQ of W (rows, cols) float32 with input statistics H (cols, cols) into packed rows of ggml_type
    (uint8 (rows, row bytes)). importance: the per-column weights each block's scales are chosen with
    (default diag(H) normalised)."""
    from qtool import kernels
    from qtool.kernels import error_feedback, fixed_scales as fs
    rows, cols = W.shape
    n_b = kernels.TRAITS[ggml_type].block_size
    bb = kernels.TRAITS[ggml_type].type_size
    W = np.array(W, dtype=np.float32)
    diag = np.diag(H).copy()
    dead = diag == 0  # inputs that are always 0: their weights do not matter, round them as they are
    if dead.any():
        H = H.copy()
        H[dead, dead] = 1.0
    if importance is None:
        importance = (diag / max(float(diag.mean()), 1e-30)).astype(np.float32)
    U64 = upper_cholesky_inverse(H, damp)
    U = U64.astype(np.float32)
    kmin, kmax = fs.K_RANGE[ggml_type]
    out = np.empty((rows, cols // n_b * bb), np.uint8)
    E = np.empty((rows, n_b), np.float32)
    for b0 in range(0, cols, n_b):
        b1 = b0 + n_b
        blk = np.ascontiguousarray(W[:, b0:b1])
        q = np.empty((rows, bb), np.uint8)
        kernels.quantize(ggml_type, blk, q, quant_weights=np.ascontiguousarray(importance[b0:b1]))
        A, C, K = fs.grid(ggml_type, q, n_b)
        error_feedback.sweep(blk, np.ascontiguousarray(U[b0:b1, b0:b1]), A, C, K, kmin, kmax, E)
        fs.KERNELS[ggml_type][1](q, K)
        out[:, b0 // n_b * bb:b1 // n_b * bb] = q
        if b1 < cols:  # the lazy batch update of GPTQ: the block's errors onto every later column at once
            W[:, b1:] -= E @ U[b0:b1, b1:]
    return out


class _Quantized:
    """The F32 source with some tensors replaced by their quantized bytes, as the runner's loader reads a file."""

    def __init__(self, source, encoded: dict[str, tuple[GGMLType, np.ndarray]]):
        from qtool.calibrate import _Info
        self.source, self.encoded = source, encoded
        self.tensors = {**source.tensors, **{n: _Info(source.tensors[n].shape, t) for n, (t, _) in encoded.items()}}

    def array(self, name: str) -> np.ndarray:
        got = self.encoded.get(name)
        return got[1] if got is not None else self.source.array(name)

    def release(self, name: str) -> None:
        self.source.release(name)


def apply(plan, src: str, text: str, dataset: str, n_ctx: int = 512, max_chunks: int | None = None,
          damp: float = DAMP, progress: Callable[[int, int], None] | None = None) -> dict:
    """Quantize the layer tensors of `plan` (a checkpoint's conversion plan) by GPTQ on `text`: each such job gets
    its bytes (`job.encoded`), the rest keep the plan's encoder; the quantize.qtool.* metadata is appended.
    Returns counts for the summary line."""
    from qtool import convert as conv
    from qtool import imatrix as im
    from qtool.archs import hparams_from_gguf
    from qtool.attention import KVCache
    from qtool.calibrate import _PlanTensors
    from qtool.kernels import fixed_scales as fs
    from qtool.model import N_BATCH, _rms_norm, block, embed, rope_tables
    from qtool.tokenizer import Tokenizer
    from qtool.weights import Embedding, _Loader, observed_layer

    from pathlib import Path
    if Path(src).is_file():
        raise QtoolError(f"{src}: --method gptq converts a checkpoint folder (it walks the float weights layer by "
                         "layer); give the Hugging Face checkpoint, not a GGUF file")
    jobs = {j.name: j for j in plan.jobs}
    f32 = conv.plan(src, "F32")
    t0 = time.perf_counter()
    stats = {"gptq": 0, "imatrix": 0, "fallback": []}
    try:
        meta = {k: v for k, v, *_ in f32.metadata}
        source = _PlanTensors(f32)
        cfg = hparams_from_gguf(meta, source.tensors)
        if cfg.n_expert:
            raise QtoolError("--method gptq: mixture-of-experts models are not supported yet (use --calibrate alone)")
        tok = Tokenizer.from_metadata(meta)
        wins = im.chunks(tok.encode(text, add_bos=tok.add_bos), n_ctx, tok.bos_id if tok.add_bos else None,
                         max_chunks)
        loader = _Loader(source, lambda problem: QtoolError(f"{src}: {problem}"))
        emb_name = tensor_name(M.TOKEN_EMBD)
        emb = loader.tensor(emb_name, (cfg.n_vocab, cfg.n_embd))
        embd = Embedding(emb.ggml_type, source.array(emb_name), cfg.n_embd)
        batches = [(c, b0) for c in range(len(wins)) for b0 in range(0, n_ctx, N_BATCH)]
        stream = [embed(cfg, embd, wins[c][b0:b0 + N_BATCH]) for c, b0 in batches]
        source.release_all()
        freqs = source.tensors.get(tensor_name(M.ROPE_FREQS))
        rope_freqs = loader.vector(tensor_name(M.ROPE_FREQS), cfg.n_rot // 2) if freqs is not None else None
        ropes = {b0: rope_tables(cfg, rope_freqs, np.arange(b0, min(n_ctx, b0 + N_BATCH)))
                 for b0 in range(0, n_ctx, N_BATCH)}
        cache = KVCache(1, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, n_ctx, "f16")

        def quantize(names: list[str], hess: Hessians) -> dict[str, tuple[GGMLType, np.ndarray]]:
            done = {}
            for name in names:
                job = jobs.get(name)
                if job is None or job.ggml_type in FLOAT_TYPES or name not in hess.h:
                    continue
                W = source.array(name)
                W = W.reshape(-1, W.shape[-1])
                qw = hess.importance(name)
                if fs.has_fixed_grid(job.ggml_type):
                    data = quantize_matrix(W, hess.h[name], job.ggml_type, qw, damp)
                    stats["gptq"] += 1
                else:  # IQ*/TQ*: no fixed-grid rounding; the imatrix quantizer with the same statistics
                    data = conv.encode(conv.Stored(W, "F32"), job.ggml_type, name, quant_weights=qw).copy()
                    stats["imatrix"] += 1
                    stats["fallback"].append(f"{name} ({job.ggml_type.name})")
                job.encoded = data
                done[name] = (job.ggml_type, data)
            return done

        for i in range(cfg.n_layer):
            hess = Hessians()
            observed = observed_layer(loader.layer(cfg, i), hess)
            for j, (c, b0) in enumerate(batches):  # statistics only: the float layer's outputs are not kept
                block(cfg, observed, stream[j], cache, 0, ropes[b0], b0)
            del observed
            encoded = quantize(sorted(hess.h), hess)
            qlayer = _Loader(_Quantized(source, encoded), loader.fail).layer(cfg, i)
            for j, (c, b0) in enumerate(batches):
                stream[j] = block(cfg, qlayer, stream[j], cache, 0, ropes[b0], b0)
            del qlayer, hess, encoded
            source.release_all()
            if progress:
                progress(i + 1, cfg.n_layer + 1)
        out_name = tensor_name(M.OUTPUT)
        if out_name in source.tensors:  # the head's input: the final norm of the quantized model's stream
            norm = loader.vector(tensor_name(M.OUTPUT_NORM), cfg.n_embd)
            hess = Hessians()
            for x in stream:
                hess(out_name, _rms_norm(x, norm, cfg.eps))
            quantize([out_name], hess)
            source.release_all()
        if progress:
            progress(cfg.n_layer + 1, cfg.n_layer + 1)
        del stream
    finally:
        f32.close()
    Q = Keys.Quantize
    plan.metadata.extend([
        (Q.QTOOL_METHOD, METHOD, ValueType.STRING, None),
        (Q.QTOOL_CALIBRATION, dataset, ValueType.STRING, None),
        (Q.QTOOL_CHUNKS, len(wins), ValueType.UINT32, None),
        (Q.QTOOL_CHUNK_SIZE, n_ctx, ValueType.UINT32, None),
        (Q.QTOOL_GPTQ_DAMP, float(damp), ValueType.FLOAT32, None)])
    if stats["fallback"]:
        plan.warnings.append(f"--method gptq: no fixed-grid rounding for {len(stats['fallback'])} tensor(s), "
                             f"quantized with the imatrix instead: {', '.join(stats['fallback'][:4])}")
    stats["seconds"] = time.perf_counter() - t0
    stats["chunks"] = len(wins)
    return stats
