"""Conversion pipeline: checkpoint → tensors → quantize → writer, one tensor at a time.

`plan()` reads only headers and configs and decides every output tensor's name, shape and type, so the GGUF
header can be written first; `write()` then loads, transforms and encodes each tensor and streams it out.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qtool import archs
from qtool.errors import QtoolError
from qtool.formats.checkpoint import Checkpoint, resolve_source
from qtool.formats.constants import (FILE_TYPES, GGML_QUANTIZATION_VERSION, TYPE_INFO, GGMLType, ValueType)
from qtool.formats.gguf_writer import GGUFWriter
from qtool.formats.hf_tokenizer import tokenizer_metadata


@dataclass
class TensorJob:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    ggml_type: GGMLType
    load: Callable[[], np.ndarray]  # float32 values, already permuted for llama.cpp
    note: str = ""  # e.g. why a fallback type was chosen


@dataclass
class Plan:
    metadata: list[tuple[str, object, ValueType, ValueType | None]]
    jobs: list[TensorJob]
    model_name: str
    type_name: str
    warnings: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None

    @property
    def n_params(self) -> int:
        return sum(math.prod(j.shape) for j in self.jobs)


def size_label(n_params: int) -> str:
    """llama.cpp's general.size_label: 260K, 5.0M, 7B (at least two significant digits)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n_params > scale:
            break
    else:
        scale, suffix = 1e3, "K"
    scaled = n_params / scale
    decimals = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{suffix}"


def choose_type(name: str, shape: tuple[int, ...], target: GGMLType) -> tuple[GGMLType, str]:
    """1-D tensors and norms stay F32 as in llama.cpp; rows that don't fill whole blocks fall back to F16."""
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLType.F32, ""
    block = TYPE_INFO[target].block_size
    if shape[-1] % block:
        return GGMLType.F16, f"row of {shape[-1]} is not a multiple of {block}: F16"
    return target, ""


