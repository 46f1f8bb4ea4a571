"""IQ3_XXS and IQ3_S beyond the table's checks (test_kernels_table.py): the neighbour tables of iq3xs_init_impl
against an independent construction, built on first use only; rows where llama.cpp's quantizer aborts
(GGML_ASSERT on a NaN scale: inf, NaN, or weights whose squares overflow) told apart from the rest, which equal
llama.cpp's bytes, plain and under every kind of importance vector; IQ3_S's all-zero 32-weight blocks (C does not
advance its qs/signs pointers past them); the fused kernels against a plain numpy transcription of ggml's
vec_dot."""
from __future__ import annotations

import faulthandler
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from llama_oracle import ggml_quantize, need_llama_cpp
from rows import IMPORTANCE_KINDS, adversarial_rows, importance, random_rows

from qtool import kernels
from qtool.formats.constants import QK_K, GGMLType
from qtool.kernels import iq3
from qtool.kernels import matmul as mm

TYPES = (GGMLType.IQ3_XXS, GGMLType.IQ3_S)
IDS = [t.name for t in TYPES]
GRID_SIZE = {GGMLType.IQ3_XXS: 256, GGMLType.IQ3_S: 512}


# ---- the tables -------------------------------------------------------------------------------------------------

def reference_tables(grid_size: int):
    """iq3xs_init_impl's kmap and neighbour lists by its definition, point by point: for each lattice point off
    the grid, the grid points sorted by (squared distance, index), cut after the nwant-th distinct distance."""
    nwant = 2 if grid_size == 256 else 3
    codes = iq3.grid_codes(grid_size)
    pos = [tuple(int(2 * c + 1) for c in row) for row in codes]
    index = {sum(int(c) << (3 * i) for i, c in enumerate(row)): j for j, row in enumerate(codes)}
    kmap = np.full(4096, -1, dtype=np.int64)
    nbrs: list[int] = []
    for u in range(4096):
        if u in index:
            kmap[u] = index[u]
            continue
        p = [2 * ((u >> (3 * k)) & 7) + 1 for k in range(4)]
        dist = sorted((sum((a - b) ** 2 for a, b in zip(g, p)), j) for j, g in enumerate(pos))
        distinct = sorted({d for d, _ in dist})[:nwant]
        chosen = [j for d, j in dist if d <= distinct[-1]]
        kmap[u] = -(len(nbrs) + 1)
        nbrs += [len(chosen), *chosen]
    return kmap, np.array(nbrs, dtype=np.int64)


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_neighbour_tables_equal_their_definition(ggml_type):
    n = GRID_SIZE[ggml_type]
    grid_pos, grid_l, kmap, nbrs = iq3.tables(n)
    ref_kmap, ref_nbrs = reference_tables(n)
    np.testing.assert_array_equal(kmap, ref_kmap)
    np.testing.assert_array_equal(nbrs.astype(np.int64), ref_nbrs)
    np.testing.assert_array_equal(grid_pos, 2 * grid_l + 1)
    assert (kmap >= 0).sum() == n and len(set(kmap[kmap >= 0])) == n
    assert iq3.tables(n)[3] is nbrs  # cached


def _c_kgrid(grid_size: int) -> np.ndarray | None:
    """kgrid_256 / kgrid_512 as iq3xs_init_impl writes them, from llama.cpp's source when it is on this machine."""
    roots = [os.environ.get("LLAMA_CPP_SRC", ""), *map(str, pathlib.Path("/work/llama-src").glob("*/vendor/llama.cpp"))]
    for root in roots:
        src = pathlib.Path(root) / "ggml" / "src" / "ggml-quants.c"
        if root and src.is_file():
            m = re.search(rf"kgrid_{grid_size}\[{grid_size}\] = \{{(.*?)\}};", src.read_text(), re.S)
            return np.array([int(v) for v in m.group(1).replace("\n", " ").split(",") if v.strip()])
    return None


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_grid_codes_are_the_quantizers_grid(ggml_type):
    """The lattice codes read off the dequantization grid's magnitudes are iq3xs_init_impl's kgrid (3 bits per
    coordinate), and the grid's magnitudes are gguf-py's."""
    n = GRID_SIZE[ggml_type]
    codes = iq3.grid_codes(n)
    kgrid = _c_kgrid(n)
    if kgrid is None:
        pytest.skip("llama.cpp's ggml-quants.c is not on this machine")
    np.testing.assert_array_equal((codes << np.array([0, 3, 6, 9])).sum(axis=1), kgrid)


