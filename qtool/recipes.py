"""Which ggml type each tensor gets for a `--type`: llama-quantize's mixture rules, as data and small predicates.

The reference is llama.cpp's `src/llama-quant.cpp` as vendored in llama-cpp-python 0.3.36 (the oracle the tests
run). For a whole file the decision has four steps, applied to each tensor in llama.cpp's tensor order:

1. may it be quantized at all?  (`allows_quantization`: 1-D tensors, norms, routers ... keep the source F32)
2. forced by an option?         (`--token-embedding-type`, `--output-tensor-type`, `--tensor-type REGEX=TYPE`)
3. the ftype's mixture          (`_mixture`: output/embedding, attn_v, ffn_down, attn_output bumps), unless --pure
4. does the row fit the block?  (`_fallback`: Q4_K→Q5_0, Q6_K→Q8_0, IQ2_XXS→IQ4_NL ..., then F16 "unusual shape")

Steps 2-4 only run when the ftype's default type is a quantized one: for F32/F16/BF16 every quantizable tensor
simply becomes that type (token_embd and output included) and `--tensor-type` is ignored, as in llama.cpp.

After planning, `check_imatrix` refuses what llama.cpp refuses: without an importance matrix, any layer tensor
planned as one of the lowest-bit IQ types (NEEDS_IMATRIX). The rule is per tensor, on the planned type, so an
IQ2_XXS file of a model whose rows all fall back to IQ4_NL needs none.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from qtool.errors import QtoolError, UsageError
from qtool.formats.constants import FILE_TYPES, FLOAT_TYPES, TYPE_INFO, FileType, GGMLType, Keys, arch_key
from qtool.kernels.traits import TRAITS

F = FileType  # short names keep the rule tables readable
T = GGMLType

# ---------------------------------------------------------------------------------------------------------------
# ftypes and options
# ---------------------------------------------------------------------------------------------------------------

# llama_ftype_get_default_type: the type every quantizable tensor starts from
DEFAULT_TYPE: dict[FileType, GGMLType] = {
    F.ALL_F32: T.F32, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16,
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_Q2_K: T.Q2_K,
    F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K, F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
    F.MOSTLY_IQ1_S: T.IQ1_S, F.MOSTLY_IQ1_M: T.IQ1_M,
    F.MOSTLY_IQ2_XXS: T.IQ2_XXS, F.MOSTLY_IQ2_XS: T.IQ2_XS,
    F.MOSTLY_IQ2_S: T.IQ2_XS, F.MOSTLY_IQ2_M: T.IQ2_S,  # IQ2_S the file type starts from IQ2_XS, IQ2_M from IQ2_S
    F.MOSTLY_IQ3_XXS: T.IQ3_XXS, F.MOSTLY_IQ3_XS: T.IQ3_S, F.MOSTLY_IQ3_S: T.IQ3_S, F.MOSTLY_IQ3_M: T.IQ3_S,
    F.MOSTLY_IQ4_NL: T.IQ4_NL, F.MOSTLY_IQ4_XS: T.IQ4_XS,
    F.MOSTLY_TQ1_0: T.TQ1_0, F.MOSTLY_TQ2_0: T.TQ2_0,
}


def file_type(ftype_name: str) -> FileType:
    """`--type` name (any case) → llama_ftype, the value written as general.file_type."""
    key = ftype_name.upper()
    if key not in FILE_TYPES:
        raise UsageError(f"unknown type {ftype_name!r}; choose one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def default_type(ftype_name: str) -> GGMLType:
    return DEFAULT_TYPE[file_type(ftype_name)]


def parse_ggml_type(name: str) -> GGMLType:
    """A ggml type name as llama-quantize accepts it (case-insensitive: q6_k, Q8_0, f16 ...)."""
    try:
        return GGMLType[name.upper()]
    except KeyError:
        raise UsageError(f"unknown ggml type {name!r}") from None


def parse_tensor_type(spec: str) -> tuple[str, GGMLType]:
    """`--tensor-type REGEX=TYPE` as llama-quantize parses it: the regex is lower-cased, the type case-insensitive."""
    pattern, sep, type_name = spec.partition("=")
    if not sep or not pattern or not type_name:
        raise UsageError(f"--tensor-type wants REGEX=TYPE, got {spec!r}")
    return pattern.lower(), parse_ggml_type(type_name)


@dataclass(frozen=True)
class RecipeOptions:
    pure: bool = False  # --pure: no mixture, every quantizable tensor gets the default type (fallback still applies)
    output_tensor_type: GGMLType | None = None  # --output-tensor-type (no row-length fallback, as in llama.cpp)
    token_embedding_type: GGMLType | None = None  # --token-embedding-type (likewise)
    tensor_types: tuple[tuple[str, GGMLType], ...] = ()  # --tensor-type REGEX=TYPE; first re.search match wins
    leave_output_tensor: bool = False  # --leave-output-tensor: output.weight keeps the source type
    # an importance matrix is used: changes Q4_0/Q5_0/IQ4_NL/IQ4_XS ffn_down in early layers and IQ3_XXS attn_v
    # and ffn_down, and lifts check_imatrix's refusal
    has_imatrix: bool = False


# ---------------------------------------------------------------------------------------------------------------
# what the rules need to know about the whole model
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    arch: str  # GGUF general.architecture, e.g. "llama", "qwen2"
    n_layer: int  # {arch}.block_count (llama.cpp's n_ffn_down count is this, not a count of tensors)
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    # No output.weight → token_embd doubles as output. None: decided from the tensor list, as llama.cpp does.
    tied_embeddings: bool | None = None

    @property
    def n_gqa(self) -> int:
        """llama_hparams::n_gqa(): heads per kv head, integer division; 0 without kv heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (attn_v gets Q5_K instead of Q3_K/Q4_K), as each arch's load_hparams sets it."""
        layers_70b = {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        return layers_70b.get(self.arch) == self.n_layer

    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, Any]) -> ModelFacts:
        """From GGUF metadata (plain Python values; per-layer head-count arrays use layer 0, as n_gqa() does)."""
        arch = str(kv[Keys.General.ARCHITECTURE])

        def first(template: str, default: int) -> int:
            value = kv.get(arch_key(template, arch), default)
            if not isinstance(value, (int, float, str)):  # a per-layer list or array
                value = value[0] if len(value) else default
            return int(value)

        n_head = first(Keys.Attention.HEAD_COUNT, 0)
        return cls(arch=arch, n_layer=first(Keys.LLM.BLOCK_COUNT, 0), n_head=n_head,
                   n_head_kv=first(Keys.Attention.HEAD_COUNT_KV, n_head), n_expert=first(Keys.LLM.EXPERT_COUNT, 0))


