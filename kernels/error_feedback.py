"""GPTQ's column sweep inside one block of columns: round each column to its fixed grid, then spread the rounding
error over the block's later columns through the Cholesky factor of H⁻¹ (Frantar et al., "GPTQ", 2022, eq. 3-4).

Rows are independent (each row is its own least-squares problem sharing the input statistics H), so the kernel
is parallel over rows and each row runs the block's columns in order. The grid of every weight (step A, offset C,
integer range) is fixed before the sweep (kernels/fixed_scales.py), which is what lets the result be packed into
the block type with the scales chosen at the block's start.
"""
import numpy as np
from numba import njit, prange

from .common import nearest_int

F0 = np.float32(0.0)


@njit(cache=True, parallel=True, error_model="numpy")
def sweep(W, U, A, C, K, kmin: int, kmax: int, E) -> None:
    """W (rows, n) float32, updated in place as the errors are fed forward; U (n, n) the block's part of the upper
    Cholesky factor of H⁻¹; A, C the grid (a weight is A*K + C); K int64 codes, written (kept where A is 0);
    E (rows, n) the scaled errors (w - q) / U[j, j], for the caller's update of the columns after the block."""
    rows, n = W.shape
    for r in prange(rows):
        for j in range(n):
            w = W[r, j]
            a = A[r, j]
            if a != F0:
                k = nearest_int(np.float32(np.float32(w - C[r, j]) / a))
                K[r, j] = kmin if k < kmin else (kmax if k > kmax else k)
            q = np.float32(np.float32(a * np.float32(K[r, j])) + C[r, j])
            e = np.float32((w - q) / U[j, j])
            E[r, j] = e
            for i in range(j + 1, n):
                W[r, i] -= e * U[j, i]
