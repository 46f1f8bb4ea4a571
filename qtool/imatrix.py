"""The importance matrix, collected the way llama.cpp's `llama-imatrix` does (tools/imatrix/imatrix.cpp).

The text is tokenized once (with BOS when the vocabulary adds one) and cut into non-overlapping chunks of n_ctx
tokens; a trailing partial chunk is dropped and at least two chunks' worth of tokens are required. Each chunk is
evaluated from an empty cache with its first token replaced by BOS. Every token of the chunk counts (unlike
perplexity, which scores only the second half): for each matrix product whose weight is a `blk.*` tensor (and
`output.weight` with process_output), the input activations x (T, n_in) are added per column into Σx² and Σx,
and the token count grows by T. Sums are float32, accumulated token by token in order, as llama.cpp's are.

The runner is not changed: `qtool.weights.observed` wraps the weights so each product first hands its input to
the collector, and the plain weights are put back afterwards.

Known difference: llama-imatrix ignores a product of fewer than 16 tokens (a last micro-batch of a decode call,
which happens only for contexts that leave such a remainder of its 512-token micro-batches); qtool counts every
token. MoE products (the runner's `Experts`, observed through `Collector.experts`) keep llama.cpp's MUL_MAT_ID
statistics: per expert, the rows routed to it and their count.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from qtool.errors import QtoolError
from qtool.formats.imatrix import ImatrixData, ImatrixEntry

OUTPUT_NAME = "output.weight"


@numba.njit(cache=True, nogil=True)
def _accumulate(sum2: np.ndarray, sum1: np.ndarray, x: np.ndarray) -> bool:
    """Add rows of x into the column sums, one token after another in float32 (llama.cpp's order and
    precision); False when a sum stops being finite."""
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[t, j]
            sum1[j] += v
            sum2[j] += v * v
    for j in range(x.shape[1]):
        if not np.isfinite(sum2[j]):
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _accumulate_experts(sum2: np.ndarray, sum1: np.ndarray, counts: np.ndarray, x: np.ndarray,
                        ids: np.ndarray) -> bool:
    """MUL_MAT_ID's statistics: per expert, every (token, slot) routed to it adds its input row, in llama.cpp's
    order (expert, then slot, then token). x (T, n_x, cols) with n_x 1 (input shared by the slots) or n_used."""
    n_tok, n_used = ids.shape
    n_x = x.shape[1]
    for ex in range(sum2.shape[0]):
        for slot in range(n_used):
            for t in range(n_tok):
                if ids[t, slot] != ex:
                    continue
                counts[ex] += 1
                row = x[t, slot % n_x]
                for j in range(row.shape[0]):
                    sum1[ex, j] += row[j]
                    sum2[ex, j] += row[j] * row[j]
    for ex in range(sum2.shape[0]):
        for j in range(sum2.shape[1]):
            if not np.isfinite(sum2[ex, j]):
                return False
    return True


class Collector:
    """The observer: called with (tensor name, input activations) for each matrix product."""

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.sum2: dict[str, np.ndarray] = {}
        self.sum1: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}  # dense tensors: tokens seen
        self.expert_counts: dict[str, np.ndarray] = {}  # MoE tensors: (n_expert,) tokens routed to each

    def _counts(self, name: str) -> np.ndarray:
        return self.expert_counts[name] if name in self.expert_counts else np.array([self.counts[name]])

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == OUTPUT_NAME)

    def __call__(self, name: str, x: np.ndarray) -> None:
        if not self.wants(name):
            return
        s2 = self.sum2.get(name)
        if s2 is None:
            s2 = self.sum2[name] = np.zeros(x.shape[1], np.float32)
            self.sum1[name] = np.zeros(x.shape[1], np.float32)
            self.counts[name] = 0
        elif s2.shape != (x.shape[1],):
            raise QtoolError(f"imatrix: {name} was applied to {x.shape[1]} columns after {s2.shape}")
        if not _accumulate(s2, self.sum1[name], np.ascontiguousarray(x, dtype=np.float32)):
            raise QtoolError(f"imatrix: non-finite activations reached {name}: the model's weights are broken")
        self.counts[name] += x.shape[0]

    def experts(self, name: str, x: np.ndarray, ids: np.ndarray, n_expert: int) -> None:
        """An MoE product (ggml_mul_mat_id): x (T, cols) or (T, n_used, cols), ids (T, n_used) the experts each
        token was routed to; per-expert rows of sums and counts, as llama-imatrix keeps them."""
        if not self.wants(name):
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        x = x[:, None, :] if x.ndim == 2 else x
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != x.shape[0] or ids.min(initial=0) < 0 or ids.max(initial=0) >= n_expert:
            raise QtoolError(f"imatrix: {name}: expert ids {ids.shape} do not fit {x.shape[0]} tokens "
                             f"and {n_expert} experts")
        s2 = self.sum2.get(name)
        if s2 is None:
            s2 = self.sum2[name] = np.zeros((n_expert, x.shape[2]), np.float32)
            self.sum1[name] = np.zeros((n_expert, x.shape[2]), np.float32)
            self.expert_counts[name] = np.zeros(n_expert, np.int64)
        elif s2.shape != (n_expert, x.shape[2]):
            raise QtoolError(f"imatrix: {name} was applied to {x.shape[2]} columns of {n_expert} experts "
                             f"after {s2.shape}")
        if not _accumulate_experts(s2, self.sum1[name], self.expert_counts[name], x, ids):
            raise QtoolError(f"imatrix: non-finite activations reached {name}: the model's weights are broken")

    def chunk_count(self, n_ctx: int) -> int:
        """llama-imatrix's chunk_count: its largest token count (an expert's, for MoE tensors) over the chunk size."""
        return max([*self.counts.values(), *(int(c.max()) for c in self.expert_counts.values())], default=0) // n_ctx

    def data(self, chunk_size: int, chunk_count: int, datasets: list[str]) -> ImatrixData:
        entries = {name: ImatrixEntry(self.sum2[name].reshape(len(c), -1).copy(), c.astype(np.float32),
                                      self.sum1[name].reshape(len(c), -1).copy())
                   for name in sorted(self.sum2) for c in [self._counts(name)]}
        return ImatrixData(entries, datasets, chunk_count, chunk_size)


@dataclass
class Result:
    data: ImatrixData
    n_ctx: int
    n_chunks: int
    n_tokens: int  # evaluated (n_chunks * n_ctx)
    seconds: float
    tokens_per_s: float

    def as_dict(self) -> dict:
        return {"entries": len(self.data.entries), "chunks": self.n_chunks, "chunk_size": self.n_ctx,
                "tokens": self.n_tokens, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
                "datasets": list(self.data.datasets)}


def chunks(tokens: list[int], n_ctx: int, bos_id: int | None, max_chunks: int | None = None) -> list[np.ndarray]:
    """llama-imatrix's chunks: windows of n_ctx over the tokenized text, each starting with BOS."""
    if len(tokens) < 2 * n_ctx:
        raise QtoolError(f"the text has {len(tokens)} tokens; llama-imatrix needs at least {2 * n_ctx} "
                         f"(two chunks) for --ctx {n_ctx}: use a smaller --ctx or a longer text")
    from qtool.perplexity import chunks as windows  # the same windows as llama-perplexity's
    out = windows(tokens, n_ctx, bos_id)
    return out[:max_chunks] if max_chunks is not None and max_chunks >= 0 else out