# ---------------------------------------------------------------------------------------------------------------
# step 1: which tensors may be quantized (tensor_allows_quantization)
# ---------------------------------------------------------------------------------------------------------------

# A name containing any of these stays in its source type.
NEVER_QUANTIZED_PARTS = (
    "_norm.weight",  # norms
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight",  # MoE routers
    "altup", "laurel", "per_layer_model_proj",  # small Gemma-3n tensors
    "ssm_conv1d", "shortconv.conv.weight",  # Mamba / LFM2 conv weights
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",  # RWKV
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5 relative position bias
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # exact names (BERT-style embeddings)
# llama.cpp also keeps some glm5-next tensors (arch-specific); qtool does not support that architecture.


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing size-1 ggml dimensions do not count, so a (1, n) matrix is 1-D."""
    ne = tuple(reversed(shape))  # numpy (rows, cols) → ggml ne = (cols, rows)
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] != 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: tuple[int, ...], opts: RecipeOptions = RecipeOptions()) -> bool:
    return (n_dims(shape) >= 2
            and name.endswith("weight")
            and not any(part in name for part in NEVER_QUANTIZED_PARTS)
            and name not in NEVER_QUANTIZED_NAMES
            and not (opts.leave_output_tensor and name == "output.weight"))


# ---------------------------------------------------------------------------------------------------------------
# categories (tensor_get_category): first match wins
# ---------------------------------------------------------------------------------------------------------------

class Cat(Enum):
    TOKEN_EMBD = auto()
    OUTPUT = auto()
    ATTN_QKV = auto()
    ATTN_KV_B = auto()
    ATTN_V = auto()
    ATTN_K = auto()
    ATTN_Q = auto()
    ATTN_OUTPUT = auto()
    FFN_UP = auto()
    FFN_GATE = auto()
    FFN_DOWN = auto()
    OTHER = auto()


_CATEGORY_RULES: tuple[tuple[Any, Cat], ...] = (
    (lambda n: n == "output.weight", Cat.OUTPUT),
    (lambda n: n in ("token_embd.weight", "per_layer_token_embd.weight"), Cat.TOKEN_EMBD),
    (lambda n: "attn_qkv.weight" in n, Cat.ATTN_QKV),
    (lambda n: "attn_kv_b.weight" in n, Cat.ATTN_KV_B),
    (lambda n: "attn_v.weight" in n, Cat.ATTN_V),
    (lambda n: "attn_k.weight" in n, Cat.ATTN_K),
    (lambda n: "attn_q.weight" in n, Cat.ATTN_Q),
    (lambda n: "attn_output.weight" in n, Cat.ATTN_OUTPUT),
    (lambda n: "ffn_up" in n, Cat.FFN_UP),  # substrings: also ffn_up_exps, ffn_up_shexp
    (lambda n: "ffn_gate" in n, Cat.FFN_GATE),
    (lambda n: "ffn_down" in n, Cat.FFN_DOWN),
)
# The attn_v rules (and their counter) cover fused qkv and MLA's kv_b too. llama.cpp also has a separate
# attn_qkv rule (Q4_K_M→Q5_K ...), but it is unreachable because the attn_v branch is tested first.
ATTN_V_LIKE = (Cat.ATTN_V, Cat.ATTN_QKV, Cat.ATTN_KV_B)


def category(name: str) -> Cat:
    return next((cat for match, cat in _CATEGORY_RULES if match(name)), Cat.OTHER)


_BLK = re.compile(r"blk\.([+-]?\d+)\.")


def layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def llama_order(names: list[str]) -> list[str]:
    """The order llama.cpp walks (and writes) tensors: non-layer tensors by name, then by layer, by name within."""
    def key(name: str) -> tuple[int, bytes]:
        layer = layer_of(name)
        return (-1 if layer is None else layer, name.encode())
    return sorted(names, key=key)


# ---------------------------------------------------------------------------------------------------------------
# step 3: the mixture (llama_tensor_get_type_impl), for the ftypes qtool offers
# ---------------------------------------------------------------------------------------------------------------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _Counters:
    """Running state: llama.cpp counts attn_v-like and ffn tensors as it walks them in llama_order (only tensors
    that reach the mixture: a --tensor-type match or --pure skips the count)."""
    n_attention_wv: int = 0  # how many attn_v-like tensors the model has
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


@dataclass(frozen=True)
class _Ctx:
    name: str
    ncols: int  # ggml ne[0], the row length
    ftype: FileType
    facts: ModelFacts
    opts: RecipeOptions
    tied: bool

    @property
    def falcon(self) -> bool:
        return self.facts.arch == "falcon"


# ftype groups the mixture treats alike
# The 1- and 2-bit IQ mixes: their layer tensors follow _low_iq_rule instead of the per-category rules below.
LOW_IQ = frozenset({F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M, F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ2_S,
                    F.MOSTLY_IQ2_M})
# Where the other low-IQ mixes spend Q2_K, these two spend IQ3_S.
IQ2_S_M = frozenset({F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M})
# output.weight (and a tied token_embd) gets Q5_K rather than Q6_K for the lowest-bit mixes.
OUTPUT_Q5_K = LOW_IQ | {F.MOSTLY_IQ3_XXS}
# An untied token_embd is only looked up by row, never multiplied, so most ftypes leave it at the default type;
# these mixes would make it too coarse and give it a fixed type instead.
TOKEN_EMBD_TYPE: dict[FileType, GGMLType] = {
    F.MOSTLY_IQ1_S: T.Q2_K, F.MOSTLY_IQ1_M: T.Q2_K, F.MOSTLY_IQ2_XXS: T.Q2_K, F.MOSTLY_IQ2_XS: T.Q2_K,
    F.MOSTLY_IQ2_S: T.IQ3_S, F.MOSTLY_IQ2_M: T.IQ3_S, F.MOSTLY_IQ3_XXS: T.IQ3_S,
    F.MOSTLY_TQ1_0: T.Q4_K, F.MOSTLY_TQ2_0: T.Q4_K,
}


def _output_rule(t: GGMLType, c: _Ctx) -> GGMLType:
    """output.weight, and token_embd.weight when tied: Q6_K (Q5_K for the lowest IQ mixes), but Q8_0 when the
    row does not fit the default type's block."""
    if c.opts.output_tensor_type is not None:
        return c.opts.output_tensor_type
    if c.falcon or c.ncols % TYPE_INFO[t].block_size:
        return T.Q8_0
    if c.ftype in OUTPUT_Q5_K:
        return T.Q5_K
    return t if t == T.Q8_0 else T.Q6_K


# attn_output of dense models in the LOW_IQ mixes (IQ2_XXS and IQ2_XS keep their own type)
_ATTN_OUTPUT_LOW_IQ = {F.MOSTLY_IQ1_S: T.IQ2_XXS, F.MOSTLY_IQ1_M: T.IQ2_XXS,
                       F.MOSTLY_IQ2_S: T.IQ3_S, F.MOSTLY_IQ2_M: T.IQ3_S}


def _low_iq_rule(t: GGMLType, cat: Cat, c: _Ctx, n: _Counters) -> GGMLType:
    """Layer tensors of the LOW_IQ mixes: a few sensitive tensors get a 2-4 bit K- or IQ3 type."""
    bump = T.IQ3_S if c.ftype in IQ2_S_M else T.Q2_K
    if cat in ATTN_V_LIKE:
        n.i_attention_wv += 1
        return T.Q4_K if c.facts.n_gqa >= 4 or c.facts.n_expert >= 4 else bump
    if cat == Cat.ATTN_K and c.facts.n_expert == 8:
        return T.Q4_K
    if cat == Cat.FFN_DOWN:  # by count of ffn_down tensors seen, even for MoE (unlike the general rule)
        i = n.i_ffn_down
        n.i_ffn_down += 1
        return bump if i < c.facts.n_layer // 8 else t
    if cat == Cat.ATTN_OUTPUT:
        if c.facts.n_expert == 8:
            return T.Q5_K
        return _ATTN_OUTPUT_LOW_IQ.get(c.ftype, t)
    return t



def _attn_v_rule(t: GGMLType, c: _Ctx, n: _Counters) -> GGMLType:
    i, f, gqa4 = n.i_attention_wv, c.ftype, c.facts.n_gqa >= 4
    if f == F.MOSTLY_Q2_K:
        t = T.Q4_K if gqa4 else T.Q3_K
    elif f == F.MOSTLY_IQ3_XXS:  # its grid quantizer is only good enough for attn_v with an importance matrix
        t = T.Q4_K if gqa4 else T.IQ3_XXS if c.opts.has_imatrix else T.IQ3_S
    elif f in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa4:
        t = T.Q4_K
    elif f == F.MOSTLY_IQ3_M:
        t = T.Q4_K
    elif f in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa4:
        t = T.Q5_K
    elif f == F.MOSTLY_Q3_K_M:
        t = T.Q5_K if i < 2 else T.Q4_K
    elif f == F.MOSTLY_Q3_K_L:
        t = T.Q5_K
    elif f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i, n.n_attention_wv):
        t = T.Q6_K
    elif f == F.MOSTLY_Q4_K_S and i < 4:
        t = T.Q5_K
    if c.facts.is_70b and t in (T.Q3_K, T.Q4_K):
        t = T.Q5_K  # 8 heads share each attn_v row, so it is 8x smaller than attn_q: extra bits are cheap
    if c.facts.n_expert == 8:
        t = T.Q8_0
    n.i_attention_wv += 1
    return t


