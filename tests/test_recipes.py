"""qtool.recipes: per-tensor type choice, unit-tested and checked against llama.cpp's own quantizer.

The oracle tests write a small F32 llama GGUF with gguf-py, run llama_model_quantize (llama.cpp vendored in
llama-cpp-python 0.3.36) and compare every output tensor type with plan_types. Weights are random: values do not
affect type choice.
"""
from __future__ import annotations

import ctypes
import json
import math
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from qtool.errors import QtoolError, UsageError
from qtool.formats.constants import FILE_TYPES, FileType, GGMLType as T
from qtool.recipes import (
    Cat, ModelFacts, RecipeOptions, Refused, allows_quantization, category, check_imatrix, default_type, file_type,
    llama_order, n_dims, parse_tensor_type, plan_types, requires_imatrix, use_more_bits,
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
    n_expert: int = 0  # > 0: a mixture of experts, with 3-D ffn_{gate,up,down}_exps and a router

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts("llama", self.n_layer, self.n_head, self.n_head_kv, self.n_expert)

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
                    (b + "ffn_norm.weight", (self.dim,))]
            if self.n_expert:
                e = self.n_expert
                out += [(b + "ffn_gate_inp.weight", (e, self.dim)),
                        (b + "ffn_gate_exps.weight", (e, r(self.ff), self.dim)),
                        (b + "ffn_up_exps.weight", (e, r(self.ff), self.dim)),
                        (b + "ffn_down_exps.weight", (e, r(self.dim), self.ff))]
            else:
                out += [(b + "ffn_gate.weight", (r(self.ff), self.dim)), (b + "ffn_up.weight", (r(self.ff), self.dim)),
                        (b + "ffn_down.weight", (r(self.dim), self.ff))]
        return out


STORIES260K = Shape("stories260K", n_layer=5, n_head=8, n_head_kv=4, dim=64, ff=172, vocab=512, tied=True)
STORIES3M = Shape("stories3M", n_layer=6, n_head=8, n_head_kv=4, dim=256, ff=768, vocab=512, tied=False,
                  rows=32)  # real row lengths (what type choice reads), fewer rows: 8x faster
GQA8 = Shape("gqa8-12L", n_layer=12, n_head=8, n_head_kv=1, dim=256, ff=640, vocab=320, tied=False, rows=16)
ODD = Shape("odd-9L-tied", n_layer=9, n_head=6, n_head_kv=2, dim=384, ff=1000, vocab=256, tied=True, rows=16)
DEEP = Shape("deep-32L", n_layer=32, n_head=8, n_head_kv=2, dim=256, ff=512, vocab=64, tied=False, rows=8)
# 8 experts have rules of their own (attn_v/attn_k Q8_0, attn_output Q5_K ...); 4 experts only in the IQ1/IQ2
# mixes' attn_v. Expert tensors are 3-D, and their layer is read from the name.
MOE8 = Shape("moe8-8L", n_layer=8, n_head=8, n_head_kv=8, dim=256, ff=320, vocab=64, tied=False, rows=8, n_expert=8)
MOE4 = Shape("moe4-9L", n_layer=9, n_head=4, n_head_kv=4, dim=512, ff=256, vocab=64, tied=True, rows=4, n_expert=4)
SHAPES = [STORIES260K, STORIES3M, GQA8, ODD, DEEP, MOE8, MOE4]
# The same with two rows per matrix, for the IQ types: llama.cpp's grid searches (IQ1_S takes seconds a tensor)
# dominate those tests otherwise, and two rows keep every matrix 2-D.
SHAPES_2ROWS = [replace(s, name=f"{s.name}-2rows", rows=2) for s in SHAPES]
OPTION_SHAPES_2ROWS = [SHAPES_2ROWS[SHAPES.index(s)] for s in (STORIES260K, GQA8, ODD)]


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
    assert file_type("iq2_xxs") == 19 and file_type("IQ3_XS") == 22 and file_type("IQ1_M") == 31
    assert file_type("TQ1_0") == 36 and file_type("TQ2_0") == 37
    assert default_type("IQ2_S") is T.IQ2_XS and default_type("IQ2_M") is T.IQ2_S  # not the names' own types
    assert default_type("IQ3_XS") is T.IQ3_S and default_type("IQ3_M") is T.IQ3_S
    with pytest.raises(UsageError):
        file_type("Q2_K_S")  # llama-quantize has it; qtool does not offer it
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


