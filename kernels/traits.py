"""One row per ggml type: everything the kernels know about it (ggml's type_traits, gguf-py's quants.py table).

Block size and bytes come from formats/constants.py's TYPE_INFO; the row adds the byte offset of each field of
a block, where the codec (quantize/dequantize) lives and its importance-weighted quantize (`weighted`, what an
imatrix selects), the activation type its dot product converts x to (matmul.Act's kinds), the fused decode
kernel (matvec.py) and the prompt path's tile dequantizer. Every other per-type table in kernels/ is derived
from `TRAITS`. Adding a type is one codec module plus one row here; adding an imatrix to a type is its codec's
weighted kernel plus `weighted=` in its row.

Kernels are named, not imported, so that importing the table compiles and loads nothing (`qtool --help`).
Kernel modules read their field offsets from here at import (numba freezes them as constants), which is why
this file is in kernels/__init__.py's _SHARED_SOURCES.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from qtool.formats.constants import TYPE_INFO, GGMLType


@dataclass(frozen=True)
class Traits:
    ggml_type: GGMLType
    fields: dict[str, int]  # field name → byte offset in a block (ggml's block_* struct)
    vec_dot: str | None  # matmul.Act kind of the activations in its dot product; None: not a runner weight type
    codec: str | None  # module here with quantize(x, out) and dequantize(q, out); None: float types (convert.py)
    fused: str | None = None  # "module.function" of its decode kernel (matvec.py, or the codec's module)
    int16_vectors: bool = False  # the fused kernel's vectors sized by its int16 work (see matvec.py)
    lanes: int = 8  # blocks its row is padded to a multiple of: 16 where the vector loop takes 16 (see matvec.py)
    tile: str | None = None  # "module.function" dequantizing stored rows for the prompt path; default the codec's
    kernels: tuple[str, str] = ("quantize", "dequantize")  # the codec's functions for this type
    weighted: str | None = None  # the codec's quantize(x, out, quant_weights) with an importance matrix; None: none
    needs_imatrix: bool = False  # llama.cpp refuses to quantize it without one (ggml_quantize_requires_imatrix)
    # llama.cpp's quantizer takes an importance matrix and drops it (`(void)quant_weights`) and there is no
    # weighted= kernel: with weights, quantize checks their shape, then quantizes plain (the ternary types)
    ignores_imatrix: bool = False

    @property
    def block_size(self) -> int:
        return TYPE_INFO[self.ggml_type].block_size

    @property
    def type_size(self) -> int:
        return TYPE_INFO[self.ggml_type].type_size

    def quantize(self, x: np.ndarray, out: np.ndarray, quant_weights: np.ndarray | None = None) -> None:
        """float32 rows x → packed rows out (C-contiguous uint8). quant_weights: an importance per column (an
        imatrix row, float32 (cols,)), as ggml_quantize_chunk takes it; the types without a weighted quantizer
        raise NotImplementedError (Q8_K, which no file holds; Q8_0 takes and ignores it, as llama.cpp does), except
        the rows with ignores_imatrix, which quantize plain, as llama.cpp's quantizers for them do."""
        if quant_weights is None:
            if self.needs_imatrix:
                raise ValueError(f"{self.ggml_type.name} needs an importance matrix")
            _load(f"{self.codec}.{self.kernels[0]}")(x, out)
            return
        if self.weighted is None and not self.ignores_imatrix:
            raise NotImplementedError(f"{self.ggml_type.name}: importance-weighted quantization is not implemented")
        qw = np.ascontiguousarray(quant_weights, dtype=np.float32)
        if qw.shape != (x.shape[1],):
            raise ValueError(f"quant_weights must have one value per column ({x.shape[1]}), not shape {qw.shape}")
        if self.weighted is None:  # ignores_imatrix
            _load(f"{self.codec}.{self.kernels[0]}")(x, out)
            return
        _load(f"{self.codec}.{self.weighted}")(x, out, qw)

    def dequantize(self, q: np.ndarray, out: np.ndarray) -> None:
        """Stored rows → float32 rows out (the prompt path's tiles, embeddings, `kernels.dequantize`)."""
        if self.tile is not None:
            _load(self.tile)(q, out)
        else:
            _load(f"{self.codec}.{self.kernels[1]}")(q, out)

    def fused_kernel(self):
        return _load(self.fused)