def _layer(c: _Ctx, count: int) -> int:
    """The layer of an ffn tensor: the running count of its kind, but for MoE, whose experts are not stored in
    layer order, the number in its name."""
    if c.facts.n_expert <= 1:
        return count
    i = layer_of(c.name)
    if i is None or not 0 <= i < c.facts.n_layer:
        raise QtoolError(f"cannot tell which of the {c.facts.n_layer} layers tensor {c.name} belongs to")
    return i


def _ffn_down_rule(t: GGMLType, c: _Ctx, n: _Counters) -> GGMLType:
    i, n_layer, f = _layer(c, n.i_ffn_down), c.facts.n_layer, c.ftype
    more = use_more_bits(i, n_layer)
    if f == F.MOSTLY_Q2_K:
        t = T.Q3_K
    elif f == F.MOSTLY_IQ3_XXS and not c.opts.has_imatrix:
        t = T.Q4_K if i < n_layer // 8 else T.Q3_K
    elif f == F.MOSTLY_IQ3_M and (i < n_layer // 8 or (c.facts.n_expert == 8 and more)):
        t = T.Q4_K
    elif f in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not c.opts.has_imatrix and i < n_layer // 8:
        t = T.Q5_K
    elif f == F.MOSTLY_Q3_K_M:
        t = T.Q5_K if i < n_layer // 16 else T.Q4_K if (not c.falcon or more) else T.Q3_K
    elif f == F.MOSTLY_Q3_K_L:
        t = T.Q4_K if c.falcon else T.Q5_K
    elif f == F.MOSTLY_Q4_K_M:
        if c.falcon:
            t = T.Q6_K if i < n_layer // 16 else T.Q5_K if more else T.Q4_K
        elif more:
            t = T.Q6_K
    elif f == F.MOSTLY_Q5_K_M and more:
        t = T.Q6_K
    elif f == F.MOSTLY_Q4_K_S and not c.falcon and i < n_layer // 8:
        t = T.Q5_K
    elif f in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and c.opts.has_imatrix and i < n_layer // 8:
        t = T.Q4_1 if f == F.MOSTLY_Q4_0 else T.Q5_1
    n.i_ffn_down += 1
    return t


def _ffn_gate_up_rule(t: GGMLType, c: _Ctx, n: _Counters, cat: Cat) -> GGMLType:
    """IQ3_XS drops the middle three quarters of the layers' ffn_gate and ffn_up to IQ3_XXS; others keep t."""
    if cat == Cat.FFN_GATE:
        i = _layer(c, n.i_ffn_gate)
        n.i_ffn_gate += 1
    else:
        i = _layer(c, n.i_ffn_up)
        n.i_ffn_up += 1
    n_layer = c.facts.n_layer
    if c.ftype == F.MOSTLY_IQ3_XS and n_layer // 8 <= i < 7 * n_layer // 8:
        return T.IQ3_XXS
    return t


# attn_q and attn_k of the 3-bit grid mixes go one step lower (attn_k of 8-expert MoE is Q8_0 first)
_ATTN_QK = {F.MOSTLY_IQ3_XS: T.IQ3_XXS, F.MOSTLY_IQ3_XXS: T.IQ2_S}

# attn_output for dense models (8-expert MoE and Falcon have their own lines in _attn_output_rule)
_ATTN_OUTPUT_DENSE = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K,
                      F.MOSTLY_IQ3_XXS: T.IQ3_S, F.MOSTLY_IQ3_M: T.Q4_K}
