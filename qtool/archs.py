"""Supported architectures: how a Hugging Face config and tensor names become GGUF metadata and tensor names.

Adding an architecture is one entry in ARCHS (plus tensor names if its checkpoint spells them differently).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from qtool.errors import QtoolError


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # general.architecture
    permute_qk: bool  # llama.cpp's llama graph expects interleaved-pair RoPE rows in attn_q / attn_k
    biases: bool = False  # q/k/v projections carry biases


ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("llama", permute_qk=True),
    "MistralForCausalLM": Arch("llama", permute_qk=True),
    "Qwen2ForCausalLM": Arch("qwen2", permute_qk=False, biases=True),
}

# HF name → GGUF name; "{}" is the layer number
TENSOR_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}
# present in some checkpoints, recomputed by llama.cpp
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"\.(\d+)\.")


def gguf_tensor_name(hf_name: str) -> str | None:
    """GGUF name for a checkpoint tensor; None for tensors llama.cpp does not need."""
    if IGNORED.match(hf_name):
        return None
    m = _LAYER.search(hf_name)
    key = hf_name[:m.start()] + ".{}." + hf_name[m.end():] if m else hf_name
    target = TENSOR_NAMES.get(key)
    if target is None:
        raise QtoolError(f"tensor {hf_name} has no GGUF equivalent in qtool's name table")
    return target.format(m.group(1)) if m else target


def arch_for(config: dict) -> tuple[str, Arch]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return name, ARCHS[name]
    shown = ", ".join(names) if names else "none given in config.json"
    raise QtoolError(f"unsupported architecture ({shown}); qtool supports {', '.join(ARCHS)}")


def permute_qk(w, n_head: int):
    """HF stores rotate-half RoPE rows (first half, second half of each head); llama.cpp's llama graph rotates
    adjacent pairs, so interleave the two halves of every head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