def test_grids_equal_gguf_py():
    gguf = pytest.importorskip("gguf")
    for t, mags in ((GGMLType.IQ3_XXS, iq3.XXS_MAG), (GGMLType.IQ3_S, iq3.S_MAG)):
        cls = gguf.quants._type_traits[gguf.GGMLQuantizationType(int(t))]
        cls.init_grid()
        np.testing.assert_array_equal(cls.grid.reshape(mags.shape), mags)


def test_tables_are_built_on_first_use_not_at_import():
    code = ("import numpy as np\n"
            "from qtool.kernels import iq3\n"
            "assert not iq3._TABLES\n"
            "from qtool import kernels\n"
            "from qtool.formats.constants import GGMLType\n"
            "kernels.quantize(GGMLType.IQ3_XXS, np.ones((1, 256), np.float32))\n"
            "assert sorted(iq3._TABLES) == [256]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


# ---- llama.cpp's bytes, and where it aborts ----------------------------------------------------------------------

def _oracle_in_child(x, ggml_type, qw):
    """llama.cpp's bytes for rows x, computed in a forked child (its quantizer aborts the process on some rows);
    None if the child died."""
    need_llama_cpp()
    import llama_oracle
    llama_oracle._libggml().ggml_quantize_init(int(ggml_type))  # tables built once, in the parent
    out = np.zeros((x.shape[0], kernels.row_bytes(ggml_type, x.shape[1])), np.uint8)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write the bytes to the pipe; no backtrace (ggml runs gdb for one), no output
        try:
            faulthandler.disable()
            os.environ["GGML_NO_BACKTRACE"] = "1"
            os.close(r)
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            data = ggml_quantize(x, ggml_type, qw).tobytes()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 1 << 20)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks)
    if status != 0 or len(raw) != out.nbytes:
        return None
    return np.frombuffer(raw, np.uint8).reshape(out.shape)


def assert_equals_llama_cpp_or_both_refuse(ggml_type, x, qw, what):
    """Rows qtool says llama.cpp aborts on do abort it (each alone); all other rows equal llama.cpp's bytes."""
    with np.errstate(all="ignore"):
        aborts = iq3.llama_cpp_aborts(ggml_type, x, qw)
        good = np.flatnonzero(~aborts)
        got = kernels.quantize(ggml_type, x, quant_weights=qw)
        ref = _oracle_in_child(x[good], ggml_type, qw)
        assert ref is not None, f"{ggml_type.name} {what}: llama.cpp aborts on rows qtool expects it to quantize"
        bad = [int(good[i]) for i in range(len(good)) if not np.array_equal(got[good[i]], ref[i])]
        assert not bad, f"{ggml_type.name} {what}: rows {bad} differ from llama.cpp"
        for i in np.flatnonzero(aborts):
            assert _oracle_in_child(x[i:i + 1], ggml_type, qw) is None, \
                f"{ggml_type.name} {what}: llama.cpp quantizes row {i}, which qtool expects it to abort on"


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
@pytest.mark.parametrize("kind", (None, *IMPORTANCE_KINDS))
def test_adversarial_and_non_finite_rows(ggml_type, kind):
    x = adversarial_rows(finite=False)
    qw = importance(3, x.shape[1], kind) if kind else None
    assert_equals_llama_cpp_or_both_refuse(ggml_type, x, qw, f"adversarial {kind or 'plain'}")


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_rows_llama_cpp_aborts_on(ggml_type):
    """The adversarial rows llama.cpp refuses (checked against it above) are the non-finite and overflowing ones."""
    with np.errstate(all="ignore"):
        aborts = iq3.llama_cpp_aborts(ggml_type, adversarial_rows(finite=False))
    assert aborts[-1] and aborts[17:22].all() and not aborts[:16].any()


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
@pytest.mark.parametrize("weighted", (False, True), ids=("plain", "imatrix"))
def test_zero_and_tiny_32_weight_blocks(ggml_type, weighted):
    """All-zero (IQ3_S: its later blocks' bytes move forward) and near-GROUP_MAX_EPS_IQ3_XXS 32-weight blocks."""
    need_llama_cpp()
    x = random_rows(9, 1.0, "laplace", (24, 1024))
    rng = np.random.default_rng(9)
    for r in range(x.shape[0]):
        for ib in rng.choice(32, size=r % 9, replace=False):
            x[r, 32 * ib:32 * ib + 32] *= (0.0, -0.0, 1e-9, 5e-9, 2e-8)[(r + ib) % 5]
    qw = importance(9, x.shape[1], "lognormal") if weighted else None
    np.testing.assert_array_equal(kernels.quantize(ggml_type, x, quant_weights=qw), ggml_quantize(x, ggml_type, qw))