_ATTN_OUTPUT_MOE8_Q5K = (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M,
                         F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M,
                         F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS)


def _attn_output_rule(t: GGMLType, c: _Ctx) -> GGMLType:
    if c.falcon:
        return T.Q4_K if c.ftype == F.MOSTLY_Q3_K_L else t
    if c.facts.n_expert == 8:
        return T.Q5_K if c.ftype in _ATTN_OUTPUT_MOE8_Q5K else t
    return _ATTN_OUTPUT_DENSE.get(c.ftype, t)


def _mixture(t: GGMLType, cat: Cat, c: _Ctx, n: _Counters) -> GGMLType:
    if cat == Cat.OUTPUT or (cat == Cat.TOKEN_EMBD and c.tied):
        return _output_rule(t, c)
    if cat == Cat.TOKEN_EMBD:
        return TOKEN_EMBD_TYPE.get(c.ftype, t)
    if c.ftype in LOW_IQ:
        return _low_iq_rule(t, cat, c, n)
    if cat in ATTN_V_LIKE:
        return _attn_v_rule(t, c, n)
    if cat == Cat.ATTN_K:
        return T.Q8_0 if c.facts.n_expert == 8 else _ATTN_QK.get(c.ftype, t)
    if cat == Cat.ATTN_Q:
        return _ATTN_QK.get(c.ftype, t)
    if cat == Cat.FFN_DOWN:
        return _ffn_down_rule(t, c, n)
    if cat == Cat.ATTN_OUTPUT:
        return _attn_output_rule(t, c)
    if cat in (Cat.FFN_GATE, Cat.FFN_UP):
        return _ffn_gate_up_rule(t, c, n, cat)
    return t


