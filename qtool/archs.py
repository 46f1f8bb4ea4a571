"""Supported architectures, one record each: how a Hugging Face checkpoint becomes GGUF metadata and tensors, and
how a GGUF file's metadata reads back as the model's hyperparameters.

The converter writes hparams through `Arch.hparams` (`hparam_metadata`) and names tensors through `Arch.hf_tensors`
(`gguf_tensor_name`); the runner reads a file through `hparams_from_gguf`, so both sides use the same keys and the
same record. Adding an architecture is one `Arch` entry in ARCHS (plus HF tensor names if its checkpoint spells
them differently).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import Keys, ModelTensor, ValueType, arch_key, tensor_name

K, M = Keys, ModelTensor
U32, F32 = ValueType.UINT32, ValueType.FLOAT32


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # config.json must have it
OPTIONAL = _Marker("OPTIONAL")  # written only when config.json has it
GIVEN = _Marker("GIVEN")  # the converter supplies it (file type, vocabulary size)


@dataclass(frozen=True)
class HParam:
    """One metadata entry written from config.json: the first of `hf` present (at the top level, then in
    rope_parameters) wins, else `default` (a value, a function of the config, which may return OPTIONAL for
    nothing, or one of the markers)."""
    key: str  # a Keys template
    vtype: ValueType
    hf: tuple[str, ...] = ()
    default: Any = REQUIRED
    lo: int = 1  # an integer's least value (phi3 writes a sliding window of 0 for none)

    def value(self, config: Mapping[str, Any]) -> Any:
        found = _config_value(config, self.hf)
        if found is not None:
            return found
        if self.default is REQUIRED:
            raise QtoolError(f"config.json has none of {', '.join(self.hf)}")
        if callable(self.default) and not isinstance(self.default, _Marker):
            return self.default(config)
        return self.default

    def number(self, config: Mapping[str, Any]) -> int | float:
        """value() as the key's type: a positive integer up to MAX_HPARAM, or a finite positive float (an eps
        or RoPE base of 0, NaN or inf gives a file that runs to garbage)."""
        v = self.value(config)
        if self.vtype == ValueType.STRING:  # a constant the converter writes (bitnet's rope scaling type)
            return v
        name = self.hf[0] if self.hf else self.key
        if self.vtype == F32:
            return _positive_float(v, f"config.json: {name}")
        return _positive_int(v, f"config.json: {name}", self.lo)


def _positive_int(v: Any, what: str, lo: int = 1) -> int:
    if isinstance(v, float) and v.is_integer():  # 64.0 is what some exporters write
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_HPARAM:
        raise QtoolError(f"{what} is {_shown(v)}, not an integer from {lo} to {MAX_HPARAM}")
    return v


def _positive_float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise QtoolError(f"{what} is {_shown(v)}, not a finite positive number")
    return float(v)


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:40] + "..."


def _config_value(config: Mapping[str, Any], hf_keys: tuple[str, ...]) -> Any:
    for k in hf_keys:
        if config.get(k) is not None:
            return config[k]
    rope = config.get("rope_parameters") or {}
    for k in hf_keys:
        if rope.get(k) is not None:
            return rope[k]
    return None


def _rope_of(config: Mapping[str, Any], layer_type: str) -> Mapping[str, Any]:
    """The RoPE parameters of one kind of layer ("full_attention" | "sliding_attention"): transformers 5 nests
    them per kind in rope_parameters; a flat rope_scaling / rope_parameters is the global layers'."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        return {}
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp.get(layer_type) if isinstance(rp.get(layer_type), dict) else {}
    return rp if layer_type == "full_attention" else {}


def _linear_factor(config: Mapping[str, Any]) -> Any:
    """The global layers' linear RoPE scaling factor, as TextModel writes one (a "linear" type with a factor)."""
    full = _rope_of(config, "full_attention")
    return full.get("factor") if full.get("rope_type", full.get("type")) == "linear" else None


def _head_dim(config: Mapping[str, Any]) -> int:
    return HP_HIDDEN.number(config) // HP_HEADS.number(config)


HP_HIDDEN = HParam(K.LLM.EMBEDDING_LENGTH, U32, ("hidden_size",))
HP_HEADS = HParam(K.Attention.HEAD_COUNT, U32, ("num_attention_heads",))
HP_HEADS_KV = HParam(K.Attention.HEAD_COUNT_KV, U32, ("num_key_value_heads",), default=HP_HEADS.value)
HP_LAYERS = HParam(K.LLM.BLOCK_COUNT, U32, ("num_hidden_layers",))
HP_ROPE_BASE = HParam(K.Rope.FREQ_BASE, F32, ("rope_theta",), default=10000.0)
HP_HEAD_DIM = HParam(K.Attention.KEY_LENGTH, U32, ("head_dim",), default=_head_dim)
HP_FF = HParam(K.LLM.FEED_FORWARD_LENGTH, U32, ("intermediate_size",))
# mixture of experts: TextModel writes the counts when config.json has them (a config without is a dense model)
HP_EXPERTS = HParam(K.LLM.EXPERT_COUNT, U32, ("num_local_experts", "num_experts", "n_routed_experts"), OPTIONAL)
HP_EXPERTS_USED = HParam(K.LLM.EXPERT_USED_COUNT, U32, ("num_experts_per_tok", "num_experts_per_token",
                                                        "top_k_experts"), OPTIONAL)
# each expert's feed-forward size: Qwen's MoE configs give it apart, Mixtral's experts are intermediate_size wide
HP_FF_EXP = HParam(K.LLM.EXPERT_FEED_FORWARD_LENGTH, U32, ("moe_intermediate_size",), default=HP_FF.value)


def n_experts(config: Mapping[str, Any]) -> int:
    """The checkpoint's expert count; 0 for a dense model."""
    return HP_EXPERTS.number(config) if _config_value(config, HP_EXPERTS.hf) is not None else 0


# transformers' config classes that fill in a head_dim config.json lacks (MixtralConfig leaves it null, so
# llama.cpp's converter writes no key_length for Mixtral)
CONFIG_FILLS_HEAD_DIM = ("LlamaForCausalLM", "MistralForCausalLM")


def _llama_head_dim(config: Mapping[str, Any]) -> Any:
    return _head_dim(config) if arch_for(config)[0] in CONFIG_FILLS_HEAD_DIM else OPTIONAL


def _text_model(head_dim_default: Any) -> tuple[HParam, ...]:
    """convert_hf_to_gguf.py's TextModel.set_gguf_parameters, in its order. It reads config.json through
    transformers' AutoConfig, which fills in the config class's defaults (RMS epsilon 1e-6, and in LlamaConfig and
    MistralConfig a head_dim: llama files always carry key_length and value_length, qwen2 files only when
    config.json gives head_dim; Qwen3Config always has one)."""
    return (
        HP_LAYERS,
        HParam(K.LLM.CONTEXT_LENGTH, U32, ("max_position_embeddings",)),
        HP_HIDDEN,
        HP_FF,
        HP_HEADS,
        HP_HEADS_KV,
        HP_ROPE_BASE,
        HParam(K.Attention.LAYERNORM_RMS_EPS, F32, ("rms_norm_eps",), default=1e-6),
        HP_EXPERTS,
        HP_EXPERTS_USED,
        HParam(K.Attention.KEY_LENGTH, U32, ("head_dim",), default=head_dim_default),
        HParam(K.Attention.VALUE_LENGTH, U32, ("head_dim",), default=head_dim_default),
        HParam(K.General.FILE_TYPE, U32, default=GIVEN),
    )


