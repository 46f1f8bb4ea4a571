"""qtool.recipes: per-tensor type choice, unit-tested and checked against llama.cpp's own quantizer.

The oracle tests write a small F32 llama GGUF with gguf-py, run llama_model_quantize (llama.cpp vendored in
llama-cpp-python 0.3.36) and compare every output tensor type with plan_types. Weights are random: values do not
affect type choice.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import pytest

from qtool.errors import QtoolError, UsageError
from qtool.formats.constants import FILE_TYPES, FileType, GGMLType as T
from qtool.recipes import (
    Cat, ModelFacts, RecipeOptions, allows_quantization, category, default_type, file_type, llama_order, n_dims,
    parse_tensor_type, plan_types, use_more_bits,
)

# ---------------------------------------------------------------------------------------------------------------
# model shapes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    dim: int
    ff: int
    vocab: int
    tied: bool
    rows: int | None = None  # shrink every row count (types depend only on row length), to keep files small

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts("llama", self.n_layer, self.n_head, self.n_head_kv)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """llama tensors in numpy order (rows, cols)."""
        r = (lambda n: self.rows or n)
        kv = self.dim // self.n_head * self.n_head_kv
        out = [("token_embd.weight", (r(self.vocab), self.dim)), ("output_norm.weight", (self.dim,))]
        if not self.tied:
            out.append(("output.weight", (r(self.vocab), self.dim)))
        for i in range(self.n_layer):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (self.dim,)),
                    (b + "attn_q.weight", (r(self.dim), self.dim)), (b + "attn_k.weight", (r(kv), self.dim)),
                    (b + "attn_v.weight", (r(kv), self.dim)), (b + "attn_output.weight", (r(self.dim), self.dim)),
                    (b + "ffn_norm.weight", (self.dim,)),
                    (b + "ffn_gate.weight", (r(self.ff), self.dim)), (b + "ffn_up.weight", (r(self.ff), self.dim)),
                    (b + "ffn_down.weight", (r(self.dim), self.ff))]
        return out


STORIES260K = Shape("stories260K", n_layer=5, n_head=8, n_head_kv=4, dim=64, ff=172, vocab=512, tied=True)
STORIES3M = Shape("stories3M", n_layer=6, n_head=8, n_head_kv=4, dim=256, ff=768, vocab=512, tied=False,
                  rows=32)  # real row lengths (what type choice reads), fewer rows: 8x faster
GQA8 = Shape("gqa8-12L", n_layer=12, n_head=8, n_head_kv=1, dim=256, ff=640, vocab=320, tied=False, rows=16)
ODD = Shape("odd-9L-tied", n_layer=9, n_head=6, n_head_kv=2, dim=384, ff=1000, vocab=256, tied=True, rows=16)
DEEP = Shape("deep-32L", n_layer=32, n_head=8, n_head_kv=2, dim=256, ff=512, vocab=64, tied=False, rows=8)
SHAPES = [STORIES260K, STORIES3M, GQA8, ODD, DEEP]


def types_of(plans) -> dict[str, T]:
    return {p.name: p.ggml_type for p in plans}


# ---------------------------------------------------------------------------------------------------------------
# unit tests
# ---------------------------------------------------------------------------------------------------------------


def test_use_more_bits():
    assert {i for i in range(32) if use_more_bits(i, 32)} == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert [i for i in range(5) if use_more_bits(i, 5)] == [2, 4]
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(12) if use_more_bits(i, 12)] == [0, 3, 6, 9, 10, 11]


def test_names_and_file_types():
    assert file_type("q4_k_m") is FileType.MOSTLY_Q4_K_M and file_type("F32") is FileType.ALL_F32
    assert file_type("bf16") == 32 and file_type("Q8_0") == 7 and file_type("q6_k") == 18
    assert default_type("Q3_K_L") is T.Q3_K and default_type("f16") is T.F16
    with pytest.raises(UsageError):
        file_type("IQ2_XS")
    assert parse_tensor_type(r"ATTN_V=Q8_0") == ("attn_v", T.Q8_0)
    with pytest.raises(UsageError):
        parse_tensor_type("attn_v")


def test_which_tensors_quantize():
    assert n_dims((64,)) == 1 and n_dims((1, 64)) == 1 and n_dims((2, 64)) == 2 and n_dims((4, 1, 64)) == 3
    assert allows_quantization("blk.0.attn_q.weight", (64, 64))
    assert not allows_quantization("blk.0.attn_q.bias", (64, 64))
    assert not allows_quantization("blk.0.attn_norm.weight", (64,))
    assert not allows_quantization("blk.0.attn_norm.weight", (2, 64))  # norms never, whatever the shape
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (8, 64))
    assert not allows_quantization("position_embd.weight", (512, 64))
    assert not allows_quantization("blk.0.attn_q.weight", (1, 64))  # one row: 1-D for ggml
    assert not allows_quantization("output.weight", (512, 64), RecipeOptions(leave_output_tensor=True))


def test_categories_and_order():
    assert category("blk.1.attn_qkv.weight") is Cat.ATTN_QKV
    assert category("blk.1.ffn_down_exps.weight") is Cat.FFN_DOWN
    assert category("token_embd.weight") is Cat.TOKEN_EMBD and category("output.weight") is Cat.OUTPUT
    names = ["blk.10.attn_q.weight", "token_embd.weight", "blk.2.ffn_up.weight", "blk.2.attn_v.weight",
             "output_norm.weight", "output.weight"]
    assert llama_order(names) == ["output.weight", "output_norm.weight", "token_embd.weight",
                                  "blk.2.attn_v.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


def test_stories260K_fallbacks():
    """The measured truth in shared/reference: Q2_K equals Q4_0 there, 35 of 47 tensors fall back for K-quants."""
    tensors = STORIES260K.tensors()
    q2k = plan_types("Q2_K", tensors, STORIES260K.facts)
    assert types_of(q2k) == types_of(plan_types("Q4_0", tensors, STORIES260K.facts))
    assert sum(p.fell_back for p in q2k) == 35
    assert sum(p.fell_back for p in plan_types("Q4_K_M", tensors, STORIES260K.facts)) == 35
    assert sum(p.fell_back for p in plan_types("Q8_0", tensors, STORIES260K.facts)) == 5  # ffn_down: 172 cols
    assert sum(p.fell_back for p in plan_types("Q4_0", tensors, STORIES260K.facts)) == 6  # + tied embd Q6_K→Q8_0
    down = types_of(q2k)["blk.0.ffn_down.weight"]
    assert down is T.F16


def test_q4_k_m_bumps_on_32_layers():
    shape = Shape("32L", n_layer=32, n_head=32, n_head_kv=8, dim=256, ff=512, vocab=64, tied=False)
    got = types_of(plan_types("Q4_K_M", shape.tensors(), shape.facts))
    more = {i for i in range(32) if use_more_bits(i, 32)}
    for i in range(32):
        want = T.Q6_K if i in more else T.Q4_K
        assert got[f"blk.{i}.attn_v.weight"] is want and got[f"blk.{i}.ffn_down.weight"] is want
        assert got[f"blk.{i}.attn_q.weight"] is T.Q4_K
    assert got["output.weight"] is T.Q6_K and got["token_embd.weight"] is T.Q4_K
    assert got["output_norm.weight"] is T.F32


def test_ftype_rules_on_wide_model():
    shape = Shape("32L", n_layer=32, n_head=32, n_head_kv=32, dim=256, ff=512, vocab=64, tied=False)
    t = lambda ft, facts=shape.facts: types_of(plan_types(ft, shape.tensors(), facts))  # noqa: E731
    q3m = t("Q3_K_M")
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert [q3m[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]  # n/16 = 2
    assert q3m["blk.5.attn_output.weight"] is T.Q4_K and q3m["blk.5.ffn_up.weight"] is T.Q3_K
    q2k = t("Q2_K")
    assert q2k["blk.0.attn_v.weight"] is T.Q3_K  # no GQA
    assert q2k["blk.0.ffn_down.weight"] is T.Q3_K and q2k["blk.0.attn_output.weight"] is T.Q3_K
    gqa4 = ModelFacts("llama", 32, 32, 8)
    assert t("Q2_K", gqa4)["blk.0.attn_v.weight"] is T.Q4_K
    q4s = t("Q4_K_S")
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == [T.Q5_K, T.Q4_K]
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [T.Q5_K, T.Q4_K]  # n/8 = 4
    assert t("Q3_K_L")["blk.9.ffn_down.weight"] is T.Q5_K
    q8 = t("Q8_0")
    assert q8["output.weight"] is T.Q8_0 and set(q8.values()) == {T.Q8_0, T.F32}
    f16 = t("F16")
    assert f16["output.weight"] is T.F16 and f16["token_embd.weight"] is T.F16 and f16["blk.0.ffn_norm.weight"] is T.F32
    moe8 = t("Q4_K_M", ModelFacts("llama", 32, 32, 32, n_expert=8))
    assert moe8["blk.3.attn_v.weight"] is T.Q8_0 and moe8["blk.3.attn_k.weight"] is T.Q8_0
    assert moe8["blk.3.attn_output.weight"] is T.Q5_K
    assert t("Q4_0", ModelFacts("llama", 32, 32, 32))["blk.0.ffn_down.weight"] is T.Q4_0
    imat = types_of(plan_types("Q4_0", shape.tensors(), shape.facts, RecipeOptions(has_imatrix=True)))
    assert [imat[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [T.Q4_1, T.Q4_0]


def test_facts_from_gguf_kv():
    kv = {"general.architecture": "llama", "llama.block_count": 6, "llama.attention.head_count": 8,
          "llama.attention.head_count_kv": 4}
    facts = ModelFacts.from_gguf_kv(kv)
    assert facts == ModelFacts("llama", 6, 8, 4) and facts.n_gqa == 2
    del kv["llama.attention.head_count_kv"]
    assert ModelFacts.from_gguf_kv(kv).n_head_kv == 8  # llama.cpp's default: no GQA


def test_70b_attn_v():
    facts = ModelFacts("llama", 80, 64, 8)
    assert facts.is_70b and not ModelFacts("llama", 80, 64, 64).is_70b and ModelFacts("qwen2", 80, 64, 64).is_70b
    tensors = [(f"blk.{i}.attn_v.weight", (8, 256)) for i in range(80)]
    got = types_of(plan_types("Q3_K_S", tensors, facts))
    assert set(got.values()) == {T.Q5_K}


def test_options():
    tensors, facts = STORIES3M.tensors(), STORIES3M.facts
    pure = types_of(plan_types("Q4_K_M", tensors, facts, RecipeOptions(pure=True)))
    assert set(pure.values()) == {T.Q4_K, T.F32}
    opts = RecipeOptions(output_tensor_type=T.Q8_0, token_embedding_type=T.F16,
                         tensor_types=((r"attn_(q|k)", T.Q5_K), ("blk\\.1\\.", T.Q8_0)))
    got = types_of(plan_types("Q4_K_M", tensors, facts, opts))
    assert got["output.weight"] is T.Q8_0 and got["token_embd.weight"] is T.F16
    assert got["blk.1.attn_q.weight"] is T.Q5_K and got["blk.1.attn_v.weight"] is T.Q8_0  # first match wins
    # a manual override skips the mixture, so it does not advance llama.cpp's attn_v counter: with 6 attn_v and
    # use_more_bits picking counts 2 and 5, the bump lands on blk.3 (count 2), not blk.2
    assert [got[f"blk.{i}.attn_v.weight"] for i in (0, 2, 3)] == [T.Q4_K, T.Q4_K, T.Q6_K]
    left = types_of(plan_types("Q4_K_M", tensors, facts, RecipeOptions(leave_output_tensor=True)))
    assert left["output.weight"] is T.F32
    # forced types skip the fallback, so a type the rows cannot hold is an error (llama.cpp would abort)
    with pytest.raises(QtoolError):
        plan_types("Q4_0", STORIES260K.tensors(), STORIES260K.facts, RecipeOptions(token_embedding_type=T.Q6_K))
    with pytest.raises(QtoolError):
        plan_types("Q4_0", tensors, ModelFacts("llama", 6, 8, 4, tied_embeddings=True))


# ---------------------------------------------------------------------------------------------------------------
# the oracle: llama.cpp's llama_model_quantize
# ---------------------------------------------------------------------------------------------------------------


def _write_f32_gguf(path, shape: Shape) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(shape.n_layer)
    w.add_context_length(128)
    w.add_embedding_length(shape.dim)
    w.add_feed_forward_length(shape.ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(FileType.ALL_F32))
    rng = np.random.default_rng(0)
    for name, dims in shape.tensors():
        w.add_tensor(name, rng.standard_normal(dims, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="needs the reference extra (llama-cpp-python)")
    root = tmp_path_factory.mktemp("recipes")
    files = {}
    for shape in SHAPES:
        files[shape.name] = root / f"{shape.name}-f32.gguf"
        _write_f32_gguf(files[shape.name], shape)
    return files


def _llama_quantize(src, dst, ftype_name: str, opts: RecipeOptions) -> tuple[dict[str, T], list[str], int]:
    """Run llama.cpp's quantizer; return its tensor types, tensor order and general.file_type."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    count = 43  # GGML_TYPE_COUNT in this llama.cpp: "not set"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPES[ftype_name])
    params.nthread = 2
    params.pure = opts.pure
    params.quantize_output_tensor = not opts.leave_output_tensor
    params.output_tensor_type = count if opts.output_tensor_type is None else int(opts.output_tensor_type)
    params.token_embedding_type = count if opts.token_embedding_type is None else int(opts.token_embedding_type)
    if opts.tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(opts.tensor_types) + 1))()
        for i, (pattern, t) in enumerate(opts.tensor_types):
            overrides[i].pattern, overrides[i].type = pattern.encode(), int(t)
        overrides[-1].pattern, overrides[-1].type = None, count
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    reader = gguf.GGUFReader(str(dst))
    got = {t.name: T(int(t.tensor_type)) for t in reader.tensors}
    order = [t.name for t in reader.tensors]
    ftype = int(reader.fields["general.file_type"].parts[-1][0])
    return got, order, ftype