# ---------------------------------------------------------------------------------------------------------------
# step 4: the row-length fallback (tensor_type_fallback)
# ---------------------------------------------------------------------------------------------------------------

# A 256-block type whose rows do not fit falls back to a 32-block type; 32-block types have nowhere to go.
FALLBACK: dict[GGMLType, GGMLType] = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
    **{iq: T.IQ4_NL for iq in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS)},
}


def _fallback(name: str, t: GGMLType, ncols: int) -> GGMLType:
    """The type actually used; equal to `t` unless the row length ncols is not a whole number of t's blocks."""
    block = TYPE_INFO[t].block_size
    if ncols % block == 0:
        return t
    if t in FALLBACK:
        out = FALLBACK[t]
    elif block <= 32:
        out = t
    else:
        raise QtoolError(f"{name}: rows of {ncols} do not fit {t.name} blocks and {t.name} has no fallback type")
    return out if ncols % TYPE_INFO[out].block_size == 0 else T.F16  # "must use F16 due to unusual shape"


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------

SOURCE_TYPE = T.F32  # tensors that are not quantized keep the source type; llama-quantize's input is F32


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: GGMLType  # the type to write
    quantizable: bool  # False: llama.cpp never quantizes this tensor (1-D, norm, router, ...), kept in F32
    wanted: GGMLType | None = None  # set when the row length forced a fallback: the type the rules chose

    @property
    def fell_back(self) -> bool:
        return self.wanted is not None

    @property
    def note(self) -> str:
        """Human-readable reason for a fallback, '' otherwise."""
        if self.wanted is None:
            return ""
        ncols, block = self.shape[-1], TYPE_INFO[self.wanted].block_size
        why = " (unusual shape)" if self.ggml_type == T.F16 else ""
        return f"rows of {ncols} are not a multiple of {block} for {self.wanted.name} → {self.ggml_type.name}{why}"