# the layers of the llama family as transformers names them; "{bid}" is the layer number
LLAMA_HF_TENSORS: dict[str, ModelTensor] = {
    "model.embed_tokens": M.TOKEN_EMBD,
    "model.norm": M.OUTPUT_NORM,
    "lm_head": M.OUTPUT,
    "model.layers.{bid}.input_layernorm": M.ATTN_NORM,
    "model.layers.{bid}.self_attn.q_proj": M.ATTN_Q,
    "model.layers.{bid}.self_attn.k_proj": M.ATTN_K,
    "model.layers.{bid}.self_attn.v_proj": M.ATTN_V,
    "model.layers.{bid}.self_attn.o_proj": M.ATTN_OUT,
    "model.layers.{bid}.post_attention_layernorm": M.FFN_NORM,
    "model.layers.{bid}.mlp.gate_proj": M.FFN_GATE,
    "model.layers.{bid}.mlp.up_proj": M.FFN_UP,
    "model.layers.{bid}.mlp.down_proj": M.FFN_DOWN,
}
LLAMA_TENSORS = frozenset({M.TOKEN_EMBD, M.OUTPUT_NORM, M.OUTPUT, M.ROPE_FREQS, M.ATTN_NORM, M.ATTN_Q, M.ATTN_K,
                           M.ATTN_V, M.ATTN_OUT, M.FFN_NORM, M.FFN_GATE, M.FFN_UP, M.FFN_DOWN})
# BitNet b1.58: transformers' BitNetForCausalLM names the sub-norms attn_sub_norm / ffn_sub_norm, the original
# 1bitLLM checkpoints (the names in llama.cpp's tensor_mapping.py) inner_attn_ln / ffn_layernorm
BITNET_HF_TENSORS: dict[str, ModelTensor] = {
    **LLAMA_HF_TENSORS,
    "model.layers.{bid}.self_attn.attn_sub_norm": M.ATTN_SUB_NORM,
    "model.layers.{bid}.self_attn.inner_attn_ln": M.ATTN_SUB_NORM,
    "model.layers.{bid}.mlp.ffn_sub_norm": M.FFN_SUB_NORM,
    "model.layers.{bid}.mlp.ffn_layernorm": M.FFN_SUB_NORM,
}
# Qwen3: per-head RMSNorms of the queries and keys (one head_dim weight each, shared by every head)
QWEN3_HF_TENSORS: dict[str, ModelTensor] = {
    **LLAMA_HF_TENSORS,
    "model.layers.{bid}.self_attn.q_norm": M.ATTN_Q_NORM,
    "model.layers.{bid}.self_attn.k_norm": M.ATTN_K_NORM,
}
# Mixtral: a router and per-expert SwiGLU weights w1 (gate), w2 (down), w3 (up); "{xid}" is the expert number
MIXTRAL_HF_TENSORS: dict[str, ModelTensor] = {
    "model.layers.{bid}.block_sparse_moe.gate": M.FFN_GATE_INP,
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w1": M.FFN_GATE_EXP,
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w2": M.FFN_DOWN_EXP,
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w3": M.FFN_UP_EXP,
}
# Qwen3-MoE: Qwen3's attention, experts under mlp (llama.cpp's qwen3moe graph has no dense feed-forward layer)
QWEN3MOE_HF_TENSORS: dict[str, ModelTensor] = {
    **{k: v for k, v in QWEN3_HF_TENSORS.items() if ".mlp." not in k},
    "model.layers.{bid}.mlp.gate": M.FFN_GATE_INP,
    "model.layers.{bid}.mlp.experts.{xid}.gate_proj": M.FFN_GATE_EXP,
    "model.layers.{bid}.mlp.experts.{xid}.up_proj": M.FFN_UP_EXP,
    "model.layers.{bid}.mlp.experts.{xid}.down_proj": M.FFN_DOWN_EXP,
}
# Gemma 2: llama's names, but post_attention_layernorm is the attention output's post-norm and the feed-forward
# has its own pre- and post-norms (lm_head is named to be refused: the graph reads token_embd)
GEMMA2_HF_TENSORS: dict[str, ModelTensor] = {
    **{k: v for k, v in LLAMA_HF_TENSORS.items() if v != M.FFN_NORM},
    "model.layers.{bid}.post_attention_layernorm": M.ATTN_POST_NORM,
    "model.layers.{bid}.pre_feedforward_layernorm": M.FFN_NORM,
    "model.layers.{bid}.post_feedforward_layernorm": M.FFN_POST_NORM,
}
# Gemma 3: Gemma 2's names plus Qwen3's per-head q/k norms; its graph reads an lm_head of its own when there is one
GEMMA3_HF_TENSORS: dict[str, ModelTensor] = {
    **GEMMA2_HF_TENSORS,
    "model.layers.{bid}.self_attn.q_norm": M.ATTN_Q_NORM,
    "model.layers.{bid}.self_attn.k_norm": M.ATTN_K_NORM,
}
# Phi-3: Q, K and V in one qkv_proj (llama.cpp's attn_qkv) and gate and up in one gate_up_proj (its ffn_up)
PHI3_HF_TENSORS: dict[str, ModelTensor] = {
    **{k: v for k, v in LLAMA_HF_TENSORS.items() if v not in (M.ATTN_Q, M.ATTN_K, M.ATTN_V, M.FFN_GATE, M.FFN_UP)},
    "model.layers.{bid}.self_attn.qkv_proj": M.ATTN_QKV,
    "model.layers.{bid}.mlp.gate_up_proj": M.FFN_UP,
}
NORMS = frozenset({M.OUTPUT_NORM, M.ATTN_NORM, M.FFN_NORM, M.ATTN_POST_NORM, M.FFN_POST_NORM, M.ATTN_Q_NORM,
                   M.ATTN_K_NORM})
