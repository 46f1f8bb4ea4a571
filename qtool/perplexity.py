"""Perplexity and KL divergence, measured the way llama.cpp's `llama-perplexity` does.

The text is tokenized once (with BOS when the vocabulary adds one) and cut into non-overlapping windows of n_ctx
tokens (a trailing partial window is dropped). Each window is evaluated from an empty cache with its first token
replaced by BOS, and only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the next
token, so every scored token sees at least n_ctx/2 tokens of context. PPL = exp(mean NLL), and its error is
PPL * sqrt(var(NLL) / (N - 1)), as llama.cpp prints it.

With a reference model (normally the F32/F16 file), the same windows are run through both and, per scored
position, KL(P_ref || P_model) is accumulated; reported are its mean (± standard error), 99th percentile and
maximum, the share of positions where both models rank the same token first, and PPL(model) / PPL(ref).
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import numpy as np

from qtool.errors import QtoolError


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Result:
    n_ctx: int
    n_chunks: int
    n_tokens: int  # scored
    perplexity: float
    perplexity_error: float
    seconds: float
    tokens_per_s: float  # evaluated tokens (n_chunks * n_ctx, per model) per second
    peak_rss_bytes: int
    nll: np.ndarray = field(repr=False)
    ref_perplexity: float | None = None
    ref_perplexity_error: float | None = None
    kl_mean: float | None = None
    kl_mean_error: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    ppl_ratio: float | None = None

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "nll"}
        return d


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    n = len(nll)
    mean = float(nll.mean())
    if not math.isfinite(mean) or mean > 700:  # exp() overflows past ~709: only broken logits get here
        raise QtoolError(f"perplexity is not finite (mean negative log-likelihood {mean:.4g} nats): the model's "
                         "logits are broken (NaN, infinite or absurdly large)")
    ppl = math.exp(mean)
    var = float((nll * nll).mean() - mean * mean)
    err = ppl * math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0
    return ppl, err


def chunks(tokens: list[int], n_ctx: int, bos_id: int | None) -> list[np.ndarray]:
    n_chunk = len(tokens) // n_ctx
    out = []
    for i in range(n_chunk):
        c = np.array(tokens[i * n_ctx:(i + 1) * n_ctx], dtype=np.int64)
        if bos_id is not None:
            c[0] = bos_id
        out.append(c)
    return out


def run(model, text: str, n_ctx: int, reference=None, progress=None) -> Result:
    """model / reference: qtool.model.Model with n_ctx >= the window. progress(done, total) is called per window."""
    if n_ctx < 8 or n_ctx % 2:
        raise QtoolError(f"--ctx {n_ctx}: use an even context of at least 8 tokens")
    tok = model.tokenizer
    add_bos = tok.add_bos
    tokens = tok.encode(text, add_bos=add_bos)
    if reference is not None:
        if reference.cfg.n_vocab != model.cfg.n_vocab:
            raise QtoolError(f"{reference.path}: vocabulary of {reference.cfg.n_vocab} differs from the model's "
                             f"{model.cfg.n_vocab}")
        if reference.tokenizer.encode(text, add_bos=add_bos) != tokens:
            raise QtoolError(f"{reference.path}: its tokenizer splits the text differently from the model's")
    for m in (model, reference):
        if m is not None and m.n_ctx < n_ctx:
            raise QtoolError(f"{m.path}: --ctx {n_ctx} is larger than the model's context of {m.n_ctx}")
    wins = chunks(tokens, n_ctx, tok.bos_id if add_bos else None)
    if not wins:
        raise QtoolError(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}: use a smaller --ctx "
                         f"or a longer text")
    first = n_ctx // 2
    nll_all, nll_ref, kls, same = [], [], [], 0
    t0 = time.perf_counter()
    for i, c in enumerate(wins):
        targets = np.array(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx], dtype=np.int64)
        model.reset()
        lp = _log_softmax(model.eval(c, all_logits=True)[first:n_ctx - 1])
        nll_all.append(-lp[np.arange(len(targets)), targets])
        if reference is not None:
            reference.reset()
            lr = _log_softmax(reference.eval(c, all_logits=True)[first:n_ctx - 1])
            nll_ref.append(-lr[np.arange(len(targets)), targets])
            kls.append((np.exp(lr) * (lr - lp)).sum(axis=-1))
            same += int((lr.argmax(axis=-1) == lp.argmax(axis=-1)).sum())
        if progress:
            progress(i + 1, len(wins))
    secs = time.perf_counter() - t0
    nll = np.concatenate(nll_all)
    ppl, err = _ppl(nll)
    evaluated = len(wins) * n_ctx * (2 if reference is not None else 1)
    res = Result(n_ctx=n_ctx, n_chunks=len(wins), n_tokens=len(nll), perplexity=ppl, perplexity_error=err,
                 seconds=secs, tokens_per_s=evaluated / secs if secs > 0 else float("inf"),
                 peak_rss_bytes=peak_rss_bytes(), nll=nll)
    if reference is not None:
        kl = np.concatenate(kls)
        res.ref_perplexity, res.ref_perplexity_error = _ppl(np.concatenate(nll_ref))
        res.kl_mean = float(kl.mean())
        res.kl_mean_error = float(kl.std(ddof=1) / math.sqrt(len(kl))) if len(kl) > 1 else 0.0
        res.kl_p99 = float(np.percentile(kl, 99))
        res.kl_max = float(kl.max())
        res.top1_agreement = same / len(kl)
        res.ppl_ratio = ppl / res.ref_perplexity
    return res