def plan_types(ftype_name: str, tensors: list[tuple[str, tuple[int, ...]]], facts: ModelFacts,
               opts: RecipeOptions = RecipeOptions()) -> list[TensorPlan]:
    """The ggml type llama-quantize would give each tensor, in the order given.

    tensors: GGUF names with numpy-order shapes (rows, cols); the row length is the last dimension (ggml ne[0]).
    """
    ftype = file_type(ftype_name)
    default = DEFAULT_TYPE[ftype]
    shapes = {name: tuple(int(d) for d in shape) for name, shape in tensors}
    if len(shapes) != len(tensors):
        raise QtoolError("tensor names are not unique")
    has_output = "output.weight" in shapes
    if facts.tied_embeddings is not None and facts.tied_embeddings == has_output:
        raise QtoolError(f"tied_embeddings={facts.tied_embeddings} but output.weight is "
                         f"{'present' if has_output else 'absent'}")
    try:
        patterns = [(re.compile(p), t) for p, t in opts.tensor_types]
    except re.error as e:
        raise UsageError(f"bad --tensor-type regex: {e}") from None

    counters = _Counters(n_attention_wv=sum(category(name) in ATTN_V_LIKE for name in shapes))
    planned: dict[str, TensorPlan] = {}
    for name in llama_order(list(shapes)):
        shape = shapes[name]
        ncols = shape[-1] if shape else 1
        if not allows_quantization(name, shape, opts):
            planned[name] = TensorPlan(name, shape, SOURCE_TYPE, quantizable=False)
            continue
        cat = category(name)
        forced = (opts.token_embedding_type if cat == Cat.TOKEN_EMBD
                  else opts.output_tensor_type if cat == Cat.OUTPUT else None)
        if name == "per_layer_token_embd.weight" and any(rx.search(name) for rx, _ in patterns):
            forced = None  # a --tensor-type naming this big table beats --token-embedding-type
        if forced is not None:  # applied as given, even for float ftypes, without the row-length fallback
            if ncols % TYPE_INFO[forced].block_size:
                raise QtoolError(f"{name}: rows of {ncols} do not fit the requested {forced.name} "
                                 f"(blocks of {TYPE_INFO[forced].block_size})")
            planned[name] = TensorPlan(name, shape, forced, quantizable=True)
            continue
        if default in FLOAT_TYPES:
            planned[name] = TensorPlan(name, shape, default, quantizable=True)
            continue
        manual = next((t for rx, t in patterns if rx.search(name)), None)
        if manual is not None:
            wanted = manual
        elif opts.pure:
            wanted = default
        else:
            ctx = _Ctx(name, ncols, ftype, facts, opts, tied=not has_output)
            wanted = _mixture(default, cat, ctx, counters)
        chosen = _fallback(name, wanted, ncols)
        planned[name] = TensorPlan(name, shape, chosen, quantizable=True,
                                   wanted=wanted if chosen != wanted else None)
    return [planned[name] for name, _ in tensors]


