"""`qtool inspect`: what a GGUF file holds (metadata, per-layer and per-tensor sizes), or for a checkpoint
folder, its parameters and the file size each --type would give."""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from qtool.archs import EXPERT_KINDS
from qtool.formats.constants import FILE_TYPES, IMATRIX_GENERAL_TYPE, TENSOR_NAMES, FileType, Keys, arch_key
from qtool.formats.gguf_reader import GGUFFile
from qtool.recipes import Refused

_LAYER = re.compile(r"^blk\.(\d+)\.")
_EXPERTS = re.compile("|".join(re.escape(TENSOR_NAMES[k] + ".").replace(re.escape("{bid}"), r"\d+")
                               for k in EXPERT_KINDS))  # blk.N.ffn_{gate,up,down}_exps.*
SUMMARY_KEYS = (Keys.General.ARCHITECTURE, Keys.General.NAME, Keys.General.FILE_TYPE, Keys.General.ALIGNMENT)


def layer_of(name: str) -> str:
    m = _LAYER.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def _layer_sort_key(layer: str) -> tuple:
    return (0, int(layer)) if layer.isdigit() else (1 if layer == "token_embd" else 2, layer)


def tensor_rows(tensors: list[dict]) -> list[dict]:
    """Group tensors by layer: count, types, parameters, bytes, bits/weight."""
    groups: dict[str, list[dict]] = OrderedDict()
    for t in tensors:
        groups.setdefault(layer_of(t["name"]), []).append(t)
    rows = []
    for layer in sorted(groups, key=_layer_sort_key):
        ts = groups[layer]
        params = sum(t["n_elements"] for t in ts)
        nbytes = sum(t["nbytes"] for t in ts)
        types = sorted({t["type"] for t in ts})
        rows.append({"layer": layer, "tensors": len(ts), "types": types, "parameters": params, "bytes": nbytes,
                     "bits_per_weight": 8 * nbytes / params if params else 0.0,
                     "experts": max((t["shape"][0] for t in ts if is_expert(t["name"])), default=0)})
    return rows


def is_expert(name: str) -> bool:
    """A layer's experts stacked into one tensor, expert first (numpy order)."""
    return _EXPERTS.match(name) is not None


def per_token(tensors: list[dict], n_used: int) -> tuple[int, int]:
    """(parameters, bytes) one token's forward pass multiplies by: every tensor whole but the expert tensors, of
    which only the n_used experts the router picks (each expert's rows are whole blocks, so its bytes are exact)."""
    params = nbytes = 0
    for t in tensors:
        share = (n_used, t["shape"][0]) if is_expert(t["name"]) and n_used else (1, 1)
        params += t["n_elements"] // share[1] * share[0]
        nbytes += t["nbytes"] // share[1] * share[0]
    return params, nbytes


def _short(value: Any, limit: int = 8) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list) and len(value) > limit:
        return [_short(v) for v in value[:limit]] + [f"... {len(value) - limit} more"]
    if isinstance(value, list):
        return [_short(v) for v in value]
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def gguf_report(path: Path, full_meta: bool = False) -> dict:
    with GGUFFile(path) as g:
        arch = g.get(Keys.General.ARCHITECTURE, "?")
        tensors = [{"name": t.name, "shape": list(t.shape), "type": t.ggml_type.name, "n_elements": t.n_elements,
                    "nbytes": t.nbytes, "offset": t.offset, "bits_per_weight": 8 * t.nbytes / max(t.n_elements, 1)}
                   for t in g.tensors.values()]
        ft = g.get(Keys.General.FILE_TYPE)
        try:
            ft_name = FileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "") if ft is not None else None
        except ValueError:
            ft_name = str(ft)
        params = sum(t["n_elements"] for t in tensors)
        data_bytes = sum(t["nbytes"] for t in tensors)
        tokens = g.get(Keys.Tokenizer.LIST)
        n_expert = g.get(arch_key(Keys.LLM.EXPERT_COUNT, arch), 0)
        n_used = g.get(arch_key(Keys.LLM.EXPERT_USED_COUNT, arch), 0)
        active_params, token_bytes = per_token(tensors, n_used if n_expert else 0)
        report = {
            "file": str(path), "file_bytes": g.size, "gguf_version": g.version, "architecture": arch,
            "name": g.get(Keys.General.NAME), "file_type": ft_name,
            "context_length": g.get(arch_key(Keys.LLM.CONTEXT_LENGTH, arch)),
            "embedding_length": g.get(arch_key(Keys.LLM.EMBEDDING_LENGTH, arch)),
            "block_count": g.get(arch_key(Keys.LLM.BLOCK_COUNT, arch)),
            "vocab_size": g.get(arch_key(Keys.LLM.VOCAB_SIZE, arch), len(tokens) if tokens is not None else None),
            "alignment": g.alignment, "tensor_count": len(tensors), "parameters": params,
            "tensor_bytes": data_bytes, "bits_per_weight": 8 * data_bytes / params if params else 0.0,
            "expert_count": n_expert, "expert_used_count": n_used,
            "active_parameters": active_params, "bytes_per_token": token_bytes,
            "types": {k: sum(1 for t in tensors if t["type"] == k) for k in sorted({t["type"] for t in tensors})},
            "layers": tensor_rows(tensors), "tensors": tensors,
            "metadata": {k: {"type": f.type.name if f.elem_type is None else f"{f.type.name}[{f.elem_type.name}]",
                             "value": _short(f.value, 10**9 if full_meta else 8)} for k, f in g.fields.items()},
        }
    return report


