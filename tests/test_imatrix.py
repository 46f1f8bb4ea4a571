"""Importance matrix: the file formats (ours read back by gguf-py, llama-imatrix's read by ours, malformed input a
one-line error) and `qtool imatrix` against llama-imatrix's own output on the shared models.

Tolerance against llama-imatrix: counts, entry names, chunk_count and chunk_size exactly; in_sum2 per entry within
a relative L2 error of 1e-4 and every element within 1e-3 relative (measured: at most 1.7e-5 / 2.4e-4 on stories3M
and 4.0e-5 / 1.2e-4 on stories260K, from float32 sums of slightly different activations).
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import EXAMPLE_260K, EXAMPLE_EVAL, SHARED, qtool, qtool_here
from qtool.errors import QtoolError
from qtool.formats.imatrix import ImatrixData, ImatrixEntry, read_imatrix, write_imatrix

REF = SHARED / "reference"
CALIB = SHARED / "eval" / "calibration_stories.txt"
VEC_RTOL = 1e-4  # relative L2 error of each in_sum2 vector
ELEM_RTOL = 1e-3  # relative error of each element

LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def need(path):
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path


def _sample() -> ImatrixData:
    rng = np.random.default_rng(0)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 100, np.array([640], np.float32),
                                            rng.standard_normal((1, 64)).astype(np.float32)),
        "blk.0.ffn_down.weight": ImatrixEntry(rng.random((1, 32), dtype=np.float32), np.array([640], np.float32)),
        "blk.1.ffn_up_exps.weight": ImatrixEntry(rng.random((4, 16), dtype=np.float32),
                                                 np.array([10, 0, 30, 40], np.float32)),
    }
    return ImatrixData(entries, ["calib.txt", "more.txt"], 10, 64)


# ---- formats --------------------------------------------------------------------------------------------------
def test_written_file_reads_back_in_gguf_py_and_ours(tmp_path):
    gguf = pytest.importorskip("gguf")
    data = _sample()
    path = tmp_path / "x.imatrix.gguf"
    write_imatrix(path, data)
    r = gguf.GGUFReader(str(path))
    f = r.fields
    assert bytes(f["general.type"].parts[-1]).decode() == "imatrix"
    assert [bytes(f["imatrix.datasets"].parts[i]).decode() for i in f["imatrix.datasets"].data] == data.datasets
    assert int(f["imatrix.chunk_count"].parts[-1][0]) == 10 and int(f["imatrix.chunk_size"].parts[-1][0]) == 64
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "blk.0.attn_q.weight.in_sum",
                             "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts",
                             "blk.1.ffn_up_exps.weight.in_sum2", "blk.1.ffn_up_exps.weight.counts"]
    for name, e in data.entries.items():
        np.testing.assert_array_equal(np.asarray(tensors[f"{name}.in_sum2"].data).reshape(e.in_sum2.shape), e.in_sum2)
        np.testing.assert_array_equal(np.asarray(tensors[f"{name}.counts"].data).reshape(-1), e.counts)
    # MoE: in_sum2 ne = [n_cols, n_mat], counts ne = [1, n_mat], as llama-imatrix shapes them
    assert list(tensors["blk.1.ffn_up_exps.weight.in_sum2"].shape) == [16, 4]
    assert list(tensors["blk.1.ffn_up_exps.weight.counts"].shape) == [1, 4]
    back = read_imatrix(path)
    assert back.datasets == data.datasets and back.chunk_count == 10 and back.chunk_size == 64
    for name, e in data.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    q = "blk.0.attn_q.weight"
    np.testing.assert_array_equal(back.entries[q].in_sum, data.entries[q].in_sum)


def test_importance_is_llama_quantize_division():
    data = _sample()
    e = data.entries["blk.1.ffn_up_exps.weight"]
    imp = data.importance("blk.1.ffn_up_exps.weight").reshape(4, 16)
    assert imp.dtype == np.float32
    np.testing.assert_array_equal(imp[0], e.in_sum2[0] / np.float32(10))
    np.testing.assert_array_equal(imp[1], np.ones(16, np.float32))  # an expert never reached: weight 1
    np.testing.assert_array_equal(imp[3], e.in_sum2[3] / np.float32(40))


def test_llama_imatrix_files_read_and_round_trip(tmp_path):
    ref = read_imatrix(need(REF / "stories3M.imatrix.gguf"))
    assert len(ref.entries) == 42 and ref.chunk_count == 178 and ref.chunk_size == 256
    assert ref.datasets == ["calibration_stories.txt"] and not ref.legacy
    assert all(name.startswith("blk.") for name in ref.entries)
    assert all(e.counts.tolist() == [178 * 256] for e in ref.entries.values())
    # ours written from llama.cpp's data is llama.cpp's file, byte for byte
    write_imatrix(tmp_path / "again.gguf", ref)
    assert (tmp_path / "again.gguf").read_bytes() == (REF / "stories3M.imatrix.gguf").read_bytes()
    # the legacy .dat of the same run: the same entries and the same importance llama-quantize would use
    dat = read_imatrix(need(REF / "stories3M.imatrix.dat"))
    assert dat.legacy and sorted(dat.entries) == sorted(ref.entries) and dat.chunk_count == 178
    assert dat.datasets == ["calibration_stories.txt"]
    for name in ref.entries:
        np.testing.assert_allclose(dat.importance(name), ref.importance(name), rtol=1e-6)
    small = read_imatrix(need(REF / "stories260K.imatrix.gguf"))
    assert len(small.entries) == 35 and small.chunk_size == 256


def _gguf_bytes(tmp_path, data: ImatrixData) -> bytes:
    write_imatrix(tmp_path / "ok.gguf", data)
    return (tmp_path / "ok.gguf").read_bytes()


def _raw_imatrix(path, tensors: dict) -> None:
    """An imatrix-typed GGUF file with exactly these F32 tensors (to build inconsistent ones)."""
    from qtool.formats.constants import GGMLType, ValueType
    from qtool.formats.gguf_writer import GGUFWriter
    w = GGUFWriter(path)
    w.add("general.type", "imatrix", ValueType.STRING)
    w.add("imatrix.chunk_count", 1, ValueType.UINT32)
    w.add("imatrix.chunk_size", 8, ValueType.UINT32)
    for name, arr in tensors.items():
        w.add_tensor(name, arr.shape, GGMLType.F32)
    with w:
        for name, arr in tensors.items():
            w.write_tensor(name, arr)


@pytest.mark.parametrize("case", ["truncated", "nan", "not_imatrix", "no_counts", "garbage", "empty",
                                  "dat_truncated", "dat_bad_name", "sizes", "write_mismatch"])
def test_malformed_files_are_one_line_errors(tmp_path, case):
    bad = tmp_path / "bad.imatrix"
    data = _sample()
    if case == "truncated":
        bad.write_bytes(_gguf_bytes(tmp_path, data)[:-20])
    elif case == "nan":
        data.entries["blk.0.ffn_down.weight"].in_sum2[0, 3] = np.nan
        bad.write_bytes(_gguf_bytes(tmp_path, data))
    elif case == "not_imatrix":
        from qtool.formats.gguf_writer import GGUFWriter
        from qtool.formats.constants import ValueType
        with GGUFWriter(bad) as w:
            w.add("general.type", "model", ValueType.STRING)
    elif case == "no_counts":
        _raw_imatrix(bad, {"blk.0.attn_q.weight.in_sum2": np.ones(8, np.float32)})
    elif case == "garbage":
        bad.write_bytes(b"\xff\xff\xff\x7f" + b"x" * 100)
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "dat_truncated":
        bad.write_bytes(need(REF / "stories3M.imatrix.dat").read_bytes()[:5000])
    elif case == "dat_bad_name":
        bad.write_bytes(struct.pack("<ii", 1, -5) + b"\0" * 64)
    elif case == "sizes":  # 10 sums cannot be split over 4 experts
        _raw_imatrix(bad, {"blk.0.ffn_up_exps.weight.in_sum2": np.ones(10, np.float32),
                           "blk.0.ffn_up_exps.weight.counts": np.ones(4, np.float32)})
    elif case == "write_mismatch":  # the writer refuses what the reader would refuse
        data.entries["blk.0.ffn_down.weight"].counts = np.ones(3, np.float32)
        with pytest.raises(QtoolError) as exc:
            write_imatrix(bad, data)
        assert "\n" not in str(exc.value) and not bad.exists()
        return
    with pytest.raises(QtoolError) as exc:
        read_imatrix(bad)
    assert "\n" not in str(exc.value) and str(bad) in str(exc.value)


# ---- qtool imatrix ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours(converted, tmp_path_factory):
    """qtool imatrix --ctx 256 on the calibration text, once per model."""
    folder = tmp_path_factory.mktemp("imatrix")
    cache = {}

    def get(model: str):
        if model not in cache:
            need(CALIB)
            out = folder / f"{model}.imatrix.gguf"
            proc = qtool_here("imatrix", converted(model, "F32"), "--text", CALIB, "--ctx", "256", "-o", out,
                              "--json", check=True)
            cache[model] = (read_imatrix(out), json.loads(proc.stdout))
        return cache[model]
    return get


@pytest.mark.parametrize("model", ["stories3M", "stories260K"])
def test_equals_llama_imatrix(ours, model):
    ref = read_imatrix(need(REF / f"{model}.imatrix.gguf"))
    if not (SHARED / "models" / model).is_dir():
        pytest.skip(f"{SHARED / 'models' / model} is not here")
    got, summary = ours(model)
    assert summary["chunks"] == ref.chunk_count and summary["entries"] == len(ref.entries)
    assert summary["tokens_per_s"] > 0
    assert_equals_llama_imatrix(got, ref)


def assert_equals_llama_imatrix(got: ImatrixData, ref: ImatrixData) -> None:
    """Entries, counts and chunking exactly; sums within VEC_RTOL / ELEM_RTOL (the module's docstring)."""
    assert sorted(got.entries) == sorted(ref.entries)
    assert (got.chunk_count, got.chunk_size) == (ref.chunk_count, ref.chunk_size)
    worst_vec = worst_elem = 0.0
    for name, r in ref.entries.items():
        g = got.entries[name]
        np.testing.assert_array_equal(g.counts, r.counts, err_msg=name)
        worst_vec = max(worst_vec, float(np.linalg.norm(g.in_sum2 - r.in_sum2) / np.linalg.norm(r.in_sum2)))
        worst_elem = max(worst_elem, float(np.max(np.abs(g.in_sum2 - r.in_sum2) / np.abs(r.in_sum2))))
        imp_rel = np.abs(got.importance(name) / ref.importance(name) - 1).max()
        assert imp_rel < ELEM_RTOL, name
    assert worst_vec < VEC_RTOL and worst_elem < ELEM_RTOL, (worst_vec, worst_elem)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + eps) * w).astype(np.float32)