# ---------------------------------------------------------------------------------------------------------------
# the importance-matrix requirement (tensor_requires_imatrix)
# ---------------------------------------------------------------------------------------------------------------

# Without importance weights llama.cpp calls these types' results garbage and refuses to write them.
NEEDS_IMATRIX = frozenset({T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS})
# Exempt by name whatever their type: an imatrix has no (or no useful) entry for the embedding table, which
# is looked up rather than multiplied, and llama.cpp treats output.weight the same way.
IMATRIX_EXEMPT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")


class Refused(QtoolError):
    """qtool will not write this --type for this model (a planned type has no quantizer yet, or it needs an
    importance matrix); `qtool inspect` leaves such types out of its size table."""


# ggml's own quantizers for these assert that weights were given: llama.cpp aborts on an exempt tensor forced to
# one of them (--token-embedding-type IQ2_XXS) without an imatrix. qtool refuses that too, with a message.
# (the kernels' table says which: ggml_quantize_requires_imatrix)
GGML_NEEDS_IMATRIX = frozenset(t for t, row in TRAITS.items() if row.needs_imatrix)


def requires_imatrix(name: str, ggml_type: GGMLType) -> bool:
    """llama.cpp's rule: would it refuse to quantize this tensor to this type without an importance matrix?"""
    return ggml_type in NEEDS_IMATRIX and name not in IMATRIX_EXEMPT


def check_imatrix(ftype_name: str, plans: list[TensorPlan], opts: RecipeOptions) -> None:
    """Refuse, as llama-quantize does, a plan that puts a NEEDS_IMATRIX type on a layer tensor when no
    importance matrix is given (forced --tensor-type types included)."""
    if opts.has_imatrix:
        return
    by_name = {p.name: p for p in plans}
    for name in llama_order(list(by_name)):  # the first offender in llama.cpp's order, as it reports it
        p = by_name[name]
        if p.quantizable and (requires_imatrix(p.name, p.ggml_type) or p.ggml_type in GGML_NEEDS_IMATRIX):
            raise Refused(f"{ftype_name.upper()}: {p.name} would be {p.ggml_type.name}, which needs an importance "
                          "matrix (--imatrix or --calibrate)")