DENSE_FFN = frozenset({M.FFN_GATE, M.FFN_UP, M.FFN_DOWN})
MOE_FFN = frozenset({M.FFN_GATE_INP, M.FFN_GATE_EXP, M.FFN_UP_EXP, M.FFN_DOWN_EXP})
EXPERT_KINDS = (M.FFN_GATE_EXP, M.FFN_UP_EXP, M.FFN_DOWN_EXP)  # stacked per layer into (n_expert, rows, cols)
PROJECTIONS = frozenset({M.ATTN_Q, M.ATTN_K, M.ATTN_V, M.ATTN_OUT, M.FFN_GATE, M.FFN_UP, M.FFN_DOWN})


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # general.architecture
    hf_classes: tuple[str, ...]  # config.json "architectures" entries converted to it
    hparams: tuple[HParam, ...]  # written in this order, as convert_hf_to_gguf.py does
    rope_mode: str  # "normal": adjacent pairs (llama.cpp's llama graph); "neox": halves of each head
    permute_qk: bool  # HF rotates halves; a "normal" graph needs attn_q / attn_k rows interleaved per head
    tensors: frozenset[ModelTensor]  # the weights (and norms) its llama.cpp graph reads; others are refused
    biases: frozenset[ModelTensor]  # which of them may carry a ".bias" (a checkpoint bias elsewhere is refused)
    hf_tensors: Mapping[str, ModelTensor]  # checkpoint name stem ("model.layers.{bid}.mlp.up_proj") → kind
    space_prefix: bool = False  # writes tokenizer_config's add_prefix_space (llama.cpp's LlamaModel.set_vocab)
    sub_norms: tuple[ModelTensor, ...] = ()  # per-layer norms its graph also requires (bitnet's, qwen3's q/k)
    ternary: frozenset[ModelTensor] = frozenset()  # weights the converter rounds to mean|w| × {-1, 0, 1}
    # the order llama.cpp's converter writes a layer's stacked experts in (when the layer's last one is read)
    expert_order: tuple[ModelTensor, ...] = ()
    # the feed-forward gate's activation in llama.cpp's graph ("silu" | "gelu", GELU's tanh approximation), and
    # the config.json hidden_act / hidden_activation names of it (another one would run differently in llama.cpp)
    activation: str = "silu"
    hf_activations: tuple[str, ...] = ("silu", "swish")
    norm_shift: frozenset[ModelTensor] = frozenset()  # norm weights the converter writes as 1 + w (Gemma's RMSNorm)
    embed_scale: bool = False  # the graph multiplies the token embeddings by sqrt(n_embd)
    # llama.cpp's query scaling (n_layer, n_embd, n_head, head_dim) → query_pre_attn_scalar, Q times its -1/2
    # power before attention; None: the scores are scaled by 1/sqrt(head_dim)
    query_scalar: Callable[[int, int, int, int], int] | None = None
    # the attention logit soft-cap the graph applies when the file gives none (0: none, the file's if it has one);
    # None: the graph never caps (a config.json that sets one is refused)
    attn_softcap: float | None = None
    final_softcap: float | None = None  # the same for the output logits
    swa_pattern: int = 0  # sliding-window layers: i % pattern < pattern - 1 (llama.cpp's set_swa_pattern); 0: none
    swa_window: int = 0  # the window when the file gives none (0: no window without the key, as gemma3)
    # the windowed layers' RoPE base when the file has no rope.freq_base_swa, and those layers then unscaled
    # (gemma3's fixed 10000); 0: the global base and scale (gemma2)
    swa_rope_base: float = 0.0
    # the config rope types (rope_scaling / rope_parameters) the converter writes and the graph applies, when not
    # TextModel's (Llama 3's): another is refused
    rope_types: tuple[str, ...] | None = None
    # the per-layer weights the graph requires, when not llama's LAYER_TENSORS (phi3's fused attn_qkv); and each
    # kind's HF shape where it is not HF_SHAPES's (phi3's ffn_up: gate and up rows, 2 × intermediate_size)
    layer_kinds: tuple[ModelTensor, ...] = ()
    hf_shapes: Mapping[ModelTensor, tuple[str, ...]] = field(default_factory=dict)
    fused_gate_up: bool = False  # ffn_up holds the gate's rows then up's (phi3's build_ffn with LLM_FFN_SWIGLU)
    # how the converter writes a SentencePiece vocabulary: "llama" (LlamaModel's), "phi3" (Phi3MiniModel's: every
    # added token of added_tokens.json, tokenizer_config.json and tokenizer.json scored -1000, control if special)
    vocab: str = "llama"
    # the converter's constant tokenizer.ggml.add_space_prefix after the vocabulary (Gemma's False); None: none
    add_space_prefix: bool | None = None


