"""Whole files against llama.cpp's quantizer: requantizing an F32 GGUF with qtool gives the file llama-quantize
gives, byte for byte, for every --type; converting the checkpoint directly gives the same tensors."""
from __future__ import annotations

import ctypes

import pytest

from conftest import qtool
from llama_oracle import need_llama_cpp
from qtool.formats.constants import FILE_TYPES
from qtool.formats.gguf_reader import GGUFFile

QUANT_TYPES = [t for t in FILE_TYPES if t not in ("F32", "F16", "BF16")]


@pytest.fixture(scope="module")
def llama_quantized(tmp_path_factory, converted):
    llama_cpp = need_llama_cpp()
    folder = tmp_path_factory.mktemp("llama-quantize")
    cache = {}

    def get(model: str, type_name: str):
        if (model, type_name) not in cache:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = int(FILE_TYPES[type_name])
            params.nthread = 2
            out = folder / f"{model}.{type_name}.gguf"
            rc = llama_cpp.llama_model_quantize(str(converted(model, "F32")).encode(), str(out).encode(),
                                                ctypes.byref(params))
            assert rc == 0
            cache[model, type_name] = out
        return cache[model, type_name]
    return get


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
@pytest.mark.parametrize("type_name", QUANT_TYPES)
def test_requantizing_equals_llama_quantize_byte_for_byte(model, type_name, converted, llama_quantized, tmp_path):
    ours = tmp_path / "ours.gguf"
    qtool("convert", converted(model, "F32"), "-o", ours, "--type", type_name, "--quiet", check=True)
    ref = llama_quantized(model, type_name)
    if ours.read_bytes() != ref.read_bytes():
        with GGUFFile(ours) as a, GGUFFile(ref) as b:
            assert list(a.fields) == list(b.fields)
            for name, t in b.tensors.items():
                assert a.tensors[name].ggml_type == t.ggml_type, name
                assert (a.raw(name) == b.raw(name)).all(), f"{name} ({t.ggml_type.name}) differs"
        pytest.fail("files differ outside metadata keys and tensor data")


@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q2_K", "Q5_0", "Q3_K_L"])
def test_converting_the_checkpoint_gives_llama_quantize_tensors(type_name, converted, llama_quantized):
    with GGUFFile(converted("stories3M", type_name)) as a, GGUFFile(llama_quantized("stories3M", type_name)) as b:
        assert set(a.tensors) == set(b.tensors)
        for name, t in b.tensors.items():
            assert a.tensors[name].ggml_type == t.ggml_type, name
            assert (a.raw(name) == b.raw(name)).all(), name
        assert a.get("general.file_type") == b.get("general.file_type")


def test_requantizing_a_quantized_file_needs_allow_requantize(converted, tmp_path):
    src = converted("stories3M", "Q8_0")
    proc = qtool("convert", src, "-o", tmp_path / "x.gguf", "--type", "Q4_0")
    assert proc.returncode == 1 and "--allow-requantize" in proc.stderr and not (tmp_path / "x.gguf").exists()
    proc = qtool("convert", src, "-o", tmp_path / "x.gguf", "--type", "Q4_0", "--allow-requantize")
    assert proc.returncode == 0 and "warning" in proc.stderr
    with GGUFFile(tmp_path / "x.gguf") as g:
        assert g.get("general.file_type") == int(FILE_TYPES["Q4_0"])


def test_options_reach_the_recipe(converted, tmp_path):
    out = tmp_path / "o.gguf"
    qtool("convert", converted("stories3M", "F32"), "-o", out, "--type", "Q4_K_M", "--pure",
          "--output-tensor-type", "q8_0", "--tensor-type", r"blk\.0\.attn_q=q5_k", "--quiet", check=True)
    with GGUFFile(out) as g:
        assert g.tensors["output.weight"].ggml_type.name == "Q8_0"
        assert g.tensors["blk.0.attn_q.weight"].ggml_type.name == "Q5_K"
        assert g.tensors["blk.1.attn_v.weight"].ggml_type.name == "Q4_K"  # --pure: no Q6_K bump
        assert g.tensors["blk.1.attn_norm.weight"].ggml_type.name == "F32"


@pytest.mark.parametrize("type_name", QUANT_TYPES)
def test_every_recipe_file_loads_and_generates_in_llama_cpp(type_name, converted):
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(converted("stories3M", type_name)), n_ctx=128, n_threads=2, verbose=False)
    out = llm("Once upon a time", max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    assert out.startswith(", there was a little")  # the teacher's opening, which every quantization keeps