def test_bundled_example_without_shared(tmp_path):
    """On examples/stories260K: entries, counts and chunking as llama-imatrix's, and layer 0's attention input
    recomputed here from the file's own tensors (embedding rows through the RMSNorm)."""
    model = tmp_path / "s.gguf"
    qtool_here("convert", EXAMPLE_260K, "--type", "F32", "-o", model, "--quiet", check=True)
    out = tmp_path / "imatrix.gguf"
    ctx, n = 64, 3
    proc = qtool_here("imatrix", model, "--text", EXAMPLE_EVAL, "--ctx", ctx, "--chunks", n, "-o", out, "--quiet",
                 check=True)
    assert proc.stdout == "" and proc.stderr == ""
    data = read_imatrix(out)
    assert sorted(data.entries) == sorted(f"blk.{i}.{t}.weight" for i in range(5) for t in LAYER_TENSORS)
    assert (data.chunk_count, data.chunk_size) == (n, ctx) and data.datasets == [str(EXAMPLE_EVAL)]
    assert all(e.counts.tolist() == [n * ctx] and e.in_sum is not None for e in data.entries.values())
    # products that share an input have the same sums
    for i in range(5):
        q = data.entries[f"blk.{i}.attn_q.weight"]
        for t in ("attn_k", "attn_v"):
            np.testing.assert_array_equal(data.entries[f"blk.{i}.{t}.weight"].in_sum2, q.in_sum2)
        np.testing.assert_array_equal(data.entries[f"blk.{i}.ffn_up.weight"].in_sum2,
                                      data.entries[f"blk.{i}.ffn_gate.weight"].in_sum2)
    # layer 0's attention input, independently: the chunks (BOS first) through token_embd and attn_norm
    from qtool.formats.gguf_reader import GGUFFile
    from qtool.tokenizer import Tokenizer
    with GGUFFile(model) as g:
        tok = Tokenizer.from_metadata(g.metadata)
        emb = np.array(g.array("token_embd.weight"))
        norm = np.array(g.array("blk.0.attn_norm.weight"))
        eps = float(g.get("llama.attention.layer_norm_rms_epsilon"))
    ids = tok.encode(EXAMPLE_EVAL.read_text(), add_bos=True)[:n * ctx]
    ids = np.array(ids).reshape(n, ctx)
    ids[:, 0] = tok.bos_id
    h = _rms_norm(emb[ids.reshape(-1)], norm, eps)
    e = data.entries["blk.0.attn_q.weight"]
    np.testing.assert_allclose(e.in_sum2[0], (h.astype(np.float64) ** 2).sum(axis=0), rtol=1e-4)
    np.testing.assert_allclose(e.in_sum[0], h.astype(np.float64).sum(axis=0), rtol=1e-3, atol=1e-3)
    # ours round-trips byte for byte
    write_imatrix(tmp_path / "again.gguf", data)
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()


