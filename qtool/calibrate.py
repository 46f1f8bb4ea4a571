"""The importance matrix of a checkpoint, computed from the checkpoint itself, layer by layer (`qtool convert
--calibrate TEXT`): what `llama-imatrix` computes on the F32 GGUF of the model, without writing that file.

llama.cpp needs three tools and an F16/F32 intermediate for a calibrated file. Here the calibration chunks (the
same chunks as `qtool imatrix`, qtool/imatrix.py) go through the model one layer at a time: the residual stream
of every chunk is kept, layer i's weights are converted to float32 from the checkpoint, every chunk is run
through it (observed, as `qtool imatrix` observes the runner), and the layer is dropped before the next is
read. Memory is one layer's float32 weights plus the chunks' activations (chunks x n_ctx x n_embd float32),
never the model. Each tensor sees its chunks in the same order as in `qtool imatrix`, so the sums are the same
float32 additions in the same order.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import GGMLType, ModelTensor as M, tensor_name

# the calibration text that ships with qtool, for `--calibrate default`
DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration.txt"


def calibration_text(arg: str) -> tuple[str, str]:
    """(text, dataset name) for --calibrate: a file, or "default" for the bundled text."""
    from qtool.commands_run import read_text
    path = DEFAULT_TEXT if arg == "default" else Path(arg)
    if arg != "default" and not path.is_file():
        raise QtoolError(f"{arg}: no such calibration text (or use --calibrate default)")
    return read_text(path), ("qtool default calibration text" if arg == "default" else str(path))


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    ggml_type: GGMLType = GGMLType.F32

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _PlanTensors:
    """The F32 conversion plan of a checkpoint seen as the runner's weight loader sees a GGUF file: tensors by
    GGUF name, each converted to float32 (GGUF layout: Q/K rows permuted) when first asked for, and dropped on
    `release`."""

    def __init__(self, plan):
        self.jobs = {j.name: j for j in plan.jobs}
        self.tensors = {j.name: _Info(tuple(j.shape)) for j in plan.jobs}
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None:
            from qtool.convert import encode
            job = self.jobs[name]
            stored = job.load()
            # a fresh scratch per call (encode's default), so the array is this tensor's own
            a = self._arrays[name] = encode(stored, GGMLType.F32, name)
            stored.release()
        return a

    def release(self, name: str) -> None:
        self._arrays.pop(name, None)

    def release_all(self) -> None:
        self._arrays.clear()


def importance_matrix(src: str, text: str, dataset: str, n_ctx: int = 512, max_chunks: int | None = None,
                      progress: Callable[[int, int], None] | None = None):
    """The importance matrix of a conversion's source: a checkpoint layer by layer; a GGUF file (requantizing)
    through the runner, as `qtool imatrix` does."""
    if not Path(src).is_file():
        return imatrix_from_checkpoint(src, text, dataset, n_ctx, max_chunks, progress)
    from qtool import imatrix as im
    from qtool.model import Model
    model = Model(src, n_ctx=n_ctx)
    try:
        return im.collect(model, text, n_ctx, dataset, max_chunks,
                          progress=(lambda done, total, tps: progress(done, total)) if progress else None)
    finally:
        model.close()


def imatrix_from_checkpoint(src: str, text: str, dataset: str, n_ctx: int = 512, max_chunks: int | None = None,
                            progress: Callable[[int, int], None] | None = None):
    """The importance matrix (qtool.imatrix.Result) of checkpoint `src` on `text`, in chunks of n_ctx tokens.
    progress(done, total) is called after each layer."""
    from qtool import convert as conv
    from qtool import imatrix as im
    from qtool.archs import hparams_from_gguf
    from qtool.attention import KVCache
    from qtool.model import N_BATCH, block, embed, rope_tables
    from qtool.tokenizer import Tokenizer
    from qtool.weights import Embedding, _Loader, observed_layer

    plan = conv.plan(src, "F32")
    try:
        meta = {k: v for k, v, *_ in plan.metadata}
        source = _PlanTensors(plan)
        cfg = hparams_from_gguf(meta, source.tensors)
        tok = Tokenizer.from_metadata(meta)
        wins = im.chunks(tok.encode(text, add_bos=tok.add_bos), n_ctx, tok.bos_id if tok.add_bos else None,
                         max_chunks)
        if not wins:
            raise QtoolError("no calibration chunk to evaluate")
        loader = _Loader(source, lambda problem: QtoolError(f"{src}: {problem}"))
        collector = im.Collector()
        t0 = time.perf_counter()
        emb = loader.tensor(tensor_name(M.TOKEN_EMBD), (cfg.n_vocab, cfg.n_embd))
        embd = Embedding(emb.ggml_type, source.array(tensor_name(M.TOKEN_EMBD)), cfg.n_embd)
        # the residual stream of every chunk, split as the runner splits a chunk into batches of N_BATCH tokens
        batches = [(c, b0) for c in range(len(wins)) for b0 in range(0, n_ctx, N_BATCH)]
        stream = [embed(cfg, embd, wins[c][b0:b0 + N_BATCH]) for c, b0 in batches]
        source.release_all()
        freqs = source.tensors.get(tensor_name(M.ROPE_FREQS))
        rope_freqs = loader.vector(tensor_name(M.ROPE_FREQS), cfg.n_rot // 2) if freqs is not None else None
        ropes = {b0: rope_tables(cfg, rope_freqs, np.arange(b0, min(n_ctx, b0 + N_BATCH)))
                 for b0 in range(0, n_ctx, N_BATCH)}
        cache = KVCache(1, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, n_ctx, "f16")
        for i in range(cfg.n_layer):
            layer = observed_layer(loader.layer(cfg, i), collector)
            for j, (c, b0) in enumerate(batches):
                stream[j] = block(cfg, layer, stream[j], cache, 0, ropes[b0], b0)
            del layer
            source.release_all()
            if progress:
                progress(i + 1, cfg.n_layer)
        del stream
        secs = time.perf_counter() - t0
        n_tokens = len(wins) * n_ctx
        data = collector.data(n_ctx, collector.chunk_count(n_ctx), [dataset])
        return im.Result(data, n_ctx, len(wins), n_tokens, secs, n_tokens / secs if secs > 0 else float("inf"))
    finally:
        plan.close()