WIDE = Shape("32L", n_layer=32, n_head=32, n_head_kv=32, dim=256, ff=512, vocab=64, tied=False)  # no GQA


def _iq(ftype_name: str, facts: ModelFacts = WIDE.facts, shape: Shape = WIDE, **opts) -> dict[str, T]:
    return types_of(plan_types(ftype_name, shape.tensors(), facts, RecipeOptions(**opts)))


def test_low_iq_mixes():
    """IQ1_S … IQ2_M: own rules for attn_v, ffn_down (first eighth), attn_output, output and token_embd."""
    gqa4 = ModelFacts("llama", 32, 32, 8)
    moe8, moe4 = ModelFacts("llama", 32, 32, 32, n_expert=8), ModelFacts("llama", 32, 32, 32, n_expert=4)
    for ft, bump, attn_out, embd in [("IQ2_XXS", T.Q2_K, T.IQ2_XXS, T.Q2_K), ("IQ2_XS", T.Q2_K, T.IQ2_XS, T.Q2_K),
                                     ("IQ1_S", T.Q2_K, T.IQ2_XXS, T.Q2_K), ("IQ1_M", T.Q2_K, T.IQ2_XXS, T.Q2_K),
                                     ("IQ2_S", T.IQ3_S, T.IQ3_S, T.IQ3_S), ("IQ2_M", T.IQ3_S, T.IQ3_S, T.IQ3_S)]:
        base = default_type(ft)
        got = _iq(ft)
        assert got["output.weight"] is T.Q5_K and got["token_embd.weight"] is embd, ft
        assert {got[f"blk.{i}.attn_v.weight"] for i in range(32)} == {bump}, ft
        assert [got[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [bump, base], ft  # 32 // 8 = 4
        assert got["blk.7.attn_output.weight"] is attn_out and got["blk.7.attn_q.weight"] is base, ft
        assert got["blk.7.ffn_gate.weight"] is base and got["blk.7.attn_k.weight"] is base, ft
        assert _iq(ft, gqa4)["blk.9.attn_v.weight"] is T.Q4_K and _iq(ft, moe4)["blk.9.attn_v.weight"] is T.Q4_K
        m8 = _iq(ft, moe8)  # the general rules' 8-expert Q8_0 for attn_v and attn_k do not apply here
        assert m8["blk.9.attn_v.weight"] is T.Q4_K and m8["blk.9.attn_k.weight"] is T.Q4_K, ft
        assert m8["blk.9.attn_output.weight"] is T.Q5_K, ft
        # 70B: no Q5_K bump for attn_v in these mixes
        assert _iq(ft, ModelFacts("llama", 80, 64, 8), Shape("80L", 80, 64, 8, 256, 256, 64, False))[
            "blk.0.attn_v.weight"] is T.Q4_K
    assert _iq("IQ2_M", WIDE.facts, replace(WIDE, tied=True))["token_embd.weight"] is T.Q5_K  # as output


def test_iq3_mixes():
    no, im = _iq("IQ3_XXS"), _iq("IQ3_XXS", has_imatrix=True)
    assert no["blk.0.attn_v.weight"] is T.IQ3_S and im["blk.0.attn_v.weight"] is T.IQ3_XXS
    assert _iq("IQ3_XXS", ModelFacts("llama", 32, 32, 8))["blk.0.attn_v.weight"] is T.Q4_K
    assert [no[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [T.Q4_K, T.Q3_K]
    assert [im[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [T.IQ3_XXS, T.IQ3_XXS]
    for got in (no, im):
        assert got["blk.5.attn_q.weight"] is T.IQ2_S and got["blk.5.attn_k.weight"] is T.IQ2_S
        assert got["blk.5.attn_output.weight"] is T.IQ3_S and got["blk.5.ffn_up.weight"] is T.IQ3_XXS
        assert got["output.weight"] is T.Q5_K and got["token_embd.weight"] is T.IQ3_S
    xs = _iq("IQ3_XS")
    assert xs["blk.0.attn_v.weight"] is T.IQ3_S and _iq("IQ3_XS", ModelFacts("llama", 32, 32, 8))[
        "blk.0.attn_v.weight"] is T.Q4_K
    assert xs["blk.0.attn_q.weight"] is T.IQ3_XXS and xs["blk.0.attn_k.weight"] is T.IQ3_XXS
    middle = {i for i in range(32) if xs[f"blk.{i}.ffn_gate.weight"] is T.IQ3_XXS}
    assert middle == set(range(4, 28)) == {i for i in range(32) if xs[f"blk.{i}.ffn_up.weight"] is T.IQ3_XXS}
    assert xs["blk.0.ffn_gate.weight"] is T.IQ3_S and xs["output.weight"] is T.Q6_K
    assert xs["token_embd.weight"] is T.IQ3_S and xs["blk.3.ffn_down.weight"] is T.IQ3_S
    m = _iq("IQ3_M")
    assert m["blk.0.attn_v.weight"] is T.Q4_K and m["blk.0.attn_output.weight"] is T.Q4_K
    assert [m[f"blk.{i}.ffn_down.weight"] for i in (3, 4, 6)] == [T.Q4_K, T.IQ3_S, T.IQ3_S]
    m8 = _iq("IQ3_M", ModelFacts("llama", 32, 32, 32, n_expert=8))
    assert [m8[f"blk.{i}.ffn_down.weight"] for i in (3, 4, 6)] == [T.Q4_K, T.IQ3_S, T.Q4_K]  # use_more_bits
    assert m8["blk.5.attn_v.weight"] is T.Q8_0 and m8["blk.5.attn_output.weight"] is T.Q5_K
    assert _iq("IQ3_S", ModelFacts("llama", 80, 64, 8), Shape("80L", 80, 64, 8, 256, 256, 64, False))[
        "blk.0.attn_v.weight"] is T.Q5_K  # Q4_K for GQA, then the 70B bump
    s = _iq("IQ3_S")
    assert set(s[n] for n in s if n.startswith("blk.") and "norm" not in n) == {T.IQ3_S}


def test_iq4_and_ternary_mixes():
    for ft, base in (("IQ4_NL", T.IQ4_NL), ("IQ4_XS", T.IQ4_XS)):
        no, im = _iq(ft), _iq(ft, has_imatrix=True)
        assert [no[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [T.Q5_K, base]
        assert [im[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [base, base]
        assert no["blk.0.attn_v.weight"] is base and no["output.weight"] is T.Q6_K and no["token_embd.weight"] is base
        assert _iq(ft, ModelFacts("llama", 32, 32, 8))["blk.0.attn_v.weight"] is T.Q5_K
        assert _iq(ft, ModelFacts("llama", 32, 32, 32, n_expert=8))["blk.0.attn_output.weight"] is T.Q5_K
    for ft, base in (("TQ1_0", T.TQ1_0), ("TQ2_0", T.TQ2_0)):
        got = _iq(ft)
        assert got["token_embd.weight"] is T.Q4_K and got["output.weight"] is T.Q6_K
        assert {got[n] for n in got if n.startswith("blk.") and "norm" not in n} == {base}
        assert _iq(ft, ModelFacts("llama", 32, 32, 32, n_expert=8))["blk.0.attn_v.weight"] is T.Q8_0


def test_iq_fallbacks():
    odd = Shape("odd", n_layer=2, n_head=2, n_head_kv=2, dim=96, ff=100, vocab=64, tied=False)
    for ft in ("IQ1_S", "IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"):
        got = types_of(plan_types(ft, odd.tensors(), odd.facts, RecipeOptions(has_imatrix=True)))
        assert got["blk.0.attn_q.weight"] is T.IQ4_NL, ft  # 96 = 3 blocks of 32
        assert got["blk.0.ffn_down.weight"] is T.F16, ft  # 100: not even IQ4_NL's 32
        assert got["output.weight"] is T.Q8_0, ft  # rows that do not fit the default type: Q8_0, not Q6_K
    got = types_of(plan_types("IQ4_NL", odd.tensors(), odd.facts))
    assert got["blk.0.ffn_down.weight"] is T.F16 and got["output.weight"] is T.Q8_0  # Q6_K did not fit
    got = types_of(plan_types("TQ2_0", odd.tensors(), odd.facts))
    assert got["blk.0.attn_q.weight"] is T.Q4_0 and got["token_embd.weight"] is T.Q5_0  # Q4_K → Q5_0


def test_imatrix_requirement():
    assert requires_imatrix("blk.0.attn_q.weight", T.IQ3_XXS) and requires_imatrix("blk.0.ffn_up.weight", T.IQ1_M)
    assert not requires_imatrix("blk.0.attn_q.weight", T.IQ3_S) and not requires_imatrix("x.weight", T.Q2_K)
    assert not requires_imatrix("output.weight", T.IQ2_XXS) and not requires_imatrix("token_embd.weight", T.IQ2_S)
    tensors = WIDE.tensors()
    for ft in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS"):
        with pytest.raises(Refused, match="needs an importance matrix"):
            check_imatrix(ft, plan_types(ft, tensors, WIDE.facts), RecipeOptions())
        check_imatrix(ft, plan_types(ft, tensors, WIDE.facts), RecipeOptions(has_imatrix=True))
    for ft in ("IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "Q2_K"):
        check_imatrix(ft, plan_types(ft, tensors, WIDE.facts), RecipeOptions())
    # the rule is on planned types: rows of 64 fall back to IQ4_NL, which needs none
    check_imatrix("IQ2_XXS", plan_types("IQ2_XXS", STORIES260K.tensors(), STORIES260K.facts), RecipeOptions())
    # a forced type counts; the first offender in llama.cpp's order is named
    opts = RecipeOptions(tensor_types=(("ffn_down", T.IQ2_S),))
    with pytest.raises(Refused, match=r"^Q4_0: blk\.0\.ffn_down\.weight would be IQ2_S"):
        check_imatrix("q4_0", plan_types("Q4_0", tensors, WIDE.facts, opts), opts)
    # exempt by name in llama.cpp, but ggml itself cannot quantize these without weights (llama.cpp aborts)
    opts = RecipeOptions(token_embedding_type=T.IQ2_XXS)
    with pytest.raises(Refused):
        check_imatrix("Q4_0", plan_types("Q4_0", tensors, WIDE.facts, opts), opts)
    opts = RecipeOptions(output_tensor_type=T.IQ2_S)  # ggml quantizes IQ2_S without weights: allowed, as there
    check_imatrix("Q4_0", plan_types("Q4_0", tensors, WIDE.facts, opts), opts)


def test_imatrix_without_an_entry_is_refused():
    """With --imatrix, a tensor that needs weights but has no entry stops the conversion, as in llama.cpp."""
    from types import SimpleNamespace
    from qtool.importance import _refuse_unweighted
    with pytest.raises(QtoolError, match="no importance for blk.0.attn_q.weight, which IQ3_XXS needs"):
        _refuse_unweighted(SimpleNamespace(name="blk.0.attn_q.weight", ggml_type=T.IQ3_XXS), "im.gguf")
    with pytest.raises(QtoolError):  # exempt by name, but ggml asserts: llama.cpp would abort
        _refuse_unweighted(SimpleNamespace(name="token_embd.weight", ggml_type=T.IQ2_XS), "im.gguf")
    _refuse_unweighted(SimpleNamespace(name="blk.0.attn_q.weight", ggml_type=T.IQ4_XS), "im.gguf")
    _refuse_unweighted(SimpleNamespace(name="output.weight", ggml_type=T.IQ2_S), "im.gguf")


def test_convert_refuses_types_without_codec(tmp_path):
    """convert refuses a --type whose planned types lack a codec (kernels.traits rows with codec None), then one
    that needs an importance matrix, before writing anything."""
    from qtool import convert
    from qtool.kernels.traits import TRAITS
    src = tmp_path / "f32.gguf"
    _write_f32_gguf(src, STORIES3M)
    for ft in IQ_FILE_TYPES:
        plans = plan_types(ft, STORIES3M.tensors(), STORIES3M.facts)
        lacking = next((p.ggml_type for p in plans if p.quantizable and
                        (p.ggml_type not in TRAITS or TRAITS[p.ggml_type].codec is None)), None)
        if lacking is not None:
            with pytest.raises(Refused, match=f"^{ft}: no quantizer for {lacking.name} yet$"):
                convert.plan(str(src), ft)
            continue
        try:
            check_imatrix(ft, plans, RecipeOptions())
        except Refused:
            with pytest.raises(Refused, match="needs an importance matrix"):
                convert.plan(str(src), ft)
            continue
        convert.plan(str(src), ft).close()


def test_cli_refusal_is_one_line(tmp_path):
    from conftest import qtool
    from qtool.kernels.traits import TRAITS
    lacking = {t for t in T if t not in TRAITS or TRAITS[t].codec is None}
    # a type to refuse: the first IQ file type with a planned type whose codec has not landed (codecs are arriving)
    found = next(((ft, p.ggml_type) for ft in IQ_FILE_TYPES
                  for p in plan_types(ft, STORIES3M.tensors(), STORIES3M.facts)
                  if p.quantizable and p.ggml_type in lacking), None)
    if found is None:
        pytest.skip("every IQ and ternary type has a codec: nothing to refuse")
    ft, t = found
    src = tmp_path / "f32.gguf"
    _write_f32_gguf(src, STORIES3M)
    proc = qtool("convert", src, "-o", tmp_path / "x.gguf", "--type", ft.lower())
    assert proc.returncode == 1 and not (tmp_path / "x.gguf").exists()
    assert proc.stderr.strip().splitlines() == [f"qtool: error: {ft}: no quantizer for {t.name} yet"]


def test_cli_refuses_without_imatrix(tmp_path):
    from conftest import qtool
    src = tmp_path / "f32.gguf"
    _write_f32_gguf(src, STORIES3M)
    # a forced IQ3_XXS needs an imatrix too
    proc = qtool("convert", src, "-o", tmp_path / "x.gguf", "--type", "Q8_0", "--tensor-type", "attn_q=iq3_xxs")
    assert proc.returncode == 1 and not (tmp_path / "x.gguf").exists()
    line, = proc.stderr.strip().splitlines()
    assert line == ("qtool: error: Q8_0: blk.0.attn_q.weight would be IQ3_XXS, which needs an importance matrix "
                    "(--imatrix or --calibrate)")


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
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(2)
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
    for shape in SHAPES + SHAPES_2ROWS:
        files[shape.name] = root / f"{shape.name}-f32.gguf"
        _write_f32_gguf(files[shape.name], shape)
    return files


GGML_TYPE_COUNT = 43  # in this llama.cpp: what llama_model_quantize_params takes for "not set"


def _quantize_call(args: dict) -> int:
    """llama_model_quantize with the options in `args` (plain JSON values, so that a subprocess can run it);
    returns its status, 0 on success. args["imatrix"]: {tensor name: row length} gets an all-ones importance
    vector per tensor, passed as llama.h's llama_model_imatrix_data array (what llama-quantize --imatrix builds)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = args["ftype"]
    params.nthread = 2
    params.pure = args["pure"]
    params.quantize_output_tensor = not args["leave_output_tensor"]
    params.output_tensor_type = args["output_tensor_type"]
    params.token_embedding_type = args["token_embedding_type"]
    keep = []  # ctypes buffers the params point into
    if args["tensor_types"]:
        overrides = (llama_cpp.llama_model_tensor_override * (len(args["tensor_types"]) + 1))()
        for i, (pattern, t) in enumerate(args["tensor_types"]):
            overrides[i].pattern, overrides[i].type = pattern.encode(), t
        overrides[-1].pattern, overrides[-1].type = None, GGML_TYPE_COUNT
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
        keep.append(overrides)
    if args["imatrix"] is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(args["imatrix"]) + 1))()  # zeroed: the terminator
        for i, (name, n) in enumerate(args["imatrix"].items()):
            values = (ctypes.c_float * n)(*([1.0] * n))
            keep.append(values)
            entries[i].name, entries[i].size = name.encode(), n
            entries[i].data = ctypes.cast(values, type(entries[i].data))
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    return llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(params))


def _quantize_args(src, dst, ftype_name: str, opts: RecipeOptions, tensors) -> dict:
    unset = lambda t: GGML_TYPE_COUNT if t is None else int(t)  # noqa: E731
    return {"src": str(src), "dst": str(dst), "ftype": int(FILE_TYPES[ftype_name]), "pure": opts.pure,
            "leave_output_tensor": opts.leave_output_tensor,
            "output_tensor_type": unset(opts.output_tensor_type),
            "token_embedding_type": unset(opts.token_embedding_type),
            "tensor_types": [(p, int(t)) for p, t in opts.tensor_types],
            # one importance vector per expert matrix, concatenated, as llama-imatrix stores them
            "imatrix": ({n: shape[-1] * math.prod(shape[:-2]) for n, shape in tensors if len(shape) >= 2}
                        if opts.has_imatrix else None)}


def _read_quantized(dst) -> tuple[dict[str, T], list[str], int]:
    """llama.cpp's output: its tensor types, tensor order and general.file_type."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(dst))
    got = {t.name: T(int(t.tensor_type)) for t in reader.tensors}
    order = [t.name for t in reader.tensors]
    ftype = int(reader.fields["general.file_type"].parts[-1][0])
    return got, order, ftype


def _llama_quantize(src, dst, ftype_name: str, opts: RecipeOptions, tensors=()) -> tuple[dict[str, T], list[str], int]:
    """Run llama.cpp's quantizer in this process (for the float, legacy and K-quant types, which cannot abort)."""
    pytest.importorskip("llama_cpp")
    assert _quantize_call(_quantize_args(src, dst, ftype_name, opts, tensors)) == 0
    return _read_quantized(dst)


def _quantize_batch(jobs_file: str) -> None:
    """Child-process side of `llama_isolated`: run each job, its log (llama.cpp writes to fd 2) and status to its
    own files, so that the jobs done before an abort keep their results."""
    import os
    for job in json.loads(Path(jobs_file).read_text()):
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.close(fd)
        rc = _quantize_call(job["args"])
        Path(job["rc"]).write_text(str(rc))


def _check(f32_files, tmp_path, shape: Shape, ftype_name: str, opts: RecipeOptions = RecipeOptions()):
    got, order, ftype = _llama_quantize(f32_files[shape.name], tmp_path / "out.gguf", ftype_name, opts)
    _compare(shape, ftype_name, opts, got, order, ftype)


def _compare(shape: Shape, ftype_name: str, opts: RecipeOptions, got, order, ftype) -> None:
    tensors = shape.tensors()
    want = types_of(plan_types(ftype_name.lower(), tensors, shape.facts, opts))
    diff = {n: (want[n].name, got[n].name) for n in want if want[n] != got[n]}
    assert not diff, f"{shape.name} {ftype_name}: (ours, llama.cpp) differ: {diff}"
    assert order == llama_order([n for n, _ in tensors])
    assert ftype == file_type(ftype_name)


# the file types whose quantizers llama.cpp may abort in: run in a child process
IQ_FILE_TYPES = [n for n in FILE_TYPES if n.startswith(("IQ", "TQ"))]
CLASSIC_FILE_TYPES = [n for n in FILE_TYPES if n not in IQ_FILE_TYPES]


# IQ and ternary cases beyond plain ftypes: (ftype, options), on OPTION_SHAPES_2ROWS
IQ_OPTION_CASES = [
    ("IQ2_XXS", RecipeOptions(has_imatrix=True, pure=True)),
    ("IQ3_XS", RecipeOptions(has_imatrix=True, tensor_types=((r"blk\.1\.", T.Q8_0),))),  # shifts the ffn_gate/up
    ("IQ2_M", RecipeOptions(has_imatrix=True, leave_output_tensor=True)),                  # counts
    ("IQ1_S", RecipeOptions(has_imatrix=True, output_tensor_type=T.Q4_K)),  # tied: token_embd follows output
    ("IQ4_XS", RecipeOptions(output_tensor_type=T.Q8_0, token_embedding_type=T.IQ4_NL)),
    ("IQ3_S", RecipeOptions(tensor_types=(("attn_q", T.IQ2_XXS),))),  # a forced type needs an imatrix too
    ("TQ1_0", RecipeOptions(token_embedding_type=T.Q8_0)),
]


def _iq_jobs(ftype_name: str) -> list[tuple[Shape, RecipeOptions]]:
    plain = [(shape, RecipeOptions(has_imatrix=im)) for shape in SHAPES_2ROWS for im in (False, True)]
    return plain + [(shape, opts) for ft, opts in IQ_OPTION_CASES if ft == ftype_name
                    for shape in OPTION_SHAPES_2ROWS]


@pytest.fixture(scope="module")
def llama_isolated(f32_files, tmp_path_factory):
    """llama.cpp's quantizer for the IQ and ternary types, in one child process per file type: their ggml
    quantizers may GGML_ABORT (an IQ2_XXS / IQ2_XS / IQ1_S row without weights, a point off the grid), which
    would take pytest down, and one process per type pays each grid's initialization (IQ1_S: ~16 s) once.
    get(shape, ftype, opts) → (status or None if the child died first, llama.cpp's log, output path)."""
    root = tmp_path_factory.mktemp("iq")
    done: dict[str, dict] = {}

    def get(shape: Shape, ftype_name: str, opts: RecipeOptions):
        if ftype_name not in done:
            jobs, results = [], {}
            for i, (sh, o) in enumerate(_iq_jobs(ftype_name)):
                base = root / f"{ftype_name}-{i}"
                args = _quantize_args(f32_files[sh.name], f"{base}.gguf", ftype_name, o, sh.tensors())
                jobs.append({"args": args, "log": f"{base}.log", "rc": f"{base}.rc"})
                results[sh.name, o] = base
            (root / f"{ftype_name}.json").write_text(json.dumps(jobs))
            code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_recipes; "
                    "test_recipes._quantize_batch(sys.argv[2])")
            proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent),
                                   str(root / f"{ftype_name}.json")], capture_output=True, text=True, timeout=1200)
            done[ftype_name] = {"results": results, "child": proc}
        base = done[ftype_name]["results"][shape.name, opts]
        rc_file, log_file = Path(f"{base}.rc"), Path(f"{base}.log")
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        if not rc_file.exists():
            child = done[ftype_name]["child"]
            log += f"\n[child exited with {child.returncode}] {child.stdout[-1000:]}{child.stderr[-1000:]}"
            return None, log, None
        return int(rc_file.read_text()), log, Path(f"{base}.gguf")
    return get


def _check_isolated(llama_isolated, shape: Shape, ftype_name: str, opts: RecipeOptions) -> None:
    """llama.cpp and qtool agree on the types, or both refuse for want of an importance matrix."""
    rc, log, dst = llama_isolated(shape, ftype_name, opts)
    assert rc is not None, f"llama.cpp died: {log[-3000:]}"
    plans = plan_types(ftype_name, shape.tensors(), shape.facts, opts)
    try:
        check_imatrix(ftype_name, plans, opts)
        refused = None
    except Refused as e:
        refused = str(e)
    if rc != 0:
        assert "this quantization requires an imatrix" in log, log[-3000:]
        assert refused is not None, f"{shape.name} {ftype_name}: llama.cpp refused, qtool would not"
        offender = log.split("offending tensor:")[1].split()[0]
        assert f" {offender} " in refused  # the same first tensor, in llama.cpp's order
        return
    assert refused is None, f"{shape.name} {ftype_name}: llama.cpp quantized, qtool refuses: {refused}"
    _compare(shape, ftype_name, opts, *_read_quantized(dst))


@pytest.mark.reference
@pytest.mark.parametrize("ftype_name", CLASSIC_FILE_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matches_llama_quantize(f32_files, tmp_path, shape, ftype_name):
    _check(f32_files, tmp_path, shape, ftype_name)


@pytest.mark.reference
@pytest.mark.parametrize("imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("ftype_name", IQ_FILE_TYPES)
@pytest.mark.parametrize("shape", SHAPES_2ROWS, ids=lambda s: s.name)
def test_iq_matches_llama_quantize(llama_isolated, shape, ftype_name, imatrix):
    _check_isolated(llama_isolated, shape, ftype_name, RecipeOptions(has_imatrix=imatrix))


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


@pytest.mark.reference
@pytest.mark.parametrize("shape", OPTION_SHAPES_2ROWS, ids=lambda s: s.name)
@pytest.mark.parametrize("ftype_name,opts", IQ_OPTION_CASES)
def test_iq_options_match_llama_quantize(llama_isolated, shape, ftype_name, opts):
    _check_isolated(llama_isolated, shape, ftype_name, opts)
