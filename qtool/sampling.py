"""Next-token sampling, in llama.cpp's default chain order: repeat penalty → top-k → top-p → temperature → draw.

temperature <= 0 is greedy (argmax of the penalized logits). The same seed gives the same tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerOptions:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    def __init__(self, opts: SamplerOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)
        self.recent: deque[int] = deque(maxlen=max(0, opts.repeat_last_n) or None)

    def accept(self, token: int) -> None:
        """Record a token of the context (prompt or generated) for the repeat penalty."""
        if self.opts.repeat_last_n > 0:
            self.recent.append(int(token))

    def sample(self, logits: np.ndarray) -> int:
        o = self.opts
        z = np.array(logits, dtype=np.float32, copy=True)
        if o.repeat_penalty != 1.0 and self.recent:
            ids = np.fromiter(set(self.recent), dtype=np.int64)
            vals = z[ids]
            z[ids] = np.where(vals > 0, vals / o.repeat_penalty, vals * o.repeat_penalty)
        if o.temperature <= 0:
            return int(np.argmax(z))
        ids = np.arange(len(z))
        if 0 < o.top_k < len(z):
            keep = np.argpartition(-z, o.top_k - 1)[:o.top_k]
            ids, z = keep, z[keep]
        order = np.argsort(-z, kind="stable")
        ids, z = ids[order], z[order]
        if o.top_p < 1.0:
            p = np.exp((z - z[0]).astype(np.float64))
            p /= p.sum()
            n = int(np.searchsorted(np.cumsum(p), o.top_p) + 1)  # smallest prefix with mass >= top_p
            ids, z = ids[:n], z[:n]
        z = z.astype(np.float64) / o.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(ids[self.rng.choice(len(p), p=p)])
