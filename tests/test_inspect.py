"""`qtool inspect` on GGUF files (ours and llama.cpp's) and on checkpoint folders."""
from __future__ import annotations

import ctypes
import json

import gguf
import pytest

from conftest import qtool


def inspect_json(*args) -> dict:
    proc = qtool("inspect", *args, "--json", check=True)
    return json.loads(proc.stdout)


def test_gguf_summary_layers_and_tensors_agree_with_gguf_py(converted):
    path = converted("stories260K", "Q8_0")
    r = inspect_json(path, "--tensors", "--meta")
    ref = gguf.GGUFReader(path)
    assert r["architecture"] == "llama" and r["file_type"] == "Q8_0" and r["vocab_size"] == 512
    assert r["context_length"] == 512 and r["block_count"] == 5 and r["alignment"] == 32
    assert r["tensor_count"] == len(ref.tensors) == sum(row["tensors"] for row in r["layers"])
    by_name = {t.name: t for t in ref.tensors}
    for t in r["tensors"]:
        g = by_name[t["name"]]
        assert t["type"] == g.tensor_type.name and t["nbytes"] == g.n_bytes and t["n_elements"] == g.n_elements
        assert t["offset"] == g.data_offset
        if t["type"] == "Q8_0":
            assert t["bits_per_weight"] == 8.5
    assert r["tensor_bytes"] == sum(row["bytes"] for row in r["layers"]) == sum(t.n_bytes for t in ref.tensors)
    assert r["parameters"] == 260_032
    assert r["types"] == {"F16": 5, "F32": 11, "Q8_0": 31}
    # a dense model: no experts, and a token reads every tensor (MoE files: tests/test_moe.py)
    assert r["expert_count"] == 0 and all(row["experts"] == 0 for row in r["layers"])
    assert (r["active_parameters"], r["bytes_per_token"]) == (r["parameters"], r["tensor_bytes"])
    tokens = r["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["type"] == "ARRAY[STRING]" and len(tokens["value"]) == 512  # --json --meta: nothing cut


def test_text_output_shows_layers_and_totals(converted):
    proc = qtool("inspect", converted("stories260K", "Q8_0"), "--tensors", "--meta", check=True)
    for text in ("per layer", "total", "blk.4.ffn_down.weight", "token_embd", "tokenizer.ggml.tokens", "more"):
        assert text in proc.stdout


def test_reads_a_file_written_by_llama_cpp(converted, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # Q4_K_M
    out = tmp_path / "llama-written.gguf"
    assert llama_cpp.llama_model_quantize(str(converted("stories3M", "F32")).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    r = inspect_json(out, "--tensors")
    ref = gguf.GGUFReader(out)
    assert r["file_type"] == "Q4_K_M" and r["tensor_count"] == len(ref.tensors)
    assert {t["name"]: t["type"] for t in r["tensors"]} == {t.name: t.tensor_type.name for t in ref.tensors}
    assert r["file_bytes"] == out.stat().st_size


def test_checkpoint_sizes_are_the_sizes_convert_writes(stories3m, converted):
    r = inspect_json(stories3m)
    assert r["parameters"] == 4_984_064
    assert sum(row["parameters"] for row in r["layers"]) == r["parameters"]
    sizes = {s["type"]: s["file_bytes"] for s in r["sizes"]}
    for type_name in ("F32", "F16", "Q8_0"):
        assert sizes[type_name] == converted("stories3M", type_name).stat().st_size
