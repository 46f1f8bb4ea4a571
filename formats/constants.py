"""GGUF and ggml format facts, in one table each.

Sources: ggml-org/ggml docs/gguf.md and gguf-py's constants.py. Every reader, writer, kernel and recipe looks
these up here rather than repeating numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

GGUF_MAGIC = 0x46554747  # b"GGUF" read as little-endian uint32
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
QK_K = 256  # elements in a K-quant super-block
GGML_QUANTIZATION_VERSION = 2  # general.quantization_version written with any quantized tensor


class ValueType(IntEnum):
    """GGUF metadata value types."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype string and byte size of each fixed-size value type
VALUE_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}


class GGMLType(IntEnum):
    """ggml tensor types (ids as stored in GGUF tensor infos)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9  # dot-product intermediate, never stored in files
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class TypeInfo:
    block_size: int  # elements per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


# (elements per block, bytes per block) for every type a GGUF file may hold; layouts in kernels/
TYPE_INFO: dict[GGMLType, TypeInfo] = {
    GGMLType.F32: TypeInfo(1, 4),
    GGMLType.F16: TypeInfo(1, 2),
    GGMLType.BF16: TypeInfo(1, 2),
    GGMLType.F64: TypeInfo(1, 8),
    GGMLType.I8: TypeInfo(1, 1),
    GGMLType.I16: TypeInfo(1, 2),
    GGMLType.I32: TypeInfo(1, 4),
    GGMLType.I64: TypeInfo(1, 8),
    GGMLType.Q4_0: TypeInfo(32, 2 + 16),
    GGMLType.Q4_1: TypeInfo(32, 2 + 2 + 16),
    GGMLType.Q5_0: TypeInfo(32, 2 + 4 + 16),
    GGMLType.Q5_1: TypeInfo(32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: TypeInfo(32, 2 + 32),
    GGMLType.Q2_K: TypeInfo(QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: TypeInfo(QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: TypeInfo(QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: TypeInfo(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: TypeInfo(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q8_K: TypeInfo(QK_K, 4 + QK_K + QK_K // 16 * 2),
    GGMLType.IQ2_XXS: TypeInfo(QK_K, 2 + QK_K // 4),
    GGMLType.IQ2_XS: TypeInfo(QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: TypeInfo(QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: TypeInfo(QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: TypeInfo(32, 2 + 16),
    GGMLType.IQ3_S: TypeInfo(QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: TypeInfo(QK_K, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: TypeInfo(QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.IQ1_M: TypeInfo(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.TQ1_0: TypeInfo(QK_K, 2 + 4 * 13),
    GGMLType.TQ2_0: TypeInfo(QK_K, 2 + 64),
    GGMLType.MXFP4: TypeInfo(32, 1 + 16),
}

# Types qtool can write (quantize to). The kernels issue grows this set as each kernel lands.
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


class FileType(IntEnum):
    """llama.cpp's llama_ftype, stored as general.file_type."""
    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_BF16 = 32


# What the user types after --type → llama_ftype
FILE_TYPES: dict[str, FileType] = {
    "F32": FileType.ALL_F32, "F16": FileType.MOSTLY_F16, "BF16": FileType.MOSTLY_BF16,
    "Q8_0": FileType.MOSTLY_Q8_0, "Q4_0": FileType.MOSTLY_Q4_0, "Q4_1": FileType.MOSTLY_Q4_1,
    "Q5_0": FileType.MOSTLY_Q5_0, "Q5_1": FileType.MOSTLY_Q5_1,
    "Q2_K": FileType.MOSTLY_Q2_K, "Q3_K_S": FileType.MOSTLY_Q3_K_S, "Q3_K_M": FileType.MOSTLY_Q3_K_M,
    "Q3_K_L": FileType.MOSTLY_Q3_K_L, "Q4_K_S": FileType.MOSTLY_Q4_K_S, "Q4_K_M": FileType.MOSTLY_Q4_K_M,
    "Q5_K_S": FileType.MOSTLY_Q5_K_S, "Q5_K_M": FileType.MOSTLY_Q5_K_M, "Q6_K": FileType.MOSTLY_Q6_K,
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    info = TYPE_INFO[ggml_type]
    if n_elements % info.block_size:
        raise ValueError(f"{n_elements} elements are not a whole number of {ggml_type.name} blocks")
    return n_elements // info.block_size * info.type_size