def test_process_output_and_errors(tmp_path, converted):
    model = converted("stories3M", "F32")
    out = tmp_path / "o.gguf"
    proc = qtool_here("imatrix", model, "--text", EXAMPLE_EVAL, "--ctx", "32", "--chunks", "2", "--process-output",
                 "-o", out, "--json", check=True)
    summary = json.loads(proc.stdout)
    data = read_imatrix(out)
    assert "output.weight" in data.entries and summary["entries"] == len(data.entries) == 43
    assert data.entries["output.weight"].counts.tolist() == [64]
    # too little text for two chunks: llama-imatrix's refusal, one line
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    proc = qtool("imatrix", model, "--text", short, "--ctx", "64", "-o", tmp_path / "x.gguf")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "two chunks" in proc.stderr
    assert not (tmp_path / "x.gguf").exists()
    proc = qtool("imatrix", model, "--text", short, "--ctx", "0", "-o", tmp_path / "x.gguf")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


# ---- qtool inspect ----------------------------------------------------------------------------------------------
def test_inspect_shows_entries_chunks_datasets_and_statistics():
    path = need(REF / "stories3M.imatrix.gguf")
    proc = qtool("inspect", path, "--json", check=True)
    r = json.loads(proc.stdout)
    assert (r["format"], r["entries"], r["chunk_count"], r["chunk_size"]) == ("gguf", 42, 178, 256)
    assert r["datasets"] == ["calibration_stories.txt"]
    ref = read_imatrix(path)
    rows = {x["name"]: x for x in r["tensors"]}
    assert list(rows)[:8] == sorted(list(rows)[:7]) + ["blk.1.attn_k.weight"]  # by layer, then name
    for name in ref.entries:
        imp = ref.importance(name).astype(np.float64)
        x = rows[name]
        assert x["elements"] == imp.size and x["count"] == 178 * 256
        assert x["sum"] == pytest.approx(imp.sum()) and x["max"] == pytest.approx(imp.max())
        assert x["mean"] == pytest.approx(imp.mean()) and x["std"] == pytest.approx(imp.std(ddof=1))
        assert 0 < x["entropy_pct"] <= 100
    assert rows["blk.0.attn_q.weight"]["cos_prev"] is None and 0 < rows["blk.1.attn_q.weight"]["cos_prev"] <= 1
    text = qtool("inspect", path, check=True).stdout
    for needle in ("entries", "42", "chunks", "178", "calibration_stories.txt", "blk.5.ffn_down.weight", "CosSim"):
        assert needle in text
    dat = json.loads(qtool("inspect", need(REF / "stories3M.imatrix.dat"), "--json", check=True).stdout)
    assert (dat["format"], dat["entries"], dat["chunk_count"], dat["chunk_size"]) == ("dat", 42, 178, None)