ARCHS: dict[str, Arch] = {a.gguf_name: a for a in (
    # Mixtral is llama with experts (LlamaModel stacks them w1, w2, w3: gate, down, up)
    Arch("llama", ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
         hparams=_text_model(head_dim_default=_llama_head_dim) + (  # LlamaModel adds these two
             HParam(K.LLM.VOCAB_SIZE, U32, default=GIVEN),
             HParam(K.Rope.DIMENSION_COUNT, U32, ("head_dim",), default=_head_dim)),
         rope_mode="normal", permute_qk=True, tensors=LLAMA_TENSORS | MOE_FFN,
         biases=frozenset({M.ATTN_Q, M.ATTN_K, M.ATTN_V, M.ATTN_OUT}),  # optional: only with attention_bias
         hf_tensors={**LLAMA_HF_TENSORS, **MIXTRAL_HF_TENSORS}, space_prefix=True,
         expert_order=(M.FFN_GATE_EXP, M.FFN_DOWN_EXP, M.FFN_UP_EXP)),
    Arch("qwen2", ("Qwen2ForCausalLM",),
         hparams=_text_model(head_dim_default=OPTIONAL),  # TextModel's own: no vocab_size, no rope dimensions
         rope_mode="neox", permute_qk=False, tensors=LLAMA_TENSORS - {M.ROPE_FREQS},
         biases=frozenset({M.ATTN_Q, M.ATTN_K, M.ATTN_V}),  # always present
         hf_tensors=LLAMA_HF_TENSORS),
    # llama.cpp's graph reads token_embd as the output (no output.weight: an untied lm_head is refused), computes
    # SiLU whatever config.json's hidden_act says (check_config refuses another), and its converter (BitnetModel)
    # writes TextModel's keys plus a linear RoPE scaling of 1
    Arch("bitnet", ("BitnetForCausalLM", "BitNetForCausalLM"),
         hparams=_text_model(head_dim_default=OPTIONAL) + (
             HParam(K.Rope.SCALING_TYPE, ValueType.STRING, default="linear"),
             HParam(K.Rope.SCALING_FACTOR, F32, default=1.0)),
         rope_mode="neox", permute_qk=False, tensors=LLAMA_TENSORS - {M.ROPE_FREQS, M.OUTPUT} | {
             M.ATTN_SUB_NORM, M.FFN_SUB_NORM},
         biases=frozenset(), hf_tensors=BITNET_HF_TENSORS, sub_norms=(M.ATTN_SUB_NORM, M.FFN_SUB_NORM),
         ternary=PROJECTIONS),
    # llama.cpp's converter (Qwen3Model, a Qwen2Model) writes TextModel's keys; the graph adds the q/k norms.
    # head_dim is required: transformers' Qwen3Config defaults it to 128 whatever hidden_size / heads is, which
    # the converter would write and the HF model would use, so a config without it is refused, not guessed
    Arch("qwen3", ("Qwen3ForCausalLM",),
         hparams=_text_model(head_dim_default=REQUIRED),
         rope_mode="neox", permute_qk=False, tensors=LLAMA_TENSORS - {M.ROPE_FREQS} | {M.ATTN_Q_NORM, M.ATTN_K_NORM},
         biases=frozenset({M.ATTN_Q, M.ATTN_K, M.ATTN_V}),  # optional; llama.cpp's qwen3 reads no attn_output bias
         hf_tensors=QWEN3_HF_TENSORS, sub_norms=(M.ATTN_Q_NORM, M.ATTN_K_NORM)),
    # Qwen3MoeModel (a Qwen2MoeModel) adds the experts' width to TextModel's keys and stacks them down, gate, up;
    # its graph always renormalizes the chosen experts' weights (check_config refuses norm_topk_prob false)
    Arch("qwen3moe", ("Qwen3MoeForCausalLM",),
         hparams=_text_model(head_dim_default=REQUIRED) + (
             HParam(K.LLM.EXPERT_FEED_FORWARD_LENGTH, U32, ("moe_intermediate_size",), OPTIONAL),),
         rope_mode="neox", permute_qk=False,
         tensors=LLAMA_TENSORS - {M.ROPE_FREQS} - DENSE_FFN | MOE_FFN | {M.ATTN_Q_NORM, M.ATTN_K_NORM},
         biases=frozenset({M.ATTN_Q, M.ATTN_K, M.ATTN_V}),
         hf_tensors=QWEN3MOE_HF_TENSORS, sub_norms=(M.ATTN_Q_NORM, M.ATTN_K_NORM),
         expert_order=(M.FFN_DOWN_EXP, M.FFN_GATE_EXP, M.FFN_UP_EXP)),
    # Gemma2Model writes its own keys (no TextModel ones: no RoPE base, so llama.cpp's 10000 is used), with
    # Gemma2Config's defaults; norms as 1 + w; gelu(gate) * up; tied embeddings only (lm_head is not read)
    Arch("gemma2", ("Gemma2ForCausalLM",),
         hparams=(
             HParam(K.LLM.CONTEXT_LENGTH, U32, ("max_position_embeddings",)),
             HP_HIDDEN, HP_LAYERS, HP_FF, HP_HEADS, HP_HEADS_KV,
             HParam(K.Attention.LAYERNORM_RMS_EPS, F32, ("rms_norm_eps",), default=1e-6),
             HParam(K.Attention.KEY_LENGTH, U32, ("head_dim",), default=256),
             HParam(K.Attention.VALUE_LENGTH, U32, ("head_dim",), default=256),
             HParam(K.General.FILE_TYPE, U32, default=GIVEN),
             HParam(K.LLM.ATTN_LOGIT_SOFTCAPPING, F32, ("attn_logit_softcapping",), default=50.0),
             HParam(K.LLM.FINAL_LOGIT_SOFTCAPPING, F32, ("final_logit_softcapping",), default=30.0),
             HParam(K.Attention.SLIDING_WINDOW, U32, ("sliding_window",), default=4096)),
         rope_mode="neox", permute_qk=False,
         tensors=LLAMA_TENSORS - {M.ROPE_FREQS, M.OUTPUT} | {M.ATTN_POST_NORM, M.FFN_POST_NORM},
         biases=frozenset(), hf_tensors=GEMMA2_HF_TENSORS, sub_norms=(M.ATTN_POST_NORM, M.FFN_POST_NORM),
         activation="gelu", hf_activations=("gelu_pytorch_tanh",), norm_shift=NORMS, embed_scale=True,
         query_scalar=lambda n_layer, n_embd, n_head, head_dim: n_embd // n_head if n_layer == 46 else head_dim,
         attn_softcap=50.0, final_softcap=30.0, swa_pattern=2, swa_window=4096, add_space_prefix=False),
    # Gemma3Model: TextModel's keys (the global layers' linear RoPE scaling and the windowed layers' base among
    # them) with Gemma3TextConfig's defaults, then the final soft-cap when config.json sets one, then the window;
    # no pattern key: llama.cpp's graph makes every 6th layer global. No attention soft-cap (its converter refuses
    # one); norms, q/k ones too, as 1 + w; an untied lm_head is read
    Arch("gemma3", ("Gemma3ForCausalLM",),
         hparams=(
             HP_LAYERS,
             HParam(K.LLM.CONTEXT_LENGTH, U32, ("max_position_embeddings",), default=131072),
             HP_HIDDEN, HP_FF,
             HParam(K.Attention.HEAD_COUNT, U32, ("num_attention_heads",), default=8),
             HParam(K.Attention.HEAD_COUNT_KV, U32, ("num_key_value_heads",), default=4),
             HParam(K.Rope.SCALING_TYPE, ValueType.STRING, default=lambda c: "linear" if _linear_factor(c) else OPTIONAL),
             HParam(K.Rope.SCALING_FACTOR, F32, default=lambda c: _linear_factor(c) or OPTIONAL),
             HParam(K.Rope.FREQ_BASE, F32, ("rope_theta",),
                    default=lambda c: _rope_of(c, "full_attention").get("rope_theta", 1e6)),
             HParam(K.Rope.FREQ_BASE_SWA, F32, ("rope_local_base_freq",),
                    default=lambda c: _rope_of(c, "sliding_attention").get("rope_theta", 10000.0)),
             HParam(K.Attention.LAYERNORM_RMS_EPS, F32, ("rms_norm_eps",), default=1e-6),
             HParam(K.Attention.KEY_LENGTH, U32, ("head_dim",), default=256),
             HParam(K.Attention.VALUE_LENGTH, U32, ("head_dim",), default=256),
             HParam(K.General.FILE_TYPE, U32, default=GIVEN),
             HParam(K.LLM.FINAL_LOGIT_SOFTCAPPING, F32, ("final_logit_softcapping",), OPTIONAL),
             HParam(K.Attention.SLIDING_WINDOW, U32, ("sliding_window",), default=4096)),
         rope_mode="neox", permute_qk=False,
         tensors=LLAMA_TENSORS - {M.ROPE_FREQS} | {M.ATTN_POST_NORM, M.FFN_POST_NORM, M.ATTN_Q_NORM, M.ATTN_K_NORM},
         biases=frozenset(), hf_tensors=GEMMA3_HF_TENSORS,
         sub_norms=(M.ATTN_POST_NORM, M.FFN_POST_NORM, M.ATTN_Q_NORM, M.ATTN_K_NORM),
         activation="gelu", hf_activations=("gelu_pytorch_tanh",), norm_shift=NORMS, embed_scale=True,
         query_scalar=lambda n_layer, n_embd, n_head, head_dim: n_embd // n_head if n_layer == 62 else head_dim,
         final_softcap=0.0, swa_pattern=6, swa_rope_base=10000.0, rope_types=("default", "linear"),
         add_space_prefix=False),
    # Phi3MiniModel writes its own keys (none of TextModel's): the original context, RoPE dimensions from
    # partial_rotary_factor, the sliding window (0 for none; llama.cpp's phi3 graph reads it and disables it);
    # fused attn_qkv and ffn_up (gate rows, then up rows); the graph scales Q by 1/sqrt(head_dim)
    Arch("phi3", ("Phi3ForCausalLM",),
         hparams=(
             HParam(K.LLM.CONTEXT_LENGTH, U32, ("max_position_embeddings", "n_positions")),
             HParam(K.Rope.SCALING_ORIG_CTX_LEN, U32, ("original_max_position_embeddings",), default=4096),
             HP_HIDDEN, HP_FF, HP_LAYERS, HP_HEADS, HP_HEADS_KV,
             HParam(K.Attention.LAYERNORM_RMS_EPS, F32, ("rms_norm_eps",), default=1e-5),
             HParam(K.Rope.DIMENSION_COUNT, U32, default=lambda c: int(
                 (_config_value(c, ("partial_rotary_factor",)) or 1.0) * HP_HIDDEN.number(c)) // HP_HEADS.number(c)),
             HP_ROPE_BASE,
             HParam(K.General.FILE_TYPE, U32, default=GIVEN),
             HParam(K.Attention.SLIDING_WINDOW, U32, ("sliding_window",), default=0, lo=0)),
         rope_mode="neox", permute_qk=False,
         tensors=frozenset({M.TOKEN_EMBD, M.OUTPUT_NORM, M.OUTPUT, M.ATTN_NORM, M.ATTN_QKV, M.ATTN_OUT, M.FFN_NORM,
                            M.FFN_UP, M.FFN_DOWN}),
         biases=frozenset(), hf_tensors=PHI3_HF_TENSORS,
         layer_kinds=(M.ATTN_NORM, M.ATTN_QKV, M.ATTN_OUT, M.FFN_NORM, M.FFN_UP, M.FFN_DOWN),
         hf_shapes={M.FFN_UP: ("ff2", "hidden")}, fused_gate_up=True,
         query_scalar=lambda n_layer, n_embd, n_head, head_dim: head_dim, rope_types=("default",), vocab="phi3"),
)}
BY_HF_CLASS: dict[str, Arch] = {c: a for a in ARCHS.values() for c in a.hf_classes}


def arch_for(config: Mapping[str, Any]) -> tuple[str, Arch]:
    """The record for a config.json's "architectures" (the first supported one wins)."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise QtoolError(f"config.json: architectures is {_shown(names)}, not a list of class names")
    for name in names:
        if name in BY_HF_CLASS:
            return name, BY_HF_CLASS[name]
    shown = ", ".join(names) if names else "none given in config.json"
    raise QtoolError(f"unsupported architecture ({shown}); qtool supports {', '.join(BY_HF_CLASS)}")


def hparam_metadata(arch: Arch, config: Mapping[str, Any], given: Mapping[str, Any]
                    ) -> list[tuple[str, Any, ValueType, None]]:
    """The architecture's metadata entries in order; `given` holds the GIVEN ones by key (filled templates)."""
    out = []
    for hp in arch.hparams:
        key = arch_key(hp.key, arch.gguf_name)
        if hp.default is GIVEN:
            value = given[key]
        elif hp.value(config) is OPTIONAL:  # absent, or a default that writes nothing
            continue
        else:
            value = hp.number(config)
        out.append((key, value, hp.vtype, None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# checking a checkpoint against its config (before anything is planned or written)
# ---------------------------------------------------------------------------------------------------------------

MAX_VOCAB = 1 << 24  # 64× the largest vocabulary in use: the token list is padded to vocab_size in memory
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_OBJECTS = ("rope_scaling", "rope_parameters", "text_config")


def check_config(arch: Arch, config: Mapping[str, Any]) -> None:
    """Every config.json value the converter reads, checked for type and range (the field named in the error),
    so nonsense hparams are an error rather than a file."""
    for field in _OBJECTS:
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise QtoolError(f"config.json: {field} is {_shown(config[field])}, not an object")
    for field in _BOOLS:
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise QtoolError(f"config.json: {field} is {_shown(config[field])}, not true or false")
    for field in ("hidden_act", "hidden_activation"):  # llama.cpp runs the file with its graph's all the same
        act = config.get(field)
        if act is not None and act not in arch.hf_activations:
            raise QtoolError(f"config.json: {field} is {_shown(act)}; llama.cpp's {arch.gguf_name} graph computes "
                             f"{arch.hf_activations[0]}, so the converted file would give wrong results")
    scalar = config.get("query_pre_attn_scalar")
    if arch.query_scalar is not None and scalar is not None:
        want = arch.query_scalar(HP_LAYERS.number(config), HP_HIDDEN.number(config), HP_HEADS.number(config),
                                 HP_HEAD_DIM.number(config))
        if scalar != want:
            raise QtoolError(f"config.json: query_pre_attn_scalar is {_shown(scalar)}; llama.cpp's "
                             f"{arch.gguf_name} graph scales queries by {want}^-1/2, so the converted file would "
                             "give wrong results")
    for hf, what, cap in (("attn_logit_softcapping", "attention", arch.attn_softcap),
                          ("final_logit_softcapping", "output", arch.final_softcap)):
        if cap is None and config.get(hf) is not None:
            raise QtoolError(f"config.json: {hf} is {_shown(config[hf])}; llama.cpp's {arch.gguf_name} graph applies "
                             f"no {what} soft-cap, so the converted file would give wrong results")
    _check_layer_types(arch, config)
    for hp in arch.hparams:
        if hp.default is GIVEN or hp.value(config) is OPTIONAL:
            continue
        hp.number(config)
    if config.get("vocab_size") is not None:
        vocab = _positive_int(config["vocab_size"], "config.json: vocab_size")
        if vocab > MAX_VOCAB:
            raise QtoolError(f"config.json: vocab_size is {vocab}, more than the {MAX_VOCAB} qtool accepts")
    n_head, n_kv = HP_HEADS.number(config), HP_HEADS_KV.number(config)
    if n_head % n_kv:
        raise QtoolError(f"config.json: {n_head} attention heads cannot share {n_kv} KV heads "
                         "(num_attention_heads must be a multiple of num_key_value_heads)")
    if _config_value(config, HP_HEAD_DIM.hf) is None and HP_HIDDEN.number(config) % n_head:
        raise QtoolError(f"config.json: hidden_size {HP_HIDDEN.number(config)} is not a multiple of "
                         f"num_attention_heads {n_head} (and no head_dim is given)")
    head_dim = HP_HEAD_DIM.number(config)
    if head_dim % 2:  # RoPE rotates pairs
        raise QtoolError(f"config.json: head size {head_dim} is odd; RoPE needs an even one")
    if not any(hp.key == K.Attention.KEY_LENGTH for hp in arch.hparams) and head_dim != _head_dim(config):
        raise QtoolError(f"config.json: head_dim is {head_dim}; llama.cpp's {arch.gguf_name} converter writes none, "
                         f"so its graph would use hidden_size / num_attention_heads = {_head_dim(config)}")
    _check_rope_scaling(arch, config)
    _check_experts(arch, config)


def _check_experts(arch: Arch, config: Mapping[str, Any]) -> None:
    """A mixture of experts: an architecture whose graph has them, a used count from 1 to the expert count, and
    the routing llama.cpp's graph computes (it renormalizes the chosen experts' weights)."""
    n_expert = n_experts(config)
    if not n_expert:
        if arch.expert_order and not DENSE_FFN <= arch.tensors:
            raise QtoolError(f"config.json: num_experts is missing; llama.cpp's {arch.gguf_name} graph needs experts")
        return
    if not arch.expert_order:
        raise QtoolError(f"config.json: {HP_EXPERTS.hf[0]} {n_expert}, but llama.cpp's {arch.gguf_name} graph "
                         "has no experts")
    if _config_value(config, HP_EXPERTS_USED.hf) is None:
        raise QtoolError(f"config.json has none of {', '.join(HP_EXPERTS_USED.hf)} (experts used per token)")
    used = HP_EXPERTS_USED.number(config)
    if used > n_expert:
        raise QtoolError(f"config.json: {used} experts used per token, but there are only {n_expert}")
    HP_FF_EXP.number(config)
    if config.get("norm_topk_prob") is False:
        raise QtoolError("config.json: norm_topk_prob is false; llama.cpp's graph renormalizes the chosen experts' "
                         "weights, so the converted file would give wrong results")


UNWRITTEN_ROPE_SCALING = ("linear", "yarn", "su", "longrope")  # rope types with keys qtool does not write


def _check_layer_types(arch: Arch, config: Mapping[str, Any]) -> None:
    """Which layers are windowed: llama.cpp's graph derives it from its pattern (the converter writes none), so a
    config.json whose layer_types (or sliding_window_pattern) say otherwise would run differently."""
    if not arch.swa_pattern:
        return
    p, n_layer = arch.swa_pattern, HP_LAYERS.number(config)
    want = ["sliding_attention" if i % p < p - 1 else "full_attention" for i in range(n_layer)]
    types = config.get("layer_types")
    if types is not None and types != want or config.get("sliding_window_pattern") not in (None, p):
        raise QtoolError(f"config.json: layer_types (or sliding_window_pattern) are not every {p}th layer global, "
                         f"the others windowed, the only pattern llama.cpp's {arch.gguf_name} graph runs")


def _check_rope_scaling(arch: Arch, config: Mapping[str, Any]) -> None:
    """The fields the converter reads for Llama 3 scaling: factors finite and positive, high above low (the
    smoothing divides by their difference), the original context a positive integer. An architecture with its
    own rope types (gemma3's linear on the global layers) takes those and no other."""
    if arch.rope_types is not None:
        for layer_type in ("full_attention", "sliding_attention"):
            rs = _rope_of(config, layer_type)
            kind = rs.get("rope_type", rs.get("type"))
            allowed = arch.rope_types if layer_type == "full_attention" else ("default",)
            if kind is not None and (kind not in allowed or kind == "linear" and rs.get("factor") is None):
                label = "rope_type" if layer_type == "full_attention" else "the sliding-attention layers' rope_type"
                raise QtoolError(f"config.json: {label} {_shown(kind)}"
                                 f"{' without a factor' if kind in allowed else ''} is not supported for "
                                 f"{arch.gguf_name} (llama.cpp's converter and graph apply {', '.join(allowed)})")
        return
    rs = config.get("rope_scaling") or config.get("rope_parameters") or {}
    where = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    kind = rs.get("rope_type", rs.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise QtoolError(f"config.json: {where}.rope_type is {_shown(kind)}, not a string")
    # present means used (the converter's rs.get(field, default) returns a null as is)
    for field in ("factor", "low_freq_factor", "high_freq_factor"):
        if field in rs:
            _positive_float(rs[field], f"config.json: {where}.{field}")
    if "original_max_position_embeddings" in rs:
        _positive_int(rs["original_max_position_embeddings"], f"config.json: {where}.original_max_position_embeddings")
    if (kind or "").lower() == "llama3" and rs.get("high_freq_factor", 4.0) <= rs.get("low_freq_factor", 1.0):
        raise QtoolError(f"config.json: {where}.high_freq_factor must be above low_freq_factor")
    # llama.cpp's TextModel writes rope.scaling.* keys for these, which qtool does not: refused rather than a file
    # whose RoPE differs from the one the converter would write
    if kind in UNWRITTEN_ROPE_SCALING and (kind in ("su", "longrope") or rs.get("factor") is not None):
        raise QtoolError(f"config.json: {where}.rope_type {kind!r} is not supported (qtool writes no "
                         "rope.scaling keys for it; it supports Llama 3's)")


# each kind's HF shape ([out, in], torch order) in terms of the config; a bias is the weight's first dimension
HF_SHAPES: dict[ModelTensor, tuple[str, ...]] = {
    M.TOKEN_EMBD: ("vocab", "hidden"), M.OUTPUT: ("vocab", "hidden"), M.OUTPUT_NORM: ("hidden",),
    M.ATTN_NORM: ("hidden",), M.FFN_NORM: ("hidden",),
    M.ATTN_Q: ("q", "hidden"), M.ATTN_K: ("kv", "hidden"), M.ATTN_V: ("kv", "hidden"), M.ATTN_OUT: ("hidden", "q"),
    M.ATTN_QKV: ("qkv", "hidden"),
    M.FFN_GATE: ("ff", "hidden"), M.FFN_UP: ("ff", "hidden"), M.FFN_DOWN: ("hidden", "ff"),
    M.ATTN_SUB_NORM: ("hidden",), M.FFN_SUB_NORM: ("ff",), M.ATTN_POST_NORM: ("hidden",), M.FFN_POST_NORM: ("hidden",),
    M.ATTN_Q_NORM: ("head",), M.ATTN_K_NORM: ("head",),
    # one expert's slice of the stacked tensors, as the checkpoint stores each expert apart
    M.FFN_GATE_INP: ("experts", "hidden"), M.FFN_GATE_EXP: ("ff_exp", "hidden"), M.FFN_UP_EXP: ("ff_exp", "hidden"),
    M.FFN_DOWN_EXP: ("hidden", "ff_exp"),
}
# what every layer and the model must have for llama.cpp to load the file (lm_head is optional: tied embeddings);
# a layer's feed-forward is dense or, when config.json counts experts, a router and every expert's three weights
LAYER_TENSORS = (M.ATTN_NORM, M.ATTN_Q, M.ATTN_K, M.ATTN_V, M.ATTN_OUT, M.FFN_NORM, M.FFN_GATE, M.FFN_UP, M.FFN_DOWN)
MOE_LAYER_TENSORS = LAYER_TENSORS[:6] + (M.FFN_GATE_INP,)
MODEL_TENSORS = (M.TOKEN_EMBD, M.OUTPUT_NORM)


def check_tensors(arch: Arch, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every checkpoint tensor's shape against the (checked) config, every layer below num_hidden_layers, and
    every tensor the graph needs present: a contradiction is an error before anything is written."""
    head_dim, n_head, n_kv = HP_HEAD_DIM.number(config), HP_HEADS.number(config), HP_HEADS_KV.number(config)
    n_expert = n_experts(config)
    dims = {"hidden": HP_HIDDEN.number(config), "q": n_head * head_dim, "kv": n_kv * head_dim,
            "ff": HP_FF.number(config), "head": head_dim, "experts": n_expert,
            "qkv": (n_head + 2 * n_kv) * head_dim, "ff2": 2 * HP_FF.number(config),
            "ff_exp": HP_FF_EXP.number(config) if n_expert else 0,
            "vocab": None if config.get("vocab_size") is None else int(config["vocab_size"])}  # checked in check_config
    # how each dimension follows from config.json, for the error
    source = {"hidden": f"hidden_size {dims['hidden']}", "q": f"num_attention_heads {n_head} × head size {head_dim}",
              "kv": f"num_key_value_heads {n_kv} × head size {head_dim}", "ff": f"intermediate_size {dims['ff']}",
              "qkv": f"(num_attention_heads {n_head} + 2 × num_key_value_heads {n_kv}) × head size {head_dim}",
              "ff2": f"2 × intermediate_size {dims['ff']}",
              "head": f"head size {head_dim}", "experts": f"{n_expert} experts",
              "ff_exp": f"expert feed-forward size {dims['ff_exp']}"}
    n_layer = HP_LAYERS.number(config)
    layer_kinds = (MOE_LAYER_TENSORS if n_expert else arch.layer_kinds or LAYER_TENSORS) + arch.sub_norms
    seen: set[tuple[ModelTensor, int | None]] = set()
    experts_seen: set[tuple[ModelTensor, int, int]] = set()
    for name, shape in shapes.items():
        found = _parse(name, arch)
        if found is None:
            continue
        kind, layer, xid, suffix = found
        if (layer is None) != (kind not in layer_kinds + LAYER_TENSORS + MOE_LAYER_TENSORS + EXPERT_KINDS) \
                or layer is not None and layer >= n_layer:
            raise QtoolError(f"tensor {name}: layer {layer} does not exist (config.json: num_hidden_layers "
                             f"{n_layer})")
        if (kind in MOE_FFN) != bool(n_expert) and kind in MOE_FFN | DENSE_FFN:
            raise QtoolError(f"tensor {name}: a {'dense' if n_expert else 'mixture-of-experts'} feed-forward "
                             f"weight, but config.json gives {n_expert or 'no'} experts")
        if xid is not None:
            if xid >= n_expert:
                raise QtoolError(f"tensor {name}: expert {xid} does not exist (config.json: {n_expert} experts)")
            experts_seen.add((kind, layer, xid))
        if kind in (M.TOKEN_EMBD, M.OUTPUT) and dims["vocab"] is None and len(shape) == 2:
            dims["vocab"] = shape[0]  # no vocab_size: the first embedding decides, the other must agree
        shape_of = arch.hf_shapes.get(kind, HF_SHAPES[kind])
        want = shape_of if suffix == "weight" else shape_of[:1]
        expected = [dims[d] for d in want]
        if list(shape) != expected:
            source["vocab"] = (f"vocab_size {dims['vocab']}" if config.get("vocab_size") is not None
                               else f"the other embedding's {dims['vocab']} rows")
            given = ", ".join(source[d] for d in dict.fromkeys(want))
            raise QtoolError(f"tensor {name} has shape {list(shape)}, config.json gives {expected} ({given})")
        if suffix == "weight":
            seen.add((kind, layer))
    missing = [tensor_name(k) for k in MODEL_TENSORS if (k, None) not in seen]
    missing += [tensor_name(k, b) for b in range(n_layer) for k in layer_kinds if (k, b) not in seen]
    missing += [f"expert {x} of {tensor_name(k, b)}" for b in range(n_layer) for k in EXPERT_KINDS
                for x in range(n_expert) if (k, b, x) not in experts_seen]
    if missing:
        raise QtoolError(f"no weight for {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                         f" among the checkpoint's tensors (config.json: num_hidden_layers {n_layer})")


def check_checkpoint(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> Arch:
    """The architecture record of a checkpoint whose config and tensor shapes are consistent."""
    if not isinstance(config, dict):
        raise QtoolError(f"config.json is {type(config).__name__}, not a JSON object")
    _, arch = arch_for(config)
    check_config(arch, config)
    check_tensors(arch, config, shapes)
    return arch


# present in some checkpoints, recomputed by llama.cpp
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"\.(\d+)\.")


def hf_tensor_kind(hf_name: str, arch: Arch) -> tuple[ModelTensor, int | None, str] | None:
    """(kind, layer, "weight" | "bias") of a checkpoint tensor; None for tensors llama.cpp does not need. One
    expert's weight has the kind of the stacked tensor it goes into (hf_expert gives its number)."""
    found = _parse(hf_name, arch)
    return None if found is None else (found[0], found[1], found[3])


def hf_expert(hf_name: str, arch: Arch) -> int | None:
    """The expert number of a checkpoint tensor that is one expert's weight, else None."""
    found = _parse(hf_name, arch)
    return None if found is None else found[2]


def _parse(hf_name: str, arch: Arch) -> tuple[ModelTensor, int | None, int | None, str] | None:
    """(kind, layer, expert, suffix): the first number in the name is the layer, a second one the expert."""
    if IGNORED.match(hf_name):
        return None
    stem, _, suffix = hf_name.rpartition(".")
    m = _LAYER.search(stem + ".")
    key, xid = (stem[:m.start()] + ".{bid}." + stem[m.end():] if m else stem).rstrip("."), None
    if m and (x := _LAYER.search(key + ".", m.start() + len(".{bid}"))):
        key, xid = key[:x.start()] + ".{xid}." + key[x.end():], int(x.group(1))
        key = key.rstrip(".")
    kind = arch.hf_tensors.get(key)
    if kind is not None and kind not in arch.tensors:  # e.g. bitnet's lm_head: its graph reads token_embd instead
        raise QtoolError(f"tensor {hf_name} has no GGUF equivalent: llama.cpp's {arch.gguf_name} graph reads no "
                         f"{tensor_name(kind, 0 if '{bid}' in key else None, '')}")
    if (kind is None or suffix not in ("weight", "bias")
            or suffix == "bias" and kind not in arch.biases):
        raise QtoolError(f"tensor {hf_name} has no GGUF equivalent in qtool's name table")
    return kind, int(m.group(1)) if m else None, xid, suffix


def gguf_tensor_name(hf_name: str, arch: Arch | None = None) -> str | None:
    """GGUF name for a checkpoint tensor ("blk.3.attn_q.weight"); None for tensors llama.cpp does not need."""
    found = hf_tensor_kind(hf_name, arch or ARCHS["llama"])
    return None if found is None else tensor_name(*found)


def permute_qk(w, n_head: int):
    """HF stores rotate-half RoPE rows (first half, second half of each head); llama.cpp's llama graph rotates
    adjacent pairs, so interleave the two halves of every head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# reading a GGUF file back (the runner)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # K and Q
    head_dim_v: int
    n_ff: int
    eps: float
    rope_base: float
    n_rot: int
    rope_mode: str  # "normal" | "neox"
    freq_scale: float
    n_ctx_train: int
    n_expert: int = 0  # experts per MoE layer; 0 for a dense model
    n_expert_used: int = 0  # experts each token is routed to
    ffn_act: str = "silu"  # the feed-forward gate's activation: "silu" | "gelu" (tanh approximation)
    embd_scale: float = 0.0  # the token embeddings times this (gemma: sqrt(n_embd)); 0: not scaled
    q_scale: float = 0.0  # queries times this before attention, the scores then unscaled; 0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # scores → cap * tanh(scores / cap); 0: none
    final_softcap: float = 0.0  # the same for the output logits
    n_swa: int = 0  # the sliding window: a query sees the n_swa newest positions (itself included)
    swa_layers: tuple[bool, ...] = ()  # which layers use the window (none when empty)
    rope_base_swa: float = 0.0  # the windowed layers' RoPE base and frequency scale (0: the global ones)
    freq_scale_swa: float = 1.0


MAX_HPARAM = 2**31 - 1  # llama.cpp keeps hparams in int32/uint32


def hparams_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, Any] | None = None) -> HParams:
    """The runner's hyperparameters from a file's metadata, with llama.cpp's defaults for absent keys. n_vocab is
    token_embd's row count when `tensors` (name → an object with .shape) is given, else {arch}.vocab_size or the
    token list's length. Problems raise QtoolError(problem); the caller prefixes the path."""
    arch = metadata.get(K.General.ARCHITECTURE)
    if not isinstance(arch, str):  # a list or number here is a broken file, not an unknown architecture
        raise QtoolError(f"metadata {K.General.ARCHITECTURE} is {_kind(arch)}, expected a string")
    if arch not in ARCHS:
        raise QtoolError(f"architecture {arch!r} is not supported by the runner (supported: {', '.join(ARCHS)})")

    def key(template: str, default: Any = None, required: bool = False) -> Any:
        name = arch_key(template, arch)
        v = metadata.get(name, default)
        if v is None and required:
            raise QtoolError(f"metadata {name} is missing")
        if isinstance(v, (np.ndarray, list, tuple)):  # per-layer arrays: only uniform ones are supported
            a = np.asarray(v)
            if a.dtype.kind not in "iuf" or a.ndim != 1:
                raise QtoolError(f"metadata {name} is {_kind(v)}, expected a number")
            if a.size == 0 or not np.all(a == a.flat[0]):
                raise QtoolError(f"metadata {name} varies by layer, which the runner does not support")
            v = a.flat[0].item()
        if isinstance(v, np.generic):  # numpy scalars from callers other than the reader: checked as Python values
            v = v.item()
        return v

    # every number is checked for type and range where it is read: int("64") or float("x") would pass or trace
    def key_int(template: str, default: Any = None, required: bool = False, lo: int = 1) -> int:
        v = key(template, default, required)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise QtoolError(f"metadata {arch_key(template, arch)} is {_kind(v)}, expected an integer")
        if not lo <= v <= MAX_HPARAM:
            raise QtoolError(f"metadata {arch_key(template, arch)} is {v}, expected {lo} to {MAX_HPARAM}")
        return v

    def key_float(template: str, default: float) -> float:
        v = key(template, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise QtoolError(f"metadata {arch_key(template, arch)} is {_kind(v)}, expected a number")
        v = float(v)
        if not math.isfinite(v) or v <= 0:  # eps, rope base and scaling factor: 0, NaN or inf is nonsense
            raise QtoolError(f"metadata {arch_key(template, arch)} is {v}, expected a finite positive number")
        return v

    n_embd = key_int(K.LLM.EMBEDDING_LENGTH, required=True)
    n_head = key_int(K.Attention.HEAD_COUNT, required=True)
    n_head_kv = key_int(K.Attention.HEAD_COUNT_KV, n_head)
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise QtoolError(f"{n_head} attention heads cannot share {n_head_kv} KV heads")
    head_dim = key_int(K.Attention.KEY_LENGTH, max(n_embd // n_head, 1))
    head_dim_v = key_int(K.Attention.VALUE_LENGTH, head_dim)
    n_rot = key_int(K.Rope.DIMENSION_COUNT, head_dim, lo=0)
    if n_rot % 2 or n_rot > head_dim:
        raise QtoolError(f"rope.dimension_count {n_rot} does not fit head size {head_dim}")
    freq_scale = 1.0
    stype = key(K.Rope.SCALING_TYPE)
    if stype is not None and not isinstance(stype, str):
        raise QtoolError(f"metadata {arch_key(K.Rope.SCALING_TYPE, arch)} is {_kind(stype)}, expected a string")
    if stype in ("linear",):
        factor = key_float(K.Rope.SCALING_FACTOR, 1.0)
        freq_scale = 1.0 / factor if factor else 1.0
    elif stype not in (None, "none"):
        raise QtoolError(f"RoPE scaling {stype!r} is not supported by the runner (linear and Llama 3's are)")
    n_expert = key_int(K.LLM.EXPERT_COUNT, 0, lo=0)
    n_expert_used = key_int(K.LLM.EXPERT_USED_COUNT, 0, lo=0)
    if n_expert and not 1 <= n_expert_used <= n_expert:  # llama.cpp asserts the same
        raise QtoolError(f"{n_expert_used} experts used per token do not fit {n_expert} experts")
    embd_name = tensor_name(M.TOKEN_EMBD)
    if tensors is not None:
        emb = tensors.get(embd_name)
        if emb is None:
            raise QtoolError(f"tensor {embd_name} is missing")
        n_vocab = int(emb.shape[0])
    else:
        tokens = metadata.get(K.Tokenizer.LIST)
        n_vocab = key_int(K.LLM.VOCAB_SIZE, len(tokens) if isinstance(tokens, list) else 0, lo=0)
    rec = ARCHS[arch]
    n_layer = key_int(K.LLM.BLOCK_COUNT, required=True)
    n_swa, swa_layers = 0, ()
    if rec.swa_pattern:
        n_swa = key_int(K.Attention.SLIDING_WINDOW, rec.swa_window, lo=0)
        pattern = key_int(K.Attention.SLIDING_WINDOW_PATTERN, rec.swa_pattern, lo=0)
        swa_layers = tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer)) if n_swa else ()
    q_scale = 0.0
    if rec.query_scalar is not None:  # float32 as llama.cpp's 1.0f / sqrtf(float(...))
        q_scale = float(np.float32(1) / np.sqrt(np.float32(rec.query_scalar(n_layer, n_embd, n_head, head_dim))))
    def softcap(template: str, default: float | None) -> float:  # None: the graph never caps
        return 0.0 if default is None or key(template) is None and not default else key_float(template, default)

    rope_base = key_float(K.Rope.FREQ_BASE, 10000.0)
    base_swa, scale_swa = 0.0, 1.0
    if swa_layers:  # llama.cpp's rope_freq_base_train_swa: gemma3's fixed 10000 and unscaled, gemma2's the global
        base_swa = key_float(K.Rope.FREQ_BASE_SWA, rec.swa_rope_base or rope_base)
        scale_swa = 1.0 if rec.swa_rope_base else freq_scale
    return HParams(arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer,
                   n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
                   n_ff=key_int(K.LLM.FEED_FORWARD_LENGTH, 0, lo=0),
                   eps=key_float(K.Attention.LAYERNORM_RMS_EPS, 1e-5),
                   rope_base=rope_base, n_rot=n_rot, rope_mode=ARCHS[arch].rope_mode,
                   freq_scale=freq_scale, n_ctx_train=_ctx(key(K.LLM.CONTEXT_LENGTH, 0), arch),
                   n_expert=n_expert, n_expert_used=n_expert_used, ffn_act=rec.activation,
                   embd_scale=float(np.sqrt(np.float32(n_embd))) if rec.embed_scale else 0.0, q_scale=q_scale,
                   attn_softcap=softcap(K.LLM.ATTN_LOGIT_SOFTCAPPING, rec.attn_softcap),
                   final_softcap=softcap(K.LLM.FINAL_LOGIT_SOFTCAPPING, rec.final_softcap),
                   n_swa=n_swa, swa_layers=swa_layers, rope_base_swa=base_swa, freq_scale_swa=scale_swa)


def _ctx(v: Any, arch: str) -> int:
    """context_length: any non-negative integer (a huge one is capped by memory when the cache is allocated)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        shown = v if isinstance(v, int) and not isinstance(v, bool) else _kind(v)
        raise QtoolError(f"metadata {arch_key(K.LLM.CONTEXT_LENGTH, arch)} is {shown}, "
                         "expected a non-negative integer")
    return v


def _kind(v: Any) -> str:
    """How a wrong metadata value is named in an error: its type, and the value when short."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return f"an array of {len(v)}"
    if v is None:
        return "missing"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:40] + '...'}"