# ---- the fused kernels against ggml's vec_dot, transcribed in numpy ------------------------------------------------

def _signed_ints(ggml_type, packed: np.ndarray):
    """Each weight as its integer magnitude times sign (N, blocks, 256), each 32 weights' scale 2s+1 (N, blocks, 8)
    and d (N, blocks), decoded from the block bytes with numpy."""
    from qtool.kernels.iq_grids import iq3s_grid, iq3xxs_grid
    n = packed.shape[0]
    if ggml_type == GGMLType.IQ3_XXS:
        blk = packed.reshape(n, -1, 98)
        qs = blk[:, :, 2:66].astype(np.int64)
        ss = blk[:, :, 66:98].copy().view(np.uint32).astype(np.int64)  # (N, nb, 8)
        s7 = (ss[..., None] >> np.array([0, 7, 14, 21])) & 127  # (N, nb, 8, 4)
        parity = np.array([bin(v).count("1") & 1 for v in range(128)])[s7]
        sign_bits = s7 | parity << 7  # the 8 signs of each 8 weights
        mags = iq3xxs_grid[qs].reshape(n, -1, 8, 4, 8).astype(np.int64)
        scale = 2 * (ss >> 28) + 1
    else:
        blk = packed.reshape(n, -1, 110)
        qh = blk[:, :, 66:74].astype(np.int64)
        idx = blk[:, :, 2:66].astype(np.int64).reshape(n, -1, 8, 8) | (((qh[..., None] >> np.arange(8)) & 1) << 8)
        sign_bits = blk[:, :, 74:106].astype(np.int64).reshape(n, -1, 8, 4)
        mags = iq3s_grid[idx].reshape(n, -1, 8, 4, 8).astype(np.int64)
        sc = blk[:, :, 106:110].astype(np.int64)
        scale = 2 * np.stack([sc & 15, sc >> 4], axis=-1).reshape(n, -1, 8) + 1
    neg = (sign_bits[..., None] >> np.arange(8)) & 1
    ints = (mags * (1 - 2 * neg)).reshape(n, -1, QK_K)
    d = blk[:, :, 0:2].copy().view(np.float16).astype(np.float64)[:, :, 0]
    return ints, scale, d


def vec_dot_reference(ggml_type, packed: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_iq3_xxs_q8_K / iq3_s_q8_K (the generic C) in numpy: per 32 weights the integer dot of signed
    magnitudes and activation codes times 2s+1, per super-block times d*dx (IQ3_XXS: then 1/4). xq (T, blocks,
    256) codes, xd (T, blocks) scales. float64 (T, N)."""
    ints, scale, d = _signed_ints(ggml_type, packed)
    dots = np.einsum("nbek,tbek->tnbe", ints.reshape(*ints.shape[:2], 8, 32), xq.reshape(*xq.shape[:2], 8, 32))
    isum = (dots * scale[None]).sum(axis=3)  # (T, N, blocks), exact integers
    out = (isum * d[None] * xd[:, None, :]).sum(axis=2)
    return out / 4 if ggml_type == GGMLType.IQ3_XXS else out


@pytest.mark.parametrize("ggml_type", TYPES, ids=IDS)
def test_fused_kernel_equals_vec_dot(ggml_type):
    rng = np.random.default_rng(2)
    n_out, n_in = 21, QK_K * 9
    w_f = (rng.laplace(size=(n_out, n_in)) * rng.uniform(0.1, 2.0, (n_out, 1))).astype(np.float32)
    x = (rng.standard_normal((2, n_in)) * 3).astype(np.float32)
    packed = kernels.quantize(ggml_type, w_f)
    w = mm.Weight("w", ggml_type, packed, n_out, n_in)
    act = mm.Act("q8_k", x)
    out = mm.matvec(w, act)
    xq, xd, _ = act.planes()  # (T, 256, lanes), (T, lanes): the blocks padded to the lane count
    nb = n_in // QK_K
    xq = np.ascontiguousarray(np.moveaxis(xq[:, :, :nb], 2, 1)).astype(np.int64)
    ref = vec_dot_reference(ggml_type, packed, xq, xd[:, :nb].astype(np.float64))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6