def _load(name: str):
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def _row(t: GGMLType, vec_dot: str | None, codec: str | None, fields: dict[str, int], **kw) -> Traits:
    # argument order chosen for reading the table: what it multiplies with, where its code is, its layout
    return Traits(t, fields, vec_dot, codec, **kw)



def _legacy(t: GGMLType, vec_dot: str, fields: dict[str, int], lanes: int = 8) -> Traits:
    # the four legacy types share one codec module, legacy.py, with a kernel pair each
    name = t.name.lower()
    return Traits(t, fields, vec_dot, "legacy", fused=f"matvec.mv_{name}", int16_vectors=True, lanes=lanes,
                  kernels=(f"quantize_{name}", f"dequantize_{name}"), weighted=f"quantize_{name}_weighted")


T = GGMLType
TRAITS: dict[GGMLType, Traits] = {r.ggml_type: r for r in (
    _row(T.F32, "f32", None, {}, tile="floats.deq_f32"),
    _row(T.F16, "f16", None, {}, fused="matvec.mv_f16", tile="floats.deq_f16"),
    _row(T.BF16, "bf16", None, {}, fused="matvec.mv_bf16", tile="floats.deq_bf16"),
    _row(T.Q8_0, "q8_0", "q8_0", {"d": 0, "qs": 2}, fused="matvec.mv_q8_0", int16_vectors=True, lanes=16,
         weighted="quantize_weighted"),
    _legacy(T.Q4_0, "q8_0", {"d": 0, "qs": 2}, lanes=16),
    _legacy(T.Q4_1, "q8_1", {"d": 0, "m": 2, "qs": 4}, lanes=16),
    _legacy(T.Q5_0, "q8_0", {"d": 0, "qh": 2, "qs": 6}),
    _legacy(T.Q5_1, "q8_1", {"d": 0, "m": 2, "qh": 4, "qs": 8}),
    _row(T.Q2_K, "q8_k", "q2_k", {"scales": 0, "qs": 16, "d": 80, "dmin": 82}, fused="matvec.mv_q2_k",
         lanes=16, weighted="quantize_weighted"),
    _row(T.Q3_K, "q8_k", "q3_k", {"hmask": 0, "qs": 32, "scales": 96, "d": 108}, fused="matvec.mv_q3_k",
         weighted="quantize_weighted"),
    _row(T.Q4_K, "q8_k", "kquant_k4", {"d": 0, "dmin": 2, "scales": 4, "qs": 16}, fused="matvec.mv_q4_k",
         lanes=16, kernels=("quantize_q4_k", "dequantize_q4_k"), weighted="quantize_q4_k_weighted"),
    _row(T.Q5_K, "q8_k", "kquant_k4", {"d": 0, "dmin": 2, "scales": 4, "qh": 16, "qs": 48}, fused="matvec.mv_q5_k",
         kernels=("quantize_q5_k", "dequantize_q5_k"), weighted="quantize_q5_k_weighted"),
    _row(T.Q6_K, "q8_k", "q6_k", {"ql": 0, "qh": 128, "scales": 192, "d": 208}, fused="matvec.mv_q6_k",
         weighted="quantize_weighted"),
    _row(T.IQ3_XXS, "q8_k", "iq3", {"d": 0, "qs": 2, "scales_and_signs": 66}, fused="iq3.mv_iq3_xxs",
         kernels=("quantize_iq3_xxs", "dequantize_iq3_xxs"), weighted="quantize_iq3_xxs_weighted"),
    _row(T.IQ3_S, "q8_k", "iq3", {"d": 0, "qs": 2, "qh": 66, "signs": 74, "scales": 106}, fused="iq3.mv_iq3_s",
         kernels=("quantize_iq3_s", "dequantize_iq3_s"), weighted="quantize_iq3_s_weighted"),
    # ternary (BitNet b1.58): a scale per 256 and trits; llama.cpp's quantizers ignore an imatrix
    _row(T.TQ1_0, "q8_k", "ternary", {"qs": 0, "qh": 48, "d": 52}, fused="ternary.mv_tq1_0",
         lanes=16, kernels=("quantize_tq1_0", "dequantize_tq1_0"), ignores_imatrix=True),
    _row(T.TQ2_0, "q8_k", "ternary", {"qs": 0, "d": 64}, fused="ternary.mv_tq2_0",
         lanes=16, kernels=("quantize_tq2_0", "dequantize_tq2_0"), ignores_imatrix=True),
    _row(T.IQ4_NL, "q8_0", "iq4", {"d": 0, "qs": 2}, fused="iq4.mv_iq4_nl", int16_vectors=True,
         kernels=("quantize_iq4_nl", "dequantize_iq4_nl"), weighted="quantize_iq4_nl_weighted"),
    _row(T.IQ4_XS, "q8_k", "iq4", {"d": 0, "scales_h": 2, "scales_l": 4, "qs": 8}, fused="iq4.mv_iq4_xs",
         kernels=("quantize_iq4_xs", "dequantize_iq4_xs"), weighted="quantize_iq4_xs_weighted"),
    # IQ2_XXS/IQ2_XS: llama.cpp quantizes them with an imatrix only (their plain kernel is never reached)
    _row(T.IQ2_XXS, "q8_k", "iq2", {"d": 0, "qs": 2}, fused="iq2.mv_iq2_xxs",
         kernels=("quantize_refused", "dequantize_iq2_xxs"), weighted="quantize_iq2_xxs_weighted", needs_imatrix=True),
    _row(T.IQ2_XS, "q8_k", "iq2", {"d": 0, "qs": 2, "scales": 66}, fused="iq2.mv_iq2_xs",
         kernels=("quantize_refused", "dequantize_iq2_xs"), weighted="quantize_iq2_xs_weighted", needs_imatrix=True),
    _row(T.IQ2_S, "q8_k", "iq2", {"d": 0, "qs": 2, "qh": 66, "scales": 74}, fused="iq2.mv_iq2_s",
         kernels=("quantize_iq2_s", "dequantize_iq2_s"), weighted="quantize_iq2_s_weighted"),
    # IQ1_S: with an imatrix only; IQ1_M: either (ggml_quantize_requires_imatrix names IQ1_S alone)
    _row(T.IQ1_S, "q8_k", "iq1", {"d": 0, "qs": 2, "qh": 34}, fused="iq1.mv_iq1_s",
         kernels=("quantize_refused", "dequantize_iq1_s"), weighted="quantize_iq1_s_weighted", needs_imatrix=True),
    _row(T.IQ1_M, "q8_k", "iq1", {"qs": 0, "qh": 32, "scales": 48}, fused="iq1.mv_iq1_m",
         kernels=("quantize_iq1_m", "dequantize_iq1_m"), weighted="quantize_iq1_m_weighted"),
    # the activations of K-quant dot products (the runner); recipes never write it
    _row(T.Q8_K, None, "q8_k", {"d": 0, "qs": 4, "bsums": 260}),
)}
del T


def fields(ggml_type: GGMLType, *names: str) -> tuple[int, ...]:
    """Byte offsets of the named fields of a block (for kernel modules' constants)."""
    row = TRAITS[ggml_type]
    return tuple(row.fields[n] for n in names)


def block(ggml_type: GGMLType) -> tuple[int, int]:
    """(elements, bytes) of a block."""
    info = TYPE_INFO[ggml_type]
    return info.block_size, info.type_size


def quantizable_types() -> tuple[GGMLType, ...]:
    return tuple(t for t, r in TRAITS.items() if r.codec is not None)
