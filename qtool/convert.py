"""Conversion pipeline: checkpoint → tensors → quantize → writer, one tensor at a time.

`plan()` reads only headers and configs and decides every output tensor's name, shape and type, so the GGUF
header can be written first; `write()` then loads, transforms and encodes each tensor and streams it out.
"""
from __future__ import annotations

import math
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qtool import archs, recipes
from qtool.errors import QtoolError
from qtool.formats.checkpoint import PICKLE_SUFFIXES, Checkpoint, resolve_source
from qtool.formats.constants import (FILE_TYPES, FLOAT_TYPES, GGML_QUANTIZATION_VERSION, GGMLType,
                                    Keys, ModelTensor, ValueType, arch_key, tensor_name)
from qtool.formats.gguf_writer import GGUFWriter
from qtool.formats.hf_metadata import general_metadata, model_card_warning
from qtool.formats.hf_tokenizer import tokenizer_metadata
from qtool.recipes import RecipeOptions


SLAB_BYTES = 16 << 20  # float32 rows widened at a time before quantizing: stays in the last-level cache's reach


@dataclass
class Stored:
    """A tensor's values as stored in the source, not yet converted: the encoder widens them slab by slab in
    parallel kernels, so no float32 copy of a whole tensor is ever made."""
    values: np.ndarray  # float32, float16, or uint16 holding BF16 bits
    dtype: str  # "F32", "F16" or "BF16"
    rows: np.ndarray | None = None  # output row r is stored row rows[r] (the Q/K permutation)
    release: Callable[[], None] = lambda: None  # drop the source pages once encoded


@dataclass
class TensorJob:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    ggml_type: GGMLType
    load: Callable[[], Stored]
    note: str = ""  # e.g. why a fallback type was chosen
    source_type: GGMLType | None = None  # the stored type, when the source is a GGUF file
    quant_weights: np.ndarray | None = None  # importance per column (an imatrix entry; (n_expert, cols) for experts)
    encoded: np.ndarray | None = None  # the tensor's bytes, quantized ahead by a method that needs the whole layer


@dataclass
class Plan:
    metadata: list[tuple[str, object, ValueType, ValueType | None]]
    jobs: list[TensorJob]
    model_name: str
    type_name: str
    warnings: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None
    source: object = None  # the open GGUF file when requantizing: tensors kept as they are are copied raw

    @property
    def n_params(self) -> int:
        return sum(math.prod(j.shape) for j in self.jobs)


def _rope_scaling(config: dict) -> dict:
    return config.get("rope_scaling") or config.get("rope_parameters") or {}


def _llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    """Per-frequency scaling factors llama.cpp reads from the rope_freqs tensor (Llama 3.1 style scaling)."""
    rs = _rope_scaling(config)
    base = archs.HP_ROPE_BASE.number(config)
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


def _ternary(values: np.ndarray, dtype: str) -> np.ndarray:
    """llama.cpp's BitnetModel.weight_quant: round(w / s) clamped to [-1, 1], times s = mean|w| (at least 1e-5),
    in float32, back in the stored dtype. A checkpoint already in that form (±s, no zeros) is unchanged."""
    w = values.astype(np.float32) if dtype != "BF16" else (values.astype(np.uint32) << 16).view(np.float32)
    scale = np.float32(max(np.abs(w).astype(np.float64).mean(), 1e-5))
    iscale = np.float32(1) / scale
    q = (np.clip(np.round(w * iscale), -1, 1) / iscale).astype(np.float32)
    if dtype == "F32":
        return q
    if dtype == "F16":
        return q.astype(np.float16)
    bits = q.view(np.uint32)  # BF16: round to nearest even, as torch's .type(bfloat16)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _norm_shifted(values: np.ndarray, dtype: str) -> np.ndarray:
    """Gemma's norm weights as its converter writes them: 1 + w, added in the stored dtype as torch does."""
    w = values.astype(np.float32) if dtype != "BF16" else (values.astype(np.uint32) << 16).view(np.float32)
    q = w + np.float32(1)
    if dtype != "BF16":
        return q.astype(values.dtype)
    bits = q.view(np.uint32)  # round to nearest even
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def plan(src: str, type_name: str, opts: RecipeOptions = RecipeOptions(), allow_requantize: bool = False) -> Plan:
    """Everything about the output file except the tensor data."""
    key = type_name.upper()
    recipes.file_type(key)  # validates the name
    path = Path(src)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise QtoolError(f"{src}: a pickle checkpoint; qtool refuses to unpickle it because loading a pickle "
                             "can run arbitrary code. Use the model's safetensors files instead")
        return _plan_gguf(path, key, opts, allow_requantize)
    ckpt = Checkpoint(resolve_source(src))
    try:
        return _plan_checkpoint(ckpt, key, opts)
    except BaseException:
        ckpt.close()
        raise