def checkpoint_report(src: str) -> dict:
    """Parameters per layer, and the exact size each --type would give (planned without converting)."""
    from qtool import convert
    from qtool.formats.gguf_writer import GGUFWriter

    rows = []
    sizes = []
    base = None
    from qtool.recipes import RecipeOptions
    for type_name in FILE_TYPES:
        needs_imatrix = False
        try:
            p = convert.plan(src, type_name)
        except Refused:  # needs an importance matrix (sized as with one), or has no quantizer yet (left out)
            try:
                p = convert.plan(src, type_name, RecipeOptions(has_imatrix=True))
                needs_imatrix = True
            except Refused:
                continue
        try:
            w = GGUFWriter("/dev/null")
            for key, value, vtype, elem in p.metadata:
                w.add(key, value, vtype, elem)
            for j in p.jobs:
                w.add_tensor(j.name, j.shape, j.ggml_type)
            if base is None:
                base = p
                rows = tensor_rows([{"name": t.name, "shape": list(t.shape), "type": t.ggml_type.name,
                                     "n_elements": math.prod(t.shape), "nbytes": t.nbytes} for t in w.tensors])
            nbytes = w.file_size
            fallbacks = sum(1 for j in p.jobs if j.note)
            sizes.append({"type": type_name, "file_bytes": nbytes, "bits_per_weight": 8 * nbytes / p.n_params,
                          "fallbacks": fallbacks, "needs_imatrix": needs_imatrix})
        finally:
            p.close()
    for r in rows:  # parameters only: bytes depend on the type
        r.pop("types"), r.pop("bytes"), r.pop("bits_per_weight")
    return {"source": src, "model": base.model_name if base else None,
            "parameters": base.n_params if base else 0, "layers": rows, "sizes": sizes}


def is_imatrix(path: Path) -> bool:
    """An importance-matrix file: GGUF with general.type = imatrix, or llama.cpp's legacy .dat."""
    from qtool.formats.constants import GGUF_MAGIC
    with open(path, "rb") as fh:
        head = fh.read(4)
    if len(head) == 4 and int.from_bytes(head, "little") == GGUF_MAGIC:
        with GGUFFile(path) as g:
            return g.get(Keys.General.TYPE) == IMATRIX_GENERAL_TYPE
    return path.suffix == ".dat"


def imatrix_report(path: Path) -> dict:
    """Entries, chunks, datasets and per tensor the statistics of its importance E[x²] = in_sum2 / count, as
    `llama-imatrix --show-statistics` reports them (sum, min, max, mean, σ, normalized entropy, share of
    values more than one σ from the mean, cosine similarity to the same tensor one layer up)."""
    from qtool.formats.imatrix import read_imatrix

    data = read_imatrix(path)
    imp = {name: data.importance(name).astype(np.float64) for name in data.entries}
    rows = []
    for name, e in data.entries.items():
        v = imp[name]
        live = np.repeat(e.counts > 0, e.n_cols)  # experts calibration never reached are left out, as llama.cpp
        v = v[live]
        n = int(v.size)
        mean = float(v.mean()) if n else 0.0
        std = float(v.std(ddof=1)) if n > 1 else 0.0
        p = np.clip(v, 0, None)
        total = p.sum()
        p = p[p > 0] / total if total > 0 else p[:0]
        entropy = float(-(p * np.log2(p)).sum())
        m = _LAYER.match(name)
        prev = f"blk.{int(m.group(1)) - 1}.{name[m.end():]}" if m and int(m.group(1)) > 0 else None
        cos = None
        if prev in imp and imp[prev].shape == imp[name].shape:
            a, b = imp[name], imp[prev]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos = float(np.clip(a @ b / (na * nb), -1, 1)) if na > 0 and nb > 0 else None
        rows.append({"name": name, "layer": layer_of(name), "experts": e.n_mat, "columns": e.n_cols,
                     "count": float(e.counts.max()) if e.counts.size else 0.0,
                     "sum": float(v.sum()), "min": float(v.min()) if n else 0.0, "max": float(v.max()) if n else 0.0,
                     "mean": mean, "std": std, "elements": n,
                     "entropy_pct": 100 * entropy / math.log2(n) if n > 1 else 0.0,
                     "zd_pct": 100 * float((np.abs(v - mean) > std).mean()) if n and std > 0 else 0.0,
                     "cos_prev": cos})
    rows.sort(key=lambda row: (_layer_sort_key(row["layer"]), row["name"]))  # blk.2 before blk.10
    return {"file": str(path), "format": "dat" if data.legacy else "gguf", "entries": len(data.entries),
            "chunk_count": data.chunk_count, "chunk_size": data.chunk_size, "datasets": list(data.datasets),
            "tensors": rows}