def _check(f32_files, tmp_path, shape: Shape, ftype_name: str, opts: RecipeOptions = RecipeOptions()):
    got, order, ftype = _llama_quantize(f32_files[shape.name], tmp_path / "out.gguf", ftype_name, opts)
    tensors = shape.tensors()
    want = types_of(plan_types(ftype_name.lower(), tensors, shape.facts, opts))
    diff = {n: (want[n].name, got[n].name) for n in want if want[n] != got[n]}
    assert not diff, f"{shape.name} {ftype_name}: (ours, llama.cpp) differ: {diff}"
    assert order == llama_order([n for n, _ in tensors])
    assert ftype == file_type(ftype_name)


@pytest.mark.reference
@pytest.mark.parametrize("ftype_name", list(FILE_TYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matches_llama_quantize(f32_files, tmp_path, shape, ftype_name):
    _check(f32_files, tmp_path, shape, ftype_name)


OPTION_CASES = [
    ("Q4_K_M", RecipeOptions(pure=True)),
    ("Q2_K", RecipeOptions(pure=True)),
    ("Q4_K_M", RecipeOptions(leave_output_tensor=True)),
    ("Q4_K_M", RecipeOptions(output_tensor_type=T.Q8_0, token_embedding_type=T.Q5_0)),
    ("Q3_K_M", RecipeOptions(output_tensor_type=T.Q5_K)),  # tied: token_embd follows output, with fallback
    ("Q5_K_S", RecipeOptions(tensor_types=((r"attn_(q|k)", T.Q6_K), (r"\.(\d*[13579])\.ffn_down", T.Q8_0),
                                           ("attn_v", T.Q4_K)))),
    ("Q4_K_M", RecipeOptions(tensor_types=((r"blk\.1\.", T.Q8_0),))),  # shifts the attn_v counter
    ("Q4_0", RecipeOptions(tensor_types=(("ffn_up", T.Q2_K), ("token_embd", T.Q5_1)))),
    ("F16", RecipeOptions(tensor_types=(("attn", T.Q8_0),), output_tensor_type=T.Q8_0)),  # regexes ignored
    ("BF16", RecipeOptions(token_embedding_type=T.F32, leave_output_tensor=True)),
]


@pytest.mark.reference
@pytest.mark.parametrize("shape", [STORIES260K, GQA8, ODD], ids=lambda s: s.name)
@pytest.mark.parametrize("ftype_name,opts", OPTION_CASES)
def test_options_match_llama_quantize(f32_files, tmp_path, shape, ftype_name, opts):
    _check(f32_files, tmp_path, shape, ftype_name, opts)