def test_inspect_prints_file_strings_as_plain_text(tmp_path):
    data = _sample()
    data.datasets = ["[bold red]calib[/].txt"]
    data.entries["blk.2.[red]x.weight"] = data.entries.pop("blk.0.ffn_down.weight")
    path = tmp_path / "[b]odd.gguf"
    write_imatrix(path, data)
    out = qtool("inspect", path, check=True).stdout
    assert "[bold red]calib[/].txt" in out and "blk.2.[red]x.weight" in out and "[b]odd.gguf" in out


def test_moe_products_keep_per_expert_rows_and_counts(tmp_path):
    """llama-imatrix's MUL_MAT_ID statistics: each routed (token, slot) adds its row to its expert; the file
    holds (n_expert, cols) sums and n_expert counts, and an expert never routed to gets importance 1."""
    from qtool.imatrix import Collector
    rng = np.random.default_rng(1)
    T, n_used, n_exp, cols = 40, 2, 4, 8
    ids = np.stack([rng.choice(3, size=n_used, replace=False) for _ in range(T)])  # expert 3 never chosen
    shared = rng.standard_normal((T, cols)).astype(np.float32)  # gate/up: one input for every slot
    per_slot = rng.standard_normal((T, n_used, cols)).astype(np.float32)  # down: one input per slot
    col = Collector()
    col.experts("blk.0.ffn_gate_exps.weight", shared, ids, n_exp)
    col.experts("blk.0.ffn_down_exps.weight", per_slot, ids, n_exp)
    col("blk.0.attn_q.weight", shared)
    data = col.data(T, 1, ["t"])
    for name, x in (("blk.0.ffn_gate_exps.weight", np.repeat(shared[:, None], n_used, 1)),
                    ("blk.0.ffn_down_exps.weight", per_slot)):
        e = data.entries[name]
        assert e.in_sum2.shape == (n_exp, cols)
        for ex in range(n_exp):
            rows = x[ids == ex].astype(np.float64)
            assert e.counts[ex] == len(rows)
            np.testing.assert_allclose(e.in_sum2[ex], (rows ** 2).sum(axis=0), rtol=1e-5)
            np.testing.assert_allclose(e.in_sum[ex], rows.sum(axis=0), rtol=1e-4, atol=1e-5)
    assert data.entries["blk.0.attn_q.weight"].counts.tolist() == [T]
    write_imatrix(tmp_path / "moe.gguf", data)
    back = read_imatrix(tmp_path / "moe.gguf")
    imp = back.importance("blk.0.ffn_down_exps.weight").reshape(n_exp, cols)
    np.testing.assert_array_equal(imp[3], np.ones(cols, np.float32))
    np.testing.assert_array_equal(back.entries["blk.0.ffn_down_exps.weight"].counts,
                                  data.entries["blk.0.ffn_down_exps.weight"].counts)
    with pytest.raises(QtoolError):
        col.experts("blk.0.ffn_gate_exps.weight", shared, np.full((T, n_used), 9), n_exp)
