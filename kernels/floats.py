"""Stored float rows → float32 for the prompt path's tiles and embeddings (F32 as is, F16 and BF16 bits widened).

Converting checkpoints between float formats is kernels/convert.py; these only read a GGUF's rows.
"""
import numpy as np
from numba import njit, prange

from .common import bf2f, h2f


def deq_f32(q: np.ndarray, out: np.ndarray) -> None:
    out[...] = q


@njit(parallel=True, cache=True)
def deq_f16(q, out):
    for r in prange(out.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = h2f(q[r, i])


@njit(parallel=True, cache=True)
def deq_bf16(q, out):
    for r in prange(out.shape[0]):
        for i in range(out.shape[1]):
            out[r, i] = bf2f(q[r, i])
