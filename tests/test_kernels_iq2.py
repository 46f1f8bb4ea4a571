"""IQ2_XXS, IQ2_XS, IQ2_S (kernels/iq2.py) and IQ1_S, IQ1_M (kernels/iq1.py) beyond the table's checks
(tests/test_kernels_table.py has llama.cpp's bytes, gguf-py's dequantize, the round-trip error;
test_runner_kernels.py the fused kernels): the grid-neighbour tables of iq2xs_init_impl against an independent
numpy construction of the same definition (the three IQ2 grids and the IQ1 grid, one builder), the level encoding
of the grids, that the tables are built on first use, not at import, dequantize against a numpy transcription,
and IQ1's reproduction of glibc's qsort."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qtool import kernels
from qtool.formats.constants import GGMLType
from qtool.kernels import iq2
from qtool.kernels.iq_grids import iq1s_grid, iq2s_grid, iq2xs_grid, iq2xxs_grid

# name, levels of the grid's coordinates, nwant (iq2xs_init_impl: 2 for IQ2_XXS/XS, 1 for IQ2_S, 3 for IQ1_S/M)
GRIDS = {
    "IQ2_XXS": (lambda: iq2.grid_levels(iq2xxs_grid, iq2.IQ2_MAGNITUDES), 2),
    "IQ2_XS": (lambda: iq2.grid_levels(iq2xs_grid, iq2.IQ2_MAGNITUDES), 2),
    "IQ2_S": (lambda: iq2.grid_levels(iq2s_grid, iq2.IQ2_MAGNITUDES), 1),
    "iq1s-test": (lambda: iq2.grid_levels(iq1s_grid, (-1, 0, 1)), 3),
}


def numpy_neighbours(levels: np.ndarray, nwant: int):
    """The definition, plainly: every point of 8 levels 0..3 (index sum l_k << 2k) has value 2l+1 per
    coordinate; on the grid it maps to its entry, off it to the entries of the nwant smallest squared
    distances to it, ordered by (distance, entry). Returns (on-grid entry or -1 per point, the off-grid
    points' neighbour lists in point order)."""
    n = len(levels)
    gpos = 2 * levels.astype(np.int32) + 1
    index = (levels.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
    entry = np.full(iq2.KMAP_SIZE, -1, np.int64)
    entry[index] = np.arange(n)
    lists = []
    points = np.arange(iq2.KMAP_SIZE)
    ppos = 2 * ((points[:, None] >> (2 * np.arange(8))) & 3) + 1
    for start in range(0, iq2.KMAP_SIZE, 512):
        p = ppos[start:start + 512].astype(np.int32)
        d2 = ((p[:, None, :] - gpos[None, :, :]) ** 2).sum(axis=2)
        for r in range(len(p)):
            if entry[start + r] >= 0:
                continue
            order = np.lexsort((np.arange(n), d2[r]))
            cut = np.unique(d2[r])[:nwant].max()
            lists.append(order[d2[r][order] <= cut])
    return entry, lists


@pytest.mark.parametrize("name", list(GRIDS))
def test_neighbour_tables_equal_numpy_construction(name):
    levels, nwant = GRIDS[name][0](), GRIDS[name][1]
    kgrid, kmap, neighbours = iq2.neighbour_tables(name, levels, nwant)
    np.testing.assert_array_equal(kgrid, 2 * levels.astype(np.int8) + 1)
    entry, lists = numpy_neighbours(levels, nwant)
    on = entry >= 0
    np.testing.assert_array_equal(kmap[on], entry[on])
    assert (kmap[~on] < 0).all()
    # the off-grid points' lists, one after the other in point order: the count, then the entries
    expect = np.concatenate([np.concatenate([[len(l)], l]) for l in lists]).astype(np.uint16)
    np.testing.assert_array_equal(neighbours, expect)
    offsets = -kmap[~on] - 1
    np.testing.assert_array_equal(offsets, np.cumsum([0] + [len(l) + 1 for l in lists[:-1]]))
    assert iq2.neighbour_tables(name, levels, nwant)[2] is neighbours  # built once, then cached


def test_grid_levels_are_llama_cpp_kgrid_tables():
    """The grids' level encodings are iq2xs_init_impl's kgrid_2bit_* tables: sorted, and starting as they do."""
    for grid, first in ((iq2xxs_grid, [0, 2, 5, 8, 10, 17, 20, 32, 34, 40, 42, 65, 68, 80, 88, 97]),
                        (iq2xs_grid, [0, 2, 5, 8, 10, 17, 20, 22, 25, 32, 34, 37, 40, 65, 68, 70]),
                        (iq1s_grid, [0, 2, 5, 8, 10, 17, 21, 32, 34, 40, 42, 69, 81, 84, 86, 101])):
        values = iq2.IQ2_MAGNITUDES if grid is not iq1s_grid else (-1, 0, 1)
        code = (iq2.grid_levels(grid, values).astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
        assert (np.diff(code) > 0).all()
        assert code[:16].tolist() == first
    code = (iq2.grid_levels(iq2s_grid, iq2.IQ2_MAGNITUDES).astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
    assert (np.diff(code) > 0).all() and code.max() < iq2.KMAP_SIZE


def test_tables_are_built_on_first_use_not_at_import():
    code = ("import numpy as np; from qtool.kernels import iq2; assert not iq2._TABLES; "
            "from qtool import kernels; from qtool.formats.constants import GGMLType as T; "
            "kernels.quantize(T.IQ2_S, np.ones((1, 256), np.float32)); assert list(iq2._TABLES) == ['IQ2_S']")
    subprocess.run([sys.executable, "-c", code], check=True)


def _dequantize_numpy(ggml_type: GGMLType, q: np.ndarray) -> np.ndarray:
    """dequantize_row_iq2_* transcribed in numpy, one block at a time (independent of gguf-py's)."""
    from qtool.kernels.iq_grids import ksigns_iq2xs
    bs = kernels.row_bytes(ggml_type, 256)
    out = []
    for blk in q.reshape(-1, bs):
        d = np.float32(blk[:2].view(np.float16)[0])
        y = np.empty(256, np.float32)
        for g in range(32):  # groups of 8
            ib32 = g // 4
            if ggml_type == GGMLType.IQ2_XXS:
                aux = blk[2 + 8 * ib32:2 + 8 * ib32 + 8].view(np.uint32)
                s = aux[1] >> 28
                grid = iq2xxs_grid[blk[2 + 8 * ib32 + g % 4]]
                signs = ksigns_iq2xs[(aux[1] >> (7 * (g % 4))) & 127]
            else:
                sc = blk[(66 if ggml_type == GGMLType.IQ2_XS else 74) + ib32]
                s = (sc >> (4 * ((g % 4) // 2))) & 15
                if ggml_type == GGMLType.IQ2_XS:
                    v = int(blk[2 + 2 * g]) | int(blk[3 + 2 * g]) << 8
                    grid, signs = iq2xs_grid[v & 511], ksigns_iq2xs[v >> 9]
                else:
                    idx = int(blk[2 + g]) | ((int(blk[66 + ib32]) >> (2 * (g % 4))) & 3) << 8
                    grid, signs = iq2s_grid[idx], blk[34 + g]
            db = np.float32(np.float32(d * np.float32(np.float32(0.5) + np.float32(s))) * np.float32(0.25))
            for j in range(8):
                v = np.float32(db * np.float32(grid[j]))
                y[8 * g + j] = -v if (int(signs) >> j) & 1 else v
        out.append(y)
    return np.concatenate(out)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ2_S"])
def test_dequantize_equals_numpy_transcription(name):
    t = GGMLType[name]
    rng = np.random.default_rng(3)
    x = rng.laplace(size=(3, 512)).astype(np.float32)
    q = kernels.quantize(t, x, quant_weights=rng.uniform(0.1, 2, 512).astype(np.float32))
    raw = rng.integers(0, 256, q.shape, dtype=np.uint8)  # every bit pattern, finite d
    bs = kernels.row_bytes(t, 256)
    raw.reshape(-1, bs)[:, :2] = np.float16(rng.uniform(-2, 2, raw.size // bs)).view(np.uint8).reshape(-1, 2)
    for blocks in (q, raw):
        np.testing.assert_array_equal(kernels.dequantize(t, blocks, 512).reshape(-1), _dequantize_numpy(t, blocks))


def test_iq1_sort_is_glibc_msort():
    """IQ1_S/IQ1_M order a block's weights with glibc's qsort (a stable merge sort for these sizes): ties keep
    their positions, -0.0 ties +0.0, as numpy's stable sort does on finite keys."""
    rng = np.random.default_rng(5)
    for n in (16, 32):
        for keys in (rng.standard_normal(n), rng.integers(-2, 3, n).astype(np.float64),
                     np.where(rng.random(n) < 0.5, 0.0, -0.0), np.zeros(n)):
            keys = keys.astype(np.float32)
            order = np.arange(n, dtype=np.int64)
            _merge_sort_py(keys, order)
            np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))


def _merge_sort_py(keys, order):
    from numba import njit

    from qtool.kernels.iq1 import _merge_sort

    @njit
    def run(k, o, t):
        _merge_sort(k, o, t)
    run(keys, order, np.empty_like(order))