def _assign_types(jobs: list[TensorJob], key: str, facts: recipes.ModelFacts, opts: RecipeOptions) -> None:
    """llama-quantize's per-tensor choice. Refused before anything is written: a type whose codec has not
    landed (a kernels.traits row without codec), and what llama-quantize refuses without an importance matrix."""
    from qtool import kernels
    # Q8_K is the runner's activation type, never a tensor type in files
    writable = (set(kernels.quantizable_types()) - {GGMLType.Q8_K}) | {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
    plans = recipes.plan_types(key, [(j.name, j.shape) for j in jobs], facts, opts)
    missing = next((tp.ggml_type for tp in plans if tp.quantizable and tp.ggml_type not in writable), None)
    if missing is not None:
        raise recipes.Refused(f"{key}: no quantizer for {missing.name} yet")
    recipes.check_imatrix(key, plans, opts)
    for job, tp in zip(jobs, plans):
        if tp.quantizable:  # others keep their planned type (F32 from checkpoints, the source type from GGUF)
            job.ggml_type, job.note = tp.ggml_type, tp.note


def _plan_checkpoint(ckpt: Checkpoint, key: str, opts: RecipeOptions) -> Plan:
    config = ckpt.config
    _, arch = archs.arch_for(config)
    n_head = archs.HP_HEADS.number(config)
    n_head_kv = archs.HP_HEADS_KV.number(config)
    tok = tokenizer_metadata(ckpt.folder, config, space_prefix=arch.space_prefix, vocab=arch.vocab)
    n_vocab = len(next(v for k, v, *_ in tok.entries if k == Keys.Tokenizer.LIST))

    jobs: list[TensorJob] = []
    head_dim = archs.HP_HEAD_DIM.number(config)
    # Llama 3.1 style scaling becomes a tensor (llama.cpp's LlamaModel.generate_extra_tensors)
    if ModelTensor.ROPE_FREQS in arch.tensors and (_rope_scaling(config).get("rope_type") or "").lower() == "llama3":
        factors = _llama3_rope_factors(config, head_dim)
        jobs.append(TensorJob(tensor_name(ModelTensor.ROPE_FREQS), factors.shape, GGMLType.F32,
                              lambda f=factors: Stored(f, "F32")))

    n_expert = archs.n_experts(config)
    experts: dict[int, dict[tuple[ModelTensor, int], str]] = {}  # layer → (kind, expert) → checkpoint name
    for hf_name in ckpt.names:
        found = archs.hf_tensor_kind(hf_name, arch)
        if found is None:
            continue
        name = tensor_name(*found)
        kind, layer, suffix = found
        xid = archs.hf_expert(hf_name, arch)
        if xid is not None:
            # as llama.cpp's converter: a layer's experts are stacked when its last one is read, in its order
            got = experts.setdefault(layer, {})
            got[kind, xid] = hf_name
            if len(got) == n_expert * len(archs.EXPERT_KINDS):
                for k in arch.expert_order:
                    parts = [got[k, x] for x in range(n_expert)]
                    shape = (n_expert, *ckpt.shape(parts[0]))
                    jobs.append(TensorJob(tensor_name(k, layer), shape, GGMLType.F32,
                                          partial(_stacked, ckpt, parts)))
            continue
        heads = {ModelTensor.ATTN_Q: n_head, ModelTensor.ATTN_K: n_head_kv}.get(kind, 0)
        permute = arch.permute_qk and heads > 0 and suffix == "weight"
        ternary = kind in arch.ternary and suffix == "weight"
        shift = kind in arch.norm_shift and suffix == "weight"

        def load(hf_name=hf_name, heads=heads, permute=permute, ternary=ternary, shift=shift):
            values, dtype = ckpt.stored(hf_name)
            rows = archs.permute_qk(np.arange(values.shape[0]), heads) if permute else None
            if ternary:
                values = _ternary(values, dtype)
            if shift:
                values = _norm_shifted(values, dtype)
            return Stored(values, dtype, rows, lambda: ckpt.release(hf_name))

        jobs.append(TensorJob(name, ckpt.shape(hf_name), GGMLType.F32, load))
    if not jobs:
        raise QtoolError(f"{ckpt.folder}: no tensors to convert")
    n_layer = archs.HP_LAYERS.number(config)
    _assign_types(jobs, key, recipes.ModelFacts(arch.gguf_name, n_layer, n_head, n_head_kv, n_expert), opts)

    model_name = ckpt.folder.name if ckpt.folder.name not in ("", ".") else "model"
    if "snapshots" in ckpt.folder.parts:  # hub cache: models--org--name/snapshots/<hash>
        model_name = next((p.split("--")[-1] for p in ckpt.folder.parts if p.startswith("models--")), model_name)
    n_params = sum(math.prod(j.shape) for j in jobs)
    G = Keys.General
    md = [(G.ARCHITECTURE, arch.gguf_name, ValueType.STRING, None),
          (G.TYPE, "model", ValueType.STRING, None)]
    md += _expert_size_label(general_metadata(ckpt.folder, config, model_name, n_params), jobs, n_params)
    md += archs.hparam_metadata(arch, config, {
        G.FILE_TYPE: int(FILE_TYPES[key]), arch_key(Keys.LLM.VOCAB_SIZE, arch.gguf_name): n_vocab})
    md.append((G.QUANTIZATION_VERSION, GGML_QUANTIZATION_VERSION, ValueType.UINT32, None))
    md += tok.entries
    if arch.add_space_prefix is not None:  # Gemma's converter writes a constant one after the vocabulary
        md.append((Keys.Tokenizer.ADD_PREFIX, arch.add_space_prefix, ValueType.BOOL, None))
    card = model_card_warning(ckpt.folder)
    return Plan(md, jobs, model_name, key, tok.warnings + ([card] if card else []), ckpt.close)


def _stacked(ckpt: Checkpoint, parts: list[str]) -> Stored:
    """One layer's experts of one kind as a (n_expert, rows, cols) tensor: a copy of this tensor only (the
    experts' other kinds are read when their own tensor is encoded). Mixed dtypes are widened to float32."""
    stored = [ckpt.stored(p) for p in parts]
    dtypes = {d for _, d in stored}
    if len(dtypes) == 1:
        values, dtype = np.stack([v for v, _ in stored]), dtypes.pop()
    else:
        from qtool.kernels import convert as cast
        values, dtype = np.stack([cast.convert(v, d, "F32")[0] for v, d in stored]), "F32"
    del stored

    def release() -> None:
        for p in parts:
            ckpt.release(p)
    return Stored(values, dtype, release=release)


def _expert_size_label(md: list, jobs: list[TensorJob], n_params: int) -> list:
    """gguf-py's size label of a mixture of experts, "{n_expert}x{params with one expert}" (as
    GGUFWriter.get_total_parameter_count counts them), in place of the total general_metadata computed."""
    exps = [j for j in jobs if "_exps." in j.name and len(j.shape) >= 3]
    if not exps:
        return md
    from qtool.formats.hf_metadata import size_label
    n_expert = sum(j.shape[0] for j in exps) // len(exps)
    one_expert = n_params - sum(math.prod(j.shape) for j in exps) + sum(math.prod(j.shape) // j.shape[0] for j in exps)
    computed, label = size_label(n_params), f"{n_expert}x{size_label(one_expert)}"
    return [(k, label if k == Keys.General.SIZE_LABEL and v == computed else v, *rest) for k, v, *rest in md]


def _plan_gguf(path: Path, key: str, opts: RecipeOptions, allow_requantize: bool) -> Plan:
    """Requantize a GGUF file: metadata copied (file type updated), tensors in llama-quantize's order."""
    from qtool.formats.gguf_reader import GGUFFile
    g = GGUFFile(path)
    try:
        facts = recipes.ModelFacts.from_gguf_kv(g.metadata)
        warnings = []
        jobs = []
        for name in recipes.llama_order(list(g.tensors)):
            t = g.tensors[name]
            if t.n_elements == 0:  # valid GGUF (ggml reads a 0 dim), but no model has one: refuse, not write it
                raise QtoolError(f"{path}: tensor {name} is empty (shape {list(t.shape)}); a model cannot use it")
            jobs.append(TensorJob(name, t.shape, t.ggml_type, lambda t=t: _dequantize(g, t), source_type=t.ggml_type))
        _assign_types(jobs, key, facts, opts)
        requant = [j.name for j in jobs if j.source_type not in FLOAT_TYPES and j.ggml_type != j.source_type]
        if requant and not allow_requantize:
            raise QtoolError(f"{path}: tensor {requant[0]} is already {g.tensors[requant[0]].ggml_type.name}; "
                             "requantizing loses quality, pass --allow-requantize to do it anyway")
        if requant:
            warnings.append(f"requantizing {len(requant)} already-quantized tensors; quality will suffer")
        # as llama-quantize does: copy the metadata, then append the quantization version and file type
        G = Keys.General
        md = [(k, f.writer_value(), f.type, f.elem_type) for k, f in g.fields.items()
              if k not in (G.FILE_TYPE, G.QUANTIZATION_VERSION, G.ALIGNMENT)]
        md.append((G.QUANTIZATION_VERSION, GGML_QUANTIZATION_VERSION, ValueType.UINT32, None))
        md.append((G.FILE_TYPE, int(FILE_TYPES[key]), ValueType.UINT32, None))
        name = str(g.get(G.NAME) or path.stem.split(".")[0])
        return Plan(md, jobs, name, key, warnings, g.close, source=g)
    except BaseException:
        g.close()
        raise


def _dequantize(g, t) -> Stored:
    release = lambda: g.release(t.name)  # noqa: E731
    if t.ggml_type in FLOAT_TYPES:
        return Stored(g.array(t.name), t.ggml_type.name, release=release)
    from qtool import kernels
    return Stored(kernels.dequantize(t.ggml_type, g.raw(t.name), t.shape[-1]).reshape(t.shape), "F32",
                  release=release)


class Scratch:
    """Buffers reused from tensor to tensor: fresh ones for each tensor would be page-faulted in again, which
    costs as much as the conversion itself."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, key: str, nbytes: int) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            self._buffers.pop(key, None)
            buf = self._buffers[key] = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes]


def encode(s: Stored, ggml_type: GGMLType, name: str, scratch: Scratch | None = None,
           quant_weights: np.ndarray | None = None) -> np.ndarray:
    """Stored values → the bytes of ggml_type, checking every value is finite on the way. The result may live in
    `scratch` and is valid until the next call with it."""
    from qtool import kernels
    from qtool.kernels import convert as cast
    scratch = scratch or Scratch()
    shape = s.values.shape
    if ggml_type in FLOAT_TYPES:
        dtype = cast.TARGET_DTYPES[ggml_type.name]
        out = scratch.get("out", math.prod(shape) * np.dtype(dtype).itemsize).view(dtype).reshape(shape)
        quantize = slab = None
    else:
        n_rows = math.prod(shape[:-1])
        out = scratch.get("out", n_rows * kernels.row_bytes(ggml_type, shape[-1])).reshape(n_rows, -1)
        quantize = partial(kernels.quantize, ggml_type, quant_weights=quant_weights)
        slab = scratch.get("slab", SLAB_BYTES).view(np.float32)
    if quant_weights is None or quant_weights.ndim == 1:
        data, finite = cast.encode_stored(s.values, s.dtype, ggml_type.name, s.rows, quantize, out, slab, SLAB_BYTES)
    else:  # stacked experts: each expert's rows with its row of the imatrix entry, as llama-quant.cpp
        rows = s.rows if s.rows is not None else np.arange(n_rows, dtype=np.int64)
        per, finite, data = n_rows // len(quant_weights), True, out
        for e, w in enumerate(quant_weights):
            part = slice(e * per, (e + 1) * per)
            _, ok = cast.encode_stored(s.values, s.dtype, ggml_type.name, rows[part],
                                       partial(kernels.quantize, ggml_type, quant_weights=w), out[part], slab,
                                       SLAB_BYTES)
            finite &= ok
    if not finite:
        raise QtoolError(f"tensor {name} contains NaN or Inf values; refusing to write a broken file")
    return data


def write(plan_: Plan, out: Path, on_tensor: Callable[[TensorJob, int], None] = lambda job, n: None) -> int:
    """Stream the planned file to `out`; returns its size in bytes.

    A tensor is written by a second thread while the next one is encoded (the write is a system call that
    releases the GIL), so two sets of scratch buffers alternate."""
    from concurrent.futures import ThreadPoolExecutor

    writer = GGUFWriter(out)
    for key, value, vtype, elem in plan_.metadata:
        writer.add(key, value, vtype, elem)
    for job in plan_.jobs:
        writer.add_tensor(job.name, job.shape, job.ggml_type)
    scratch = (Scratch(), Scratch())

    def put(name: str, data: np.ndarray, release: Callable[[], None]) -> None:
        writer.write_tensor(name, data)
        release()

    with writer:
        writer.open()
        pending = None
        with ThreadPoolExecutor(1) as pool:
            for i, job in enumerate(plan_.jobs):
                if job.source_type == job.ggml_type:  # unchanged: copy the stored bytes
                    data = plan_.source.raw(job.name)
                    release = partial(plan_.source.release, job.name)
                elif job.encoded is not None:  # quantized ahead (qtool/gptq.py)
                    data, release = job.encoded, (lambda: None)
                else:
                    stored = job.load()
                    data = encode(stored, job.ggml_type, job.name, scratch[i % 2], job.quant_weights)
                    release = stored.release
                    del stored
                if pending is not None:
                    pending.result()  # also frees the other scratch set for the next tensor
                pending = pool.submit(put, job.name, data, release)
                on_tensor(job, data.nbytes)
                del data
            if pending is not None:
                pending.result()
    return out.stat().st_size
