"""Whole files against llama.cpp's quantizer: requantizing an F32 GGUF with qtool gives the file llama-quantize
gives, byte for byte, for every --type (with llama-imatrix's own importance matrix for the IQ and ternary types,
as llama-quantize --imatrix: the same tensors and metadata but the quantize.imatrix.* keys, which the
llama-quantize tool, not llama_model_quantize, adds); converting the checkpoint directly gives the same tensors."""
from __future__ import annotations

import ctypes

import pytest

from conftest import SHARED, qtool_here
from llama_oracle import need_llama_cpp
from qtool.formats.constants import FILE_TYPES
from qtool.formats.gguf_reader import GGUFFile

QUANT_TYPES = [t for t in FILE_TYPES if t not in ("F32", "F16", "BF16")]
# the IQ and ternary presets, tested with the shared importance matrix (several refuse to work without one)
IQ_PRESETS = [t for t in QUANT_TYPES if t.startswith(("IQ", "TQ"))]
PLAIN = [t for t in QUANT_TYPES if t not in IQ_PRESETS]
IMATRIX = SHARED / "reference" / "stories3M.imatrix.gguf"


@pytest.fixture(scope="module")
def llama_quantized(tmp_path_factory, converted):
    llama_cpp = need_llama_cpp()
    folder = tmp_path_factory.mktemp("llama-quantize")
    cache = {}

    def get(model: str, type_name: str, imatrix=None):
        if (model, type_name, imatrix) not in cache:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = int(FILE_TYPES[type_name])
            params.nthread = 2
            keep = _imatrix_param(llama_cpp, params, imatrix) if imatrix else None  # noqa: F841 (kept alive)
            out = folder / f"{model}.{type_name}{'.imatrix' if imatrix else ''}.gguf"
            rc = llama_cpp.llama_model_quantize(str(converted(model, "F32")).encode(), str(out).encode(),
                                                ctypes.byref(params))
            assert rc == 0
            cache[model, type_name, imatrix] = out
        return cache[model, type_name, imatrix]
    return get


def _imatrix_param(llama_cpp, params, path):
    """llama-quantize --imatrix's argument to llama_model_quantize: per entry its in_sum2 / counts, as the
    llama_model_imatrix_data array (NULL-terminated); returns the buffers, which must outlive the call."""
    from qtool.formats.imatrix import read_imatrix
    data = read_imatrix(path)
    entries = (llama_cpp.llama_model_imatrix_data * (len(data.entries) + 1))()  # zeroed: the terminator
    keep = [entries]
    for i, name in enumerate(sorted(data.entries)):
        w = data.importance(name).astype("float32").ravel()
        values = (ctypes.c_float * w.size)(*w.tolist())
        keep.append(values)
        entries[i].name, entries[i].size = name.encode(), w.size
        entries[i].data = ctypes.cast(values, type(entries[i].data))
    params.imatrix = ctypes.cast(entries, type(params.imatrix))
    return keep


def assert_same_file(ours, ref, skip_keys=()) -> None:
    """Byte for byte, or, with keys to skip, every other key (in order) and every tensor's type and bytes."""
    if not skip_keys and ours.read_bytes() == ref.read_bytes():
        return
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        keys = [k for k in a.fields if not k.startswith(skip_keys)] if skip_keys else list(a.fields)
        assert keys == list(b.fields)
        for k in keys:
            assert a.get(k) == b.get(k) if not hasattr(a.get(k), "__len__") or isinstance(a.get(k), str) \
                else list(a.get(k)) == list(b.get(k)), k
        assert list(a.tensors) == list(b.tensors)
        for name, t in b.tensors.items():
            assert a.tensors[name].ggml_type == t.ggml_type, name
            assert (a.raw(name) == b.raw(name)).all(), f"{name} ({t.ggml_type.name}) differs"
    if not skip_keys:
        pytest.fail("files differ outside metadata keys and tensor data")


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
@pytest.mark.parametrize("type_name", PLAIN)
def test_requantizing_equals_llama_quantize_byte_for_byte(model, type_name, converted, llama_quantized, tmp_path):
    ours = tmp_path / "ours.gguf"
    qtool_here("convert", converted(model, "F32"), "-o", ours, "--type", type_name, "--quiet", check=True)
    assert_same_file(ours, llama_quantized(model, type_name))


@pytest.mark.parametrize("type_name", IQ_PRESETS)
def test_iq_presets_with_the_imatrix_equal_llama_quantize(type_name, converted, llama_quantized, tmp_path):
    """stories3M (rows of 256 and 768: no fallbacks) with llama-imatrix's own importance matrix of it."""
    if not IMATRIX.is_file():
        pytest.skip(f"{IMATRIX} is not here")
    ours = tmp_path / "ours.gguf"
    qtool_here("convert", converted("stories3M", "F32"), "-o", ours, "--type", type_name, "--imatrix", IMATRIX,
          "--quiet", check=True)
    assert_same_file(ours, llama_quantized("stories3M", type_name, IMATRIX), skip_keys=("quantize.imatrix.",))


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
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "Q4_0")
    assert proc.returncode == 1 and "--allow-requantize" in proc.stderr and not (tmp_path / "x.gguf").exists()
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "Q4_0", "--allow-requantize")
    assert proc.returncode == 0 and "warning" in proc.stderr
    with GGUFFile(tmp_path / "x.gguf") as g:
        assert g.get("general.file_type") == int(FILE_TYPES["Q4_0"])


def test_options_reach_the_recipe(converted, tmp_path):
    out = tmp_path / "o.gguf"
    qtool_here("convert", converted("stories3M", "F32"), "-o", out, "--type", "Q4_K_M", "--pure",
          "--output-tensor-type", "q8_0", "--tensor-type", r"blk\.0\.attn_q=q5_k", "--quiet", check=True)
    with GGUFFile(out) as g:
        assert g.tensors["output.weight"].ggml_type.name == "Q8_0"
        assert g.tensors["blk.0.attn_q.weight"].ggml_type.name == "Q5_K"
        assert g.tensors["blk.1.attn_v.weight"].ggml_type.name == "Q4_K"  # --pure: no Q6_K bump
        assert g.tensors["blk.1.attn_norm.weight"].ggml_type.name == "F32"


@pytest.mark.parametrize("type_name", PLAIN)
def test_every_recipe_file_loads_and_generates_in_llama_cpp(type_name, converted):
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(converted("stories3M", type_name)), n_ctx=128, n_threads=2, verbose=False)
    out = llm("Once upon a time", max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    assert out.startswith(", there was a little")  # the teacher's opening, which every quantization keeps