def _hparam(config: dict, *keys: str, default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    rope = config.get("rope_parameters") or {}
    for k in keys:
        if rope.get(k) is not None:
            return rope[k]
    if default is None:
        raise QtoolError(f"config.json has none of {', '.join(keys)}")
    return default


def _rope_scaling(config: dict) -> dict:
    return config.get("rope_scaling") or config.get("rope_parameters") or {}


def _llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    """Per-frequency scaling factors llama.cpp reads from the rope_freqs tensor (Llama 3.1 style scaling)."""
    rs = _rope_scaling(config)
    base = float(_hparam(config, "rope_theta", default=10000.0))
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _arch_metadata(arch: str, config: dict, n_vocab: int, file_type: int) -> list:
    n_head = int(_hparam(config, "num_attention_heads"))
    hidden = int(_hparam(config, "hidden_size"))
    head_dim = config.get("head_dim")
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    md = [
        (f"{arch}.block_count", int(_hparam(config, "num_hidden_layers")), u32, None),
        (f"{arch}.context_length", int(_hparam(config, "max_position_embeddings")), u32, None),
        (f"{arch}.embedding_length", hidden, u32, None),
        (f"{arch}.feed_forward_length", int(_hparam(config, "intermediate_size")), u32, None),
        (f"{arch}.attention.head_count", n_head, u32, None),
        (f"{arch}.attention.head_count_kv", int(_hparam(config, "num_key_value_heads", default=n_head)), u32, None),
        (f"{arch}.rope.freq_base", float(_hparam(config, "rope_theta", default=10000.0)), f32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(_hparam(config, "rms_norm_eps")), f32, None),
    ]
    if head_dim is not None:
        md += [(f"{arch}.attention.key_length", int(head_dim), u32, None),
               (f"{arch}.attention.value_length", int(head_dim), u32, None)]
    md.append(("general.file_type", file_type, u32, None))
    md.append((f"{arch}.vocab_size", n_vocab, u32, None))
    md.append((f"{arch}.rope.dimension_count", int(head_dim or hidden // n_head), u32, None))
    return md


def plan(src: str, type_name: str) -> Plan:
    """Everything about the output file except the tensor data."""
    key = type_name.upper()
    if key not in FILE_TYPES:
        raise QtoolError(f"unknown --type {type_name}; choose one of {', '.join(FILE_TYPES)}")
    target = GGMLType[key] if key in GGMLType.__members__ else None
    if target is None:
        raise QtoolError(f"--type {key} is not available yet")
    folder = resolve_source(src)
    ckpt = Checkpoint(folder)
    try:
        return _plan_checkpoint(ckpt, key, target)
    except BaseException:
        ckpt.close()
        raise


def _plan_checkpoint(ckpt: Checkpoint, key: str, target: GGMLType) -> Plan:
    config = ckpt.config
    _, arch = archs.arch_for(config)
    n_head = int(_hparam(config, "num_attention_heads"))
    n_head_kv = int(_hparam(config, "num_key_value_heads", default=n_head))
    tok = tokenizer_metadata(ckpt.folder, config)
    n_vocab = len(next(v for k, v, *_ in tok.entries if k == "tokenizer.ggml.tokens"))

    jobs: list[TensorJob] = []
    head_dim = config.get("head_dim") or int(_hparam(config, "hidden_size")) // n_head
    if (_rope_scaling(config).get("rope_type") or "").lower() == "llama3":
        factors = _llama3_rope_factors(config, head_dim)
        jobs.append(TensorJob("rope_freqs.weight", factors.shape, GGMLType.F32, lambda f=factors: f))

    for hf_name in ckpt.names:
        name = archs.gguf_tensor_name(hf_name)
        if name is None:
            continue
        shape = ckpt.shape(hf_name)
        ggml_type, note = choose_type(name, shape, target)
        heads = n_head if ".attn_q." in name else n_head_kv if ".attn_k." in name else 0
        permute = arch.permute_qk and heads > 0

        def load(hf_name=hf_name, heads=heads, permute=permute):
            x = ckpt.load(hf_name)
            return np.ascontiguousarray(archs.permute_qk(x, heads)) if permute else x

        jobs.append(TensorJob(name, shape, ggml_type, load, note))
    if not jobs:
        raise QtoolError(f"{ckpt.folder}: no tensors to convert")

    model_name = ckpt.folder.name if ckpt.folder.name not in ("", ".") else "model"
    if "snapshots" in ckpt.folder.parts:  # hub cache: models--org--name/snapshots/<hash>
        model_name = next((p.split("--")[-1] for p in ckpt.folder.parts if p.startswith("models--")), model_name)
    n_params = sum(math.prod(j.shape) for j in jobs)
    md = [("general.architecture", arch.gguf_name, ValueType.STRING, None),
          ("general.type", "model", ValueType.STRING, None),
          ("general.name", model_name, ValueType.STRING, None),
          ("general.size_label", size_label(n_params), ValueType.STRING, None)]
    md += _arch_metadata(arch.gguf_name, config, n_vocab, int(FILE_TYPES[key]))
    md.append(("general.quantization_version", GGML_QUANTIZATION_VERSION, ValueType.UINT32, None))
    md += tok.entries
    return Plan(md, jobs, model_name, key, tok.warnings, ckpt.close)


def encode(x: np.ndarray, ggml_type: GGMLType, name: str) -> np.ndarray:
    """float32 values → the bytes of ggml_type."""
    if ggml_type == GGMLType.F32:
        return x
    if not np.isfinite(x).all():
        raise QtoolError(f"tensor {name} contains NaN or Inf values; refusing to write a broken file")
    if ggml_type == GGMLType.F16:
        return x.astype(np.float16)
    if ggml_type == GGMLType.BF16:
        bits = x.view(np.uint32)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    from qtool import kernels
    return kernels.quantize(ggml_type, x.reshape(-1, x.shape[-1]))


def write(plan_: Plan, out: Path, on_tensor: Callable[[TensorJob, int], None] = lambda job, n: None) -> int:
    """Stream the planned file to `out`; returns its size in bytes."""
    writer = GGUFWriter(out)
    for key, value, vtype, elem in plan_.metadata:
        writer.add(key, value, vtype, elem)
    for job in plan_.jobs:
        writer.add_tensor(job.name, job.shape, job.ggml_type)
    with writer:
        writer.open()
        for job in plan_.jobs:
            data = encode(job.load(), job.ggml_type, job.name)
            writer.write_tensor(job.name, data)
            on_tensor(job, data.nbytes)
            del data
    return out.stat().st_size
