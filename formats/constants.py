"""GGUF and ggml format facts, in one table each: value types, tensor types, file types, metadata keys, tensor
names, token types.

Sources: ggml-org/ggml docs/gguf.md and gguf-py's constants.py. Every reader, writer, kernel, recipe and the runner
look these up here rather than repeating numbers or spelling a key.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, auto

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
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37


# What the user types after --type → llama_ftype
FILE_TYPES: dict[str, FileType] = {
    "F32": FileType.ALL_F32, "F16": FileType.MOSTLY_F16, "BF16": FileType.MOSTLY_BF16,
    "Q8_0": FileType.MOSTLY_Q8_0, "Q4_0": FileType.MOSTLY_Q4_0, "Q4_1": FileType.MOSTLY_Q4_1,
    "Q5_0": FileType.MOSTLY_Q5_0, "Q5_1": FileType.MOSTLY_Q5_1,
    "Q2_K": FileType.MOSTLY_Q2_K, "Q3_K_S": FileType.MOSTLY_Q3_K_S, "Q3_K_M": FileType.MOSTLY_Q3_K_M,
    "Q3_K_L": FileType.MOSTLY_Q3_K_L, "Q4_K_S": FileType.MOSTLY_Q4_K_S, "Q4_K_M": FileType.MOSTLY_Q4_K_M,
    "Q5_K_S": FileType.MOSTLY_Q5_K_S, "Q5_K_M": FileType.MOSTLY_Q5_K_M, "Q6_K": FileType.MOSTLY_Q6_K,
    "IQ1_S": FileType.MOSTLY_IQ1_S, "IQ1_M": FileType.MOSTLY_IQ1_M,
    "IQ2_XXS": FileType.MOSTLY_IQ2_XXS, "IQ2_XS": FileType.MOSTLY_IQ2_XS, "IQ2_S": FileType.MOSTLY_IQ2_S,
    "IQ2_M": FileType.MOSTLY_IQ2_M,
    "IQ3_XXS": FileType.MOSTLY_IQ3_XXS, "IQ3_XS": FileType.MOSTLY_IQ3_XS, "IQ3_S": FileType.MOSTLY_IQ3_S,
    "IQ3_M": FileType.MOSTLY_IQ3_M,
    "IQ4_NL": FileType.MOSTLY_IQ4_NL, "IQ4_XS": FileType.MOSTLY_IQ4_XS,
    "TQ1_0": FileType.MOSTLY_TQ1_0, "TQ2_0": FileType.MOSTLY_TQ2_0,
}


# What the user types after --kv-type → the type K and V are cached in (llama.cpp's -ctk / -ctv choices)
KV_CACHE_TYPES: dict[str, GGMLType] = {
    "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1,
    "q5_0": GGMLType.Q5_0, "q5_1": GGMLType.Q5_1, "f32": GGMLType.F32,
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    info = TYPE_INFO[ggml_type]
    if n_elements % info.block_size:
        raise ValueError(f"{n_elements} elements are not a whole number of {ggml_type.name} blocks")
    return n_elements // info.block_size * info.type_size


# ---------------------------------------------------------------------------------------------------------------
# metadata keys (gguf-py's Keys; llama.cpp's LLM_KV_NAMES). "{arch}" is general.architecture: fill it with arch_key.
# ---------------------------------------------------------------------------------------------------------------

class Keys:
    class General:
        ARCHITECTURE = "general.architecture"
        QUANTIZATION_VERSION = "general.quantization_version"
        ALIGNMENT = "general.alignment"
        FILE_TYPE = "general.file_type"
        TYPE = "general.type"
        NAME = "general.name"
        VERSION = "general.version"
        ORGANIZATION = "general.organization"
        FINETUNE = "general.finetune"
        BASENAME = "general.basename"
        SIZE_LABEL = "general.size_label"
        SAMPLING_SEQUENCE = "general.sampling.sequence"
        SAMPLING_TOP_K = "general.sampling.top_k"
        SAMPLING_TOP_P = "general.sampling.top_p"
        SAMPLING_MIN_P = "general.sampling.min_p"
        SAMPLING_XTC_PROBABILITY = "general.sampling.xtc_probability"
        SAMPLING_XTC_THRESHOLD = "general.sampling.xtc_threshold"
        SAMPLING_TEMP = "general.sampling.temp"
        SAMPLING_PENALTY_LAST_N = "general.sampling.penalty_last_n"
        SAMPLING_PENALTY_REPEAT = "general.sampling.penalty_repeat"
        SAMPLING_MIROSTAT = "general.sampling.mirostat"
        SAMPLING_MIROSTAT_TAU = "general.sampling.mirostat_tau"
        SAMPLING_MIROSTAT_ETA = "general.sampling.mirostat_eta"

    class LLM:
        VOCAB_SIZE = "{arch}.vocab_size"
        CONTEXT_LENGTH = "{arch}.context_length"
        EMBEDDING_LENGTH = "{arch}.embedding_length"
        BLOCK_COUNT = "{arch}.block_count"
        FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
        EXPERT_COUNT = "{arch}.expert_count"
        EXPERT_USED_COUNT = "{arch}.expert_used_count"
        EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
        ATTN_LOGIT_SOFTCAPPING = "{arch}.attn_logit_softcapping"
        FINAL_LOGIT_SOFTCAPPING = "{arch}.final_logit_softcapping"

    class Attention:
        HEAD_COUNT = "{arch}.attention.head_count"
        HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
        KEY_LENGTH = "{arch}.attention.key_length"
        VALUE_LENGTH = "{arch}.attention.value_length"
        LAYERNORM_EPS = "{arch}.attention.layer_norm_epsilon"
        LAYERNORM_RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
        SLIDING_WINDOW = "{arch}.attention.sliding_window"
        SLIDING_WINDOW_PATTERN = "{arch}.attention.sliding_window_pattern"

    class Rope:
        DIMENSION_COUNT = "{arch}.rope.dimension_count"
        FREQ_BASE = "{arch}.rope.freq_base"
        FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"  # the sliding-window layers' base (gemma3)
        SCALING_TYPE = "{arch}.rope.scaling.type"
        SCALING_FACTOR = "{arch}.rope.scaling.factor"
        SCALING_ORIG_CTX_LEN = "{arch}.rope.scaling.original_context_length"
        SCALING_ATTN_FACTOR = "{arch}.rope.scaling.attn_factor"  # LongRoPE's magnitude correction (phi3)

    class Tokenizer:
        MODEL = "tokenizer.ggml.model"
        PRE = "tokenizer.ggml.pre"
        LIST = "tokenizer.ggml.tokens"
        TOKEN_TYPE = "tokenizer.ggml.token_type"
        SCORES = "tokenizer.ggml.scores"
        MERGES = "tokenizer.ggml.merges"
        BOS_ID = "tokenizer.ggml.bos_token_id"
        EOS_ID = "tokenizer.ggml.eos_token_id"
        UNK_ID = "tokenizer.ggml.unknown_token_id"
        SEP_ID = "tokenizer.ggml.seperator_token_id"  # sic: llama.cpp's spelling
        PAD_ID = "tokenizer.ggml.padding_token_id"
        MASK_ID = "tokenizer.ggml.mask_token_id"
        EOT_ID = "tokenizer.ggml.eot_token_id"
        EOM_ID = "tokenizer.ggml.eom_token_id"
        ADD_BOS = "tokenizer.ggml.add_bos_token"
        ADD_EOS = "tokenizer.ggml.add_eos_token"
        ADD_SEP = "tokenizer.ggml.add_sep_token"
        ADD_PREFIX = "tokenizer.ggml.add_space_prefix"
        NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
        NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"
        CHAT_TEMPLATE = "tokenizer.chat_template"
        CHAT_TEMPLATE_N = "tokenizer.chat_template.{name}"  # named extra templates
        CHAT_TEMPLATES = "tokenizer.chat_templates"  # their names

    class Quantize:  # written by llama-quantize (tools/quantize/quantize.cpp) when an importance matrix is used
        IMATRIX_FILE = "quantize.imatrix.file"
        IMATRIX_DATASET = "quantize.imatrix.dataset"
        IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
        IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
        # qtool's own, for the methods llama-quantize has no key for (qtool/gptq.py)
        QTOOL_METHOD = "quantize.qtool.method"
        QTOOL_CALIBRATION = "quantize.qtool.calibration_text"
        QTOOL_CHUNKS = "quantize.qtool.chunks_count"
        QTOOL_CHUNK_SIZE = "quantize.qtool.chunk_size"
        QTOOL_GPTQ_DAMP = "quantize.qtool.gptq.damp"

    class IMatrix:  # keys of a GGUF imatrix file (llama-imatrix --output-format gguf)
        CHUNK_COUNT = "imatrix.chunk_count"
        CHUNK_SIZE = "imatrix.chunk_size"
        DATASETS = "imatrix.datasets"
        # its tensors, per weight tensor <name>: summed squared activations, and how many tokens were summed
        SUM2_TENSOR = "{name}.in_sum2"
        COUNTS_TENSOR = "{name}.counts"
        SUM_TENSOR = "{name}.in_sum"  # summed activations (newer llama-imatrix writes it; llama-quantize ignores it)


IMATRIX_GENERAL_TYPE = "imatrix"  # the general.type value of an importance-matrix file (a value, not a key)


def arch_key(template: str, arch: str) -> str:
    """Keys.LLM.BLOCK_COUNT, "llama" → "llama.block_count"."""
    return template.format(arch=arch)


# ---------------------------------------------------------------------------------------------------------------
# tensor names (gguf-py's MODEL_TENSOR and TENSOR_NAMES). "{bid}" is the block (layer) number.
# ---------------------------------------------------------------------------------------------------------------

class ModelTensor(IntEnum):
    TOKEN_EMBD = auto()
    OUTPUT_NORM = auto()
    OUTPUT = auto()
    ROPE_FREQS = auto()
    ATTN_NORM = auto()
    ATTN_Q = auto()
    ATTN_K = auto()
    ATTN_V = auto()
    ATTN_OUT = auto()
    FFN_NORM = auto()
    FFN_GATE = auto()
    FFN_UP = auto()
    FFN_DOWN = auto()
    FFN_GATE_INP = auto()  # mixture-of-experts router
    FFN_GATE_EXP = auto()
    FFN_UP_EXP = auto()
    FFN_DOWN_EXP = auto()
    ATTN_SUB_NORM = auto()  # bitnet: RMSNorm of the attention output, before attn_output
    FFN_SUB_NORM = auto()  # bitnet: RMSNorm of gate * up, before ffn_down
    ATTN_Q_NORM = auto()  # qwen3: RMSNorm of each query head, before RoPE
    ATTN_K_NORM = auto()  # qwen3: RMSNorm of each key head, before RoPE
    ATTN_POST_NORM = auto()  # gemma2: RMSNorm of the attention output, before the residual add
    FFN_POST_NORM = auto()  # gemma2: RMSNorm of the feed-forward output, before the residual add
    ROPE_FACTORS_LONG = auto()  # phi3 LongRoPE: per-frequency divisors beyond the original context
    ROPE_FACTORS_SHORT = auto()  # and within it
    ATTN_QKV = auto()  # phi3: Q, K and V rows in one matrix


TENSOR_NAMES: dict[ModelTensor, str] = {
    ModelTensor.TOKEN_EMBD: "token_embd",
    ModelTensor.OUTPUT_NORM: "output_norm",
    ModelTensor.OUTPUT: "output",
    ModelTensor.ROPE_FREQS: "rope_freqs",
    ModelTensor.ATTN_NORM: "blk.{bid}.attn_norm",
    ModelTensor.ATTN_Q: "blk.{bid}.attn_q",
    ModelTensor.ATTN_K: "blk.{bid}.attn_k",
    ModelTensor.ATTN_V: "blk.{bid}.attn_v",
    ModelTensor.ATTN_QKV: "blk.{bid}.attn_qkv",
    ModelTensor.ATTN_OUT: "blk.{bid}.attn_output",
    ModelTensor.FFN_NORM: "blk.{bid}.ffn_norm",
    ModelTensor.FFN_GATE: "blk.{bid}.ffn_gate",
    ModelTensor.FFN_UP: "blk.{bid}.ffn_up",
    ModelTensor.FFN_DOWN: "blk.{bid}.ffn_down",
    ModelTensor.FFN_GATE_INP: "blk.{bid}.ffn_gate_inp",
    ModelTensor.FFN_GATE_EXP: "blk.{bid}.ffn_gate_exps",
    ModelTensor.FFN_UP_EXP: "blk.{bid}.ffn_up_exps",
    ModelTensor.FFN_DOWN_EXP: "blk.{bid}.ffn_down_exps",
    ModelTensor.ATTN_SUB_NORM: "blk.{bid}.attn_sub_norm",
    ModelTensor.FFN_SUB_NORM: "blk.{bid}.ffn_sub_norm",
    ModelTensor.ATTN_Q_NORM: "blk.{bid}.attn_q_norm",
    ModelTensor.ATTN_K_NORM: "blk.{bid}.attn_k_norm",
    ModelTensor.ATTN_POST_NORM: "blk.{bid}.post_attention_norm",
    ModelTensor.FFN_POST_NORM: "blk.{bid}.post_ffw_norm",
    ModelTensor.ROPE_FACTORS_LONG: "rope_factors_long",
    ModelTensor.ROPE_FACTORS_SHORT: "rope_factors_short",
}


def tensor_name(kind: ModelTensor, bid: int | None = None, suffix: str = "weight") -> str:
    """ModelTensor.ATTN_Q, 3 → "blk.3.attn_q.weight"; suffix "bias" for biases, "" for the bare name."""
    name = TENSOR_NAMES[kind].format(bid=bid) if bid is not None else TENSOR_NAMES[kind]
    if "{bid}" in name:
        raise ValueError(f"{kind.name} is per block: give its block number")
    return f"{name}.{suffix}" if suffix else name


class TokenType(IntEnum):
    """llama.cpp's llama_token_type, stored in tokenizer.ggml.token_type."""
    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6