def collect(model, text: str, n_ctx: int, dataset: str, max_chunks: int | None = None,
            process_output: bool = False, progress: Callable[[int, int, float], None] | None = None) -> Result:
    """model: qtool.model.Model with n_ctx >= the chunk. progress(done, total, tokens_per_s) per chunk."""
    from qtool.weights import observed

    if n_ctx < 1:
        raise QtoolError(f"--ctx {n_ctx}: the context must be at least 1 token")
    if model.n_ctx < n_ctx:
        raise QtoolError(f"{model.path}: --ctx {n_ctx} is larger than the model's context of {model.n_ctx}")
    tok = model.tokenizer
    tokens = tok.encode(text, add_bos=tok.add_bos)
    wins = chunks(tokens, n_ctx, tok.bos_id if tok.add_bos else None, max_chunks)
    if not wins:
        raise QtoolError("--chunks 0: no chunk to evaluate")
    collector = Collector(process_output)
    plain = model.w
    model.w = observed(plain, collector)
    t0 = time.perf_counter()
    try:
        for i, c in enumerate(wins):
            model.reset()
            # all logits only when output.weight is collected: it then sees every token, as in llama-imatrix
            model.eval(c, all_logits=process_output)
            if progress:
                secs = time.perf_counter() - t0
                progress(i + 1, len(wins), (i + 1) * n_ctx / secs if secs > 0 else 0.0)
    finally:
        model.w = plain
        model.reset()
    secs = time.perf_counter() - t0
    n_tokens = len(wins) * n_ctx
    data = collector.data(n_ctx, collector.chunk_count(n_ctx), [dataset])
    return Result(data, n_ctx, len(wins), n_tokens, secs, n_tokens / secs if secs > 0 else float("inf"))
