"""An importance matrix applied to a conversion, as llama-quantize applies `--imatrix FILE`.

Which tensor gets which weights: every tensor that is quantized looks up its GGUF name in the file (after
`--exclude-weights` / `--include-weights`, substring matches, as llama-quantize filters the entries); the
weights are the file's in_sum2 / counts (formats/imatrix.py), one vector of the row length per expert, and each
expert's rows of a stacked `_exps` tensor are quantized with that expert's vector, as llama-quant.cpp does. A tensor
with no entry is quantized without weights and named in a warning (llama.cpp only logs it); an entry of the
wrong size is an error, except for token_embd, which llama.cpp quantizes without weights then. The file gets the
`quantize.imatrix.*` keys llama-quantize writes, after everything else.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError, UsageError
from qtool.formats.constants import FLOAT_TYPES, Keys, ValueType
from qtool.formats.imatrix import ImatrixData

# llama-quantize passes strings as llama_model_kv_override values: a char[128], so at most 127 bytes survive
KV_STRING_MAX = 127


def filter_entries(data: ImatrixData, include: list[str], exclude: list[str]) -> dict[str, np.ndarray]:
    """The importance vector of every entry left after --exclude-weights / --include-weights."""
    if include and exclude:
        raise UsageError("--include-weights and --exclude-weights cannot be used together")
    names = [n for n in data.entries if not any(x in n for x in exclude)]
    if include:
        names = [n for n in names if any(x in n for x in include)]
    return {n: data.importance(n) for n in names}


def _kv_string(s: str) -> str:
    return s.encode()[:KV_STRING_MAX].decode(errors="ignore")


def apply(plan, data: ImatrixData, file_arg: str, include: list[str] = (), exclude: list[str] = ()) -> None:
    """Give each quantized job of `plan` its importance weights and append the quantize.imatrix.* metadata."""
    weights = filter_entries(data, list(include), list(exclude))
    missing = []
    for job in plan.jobs:
        if job.ggml_type in FLOAT_TYPES or job.ggml_type == job.source_type:
            continue  # not quantized here: llama.cpp looks weights up only for tensors it quantizes
        w = weights.get(job.name)
        if w is None:
            _refuse_unweighted(job, file_arg)
            missing.append(job.name)
            continue
        n_cols = job.shape[-1]
        n_mat = math.prod(job.shape[:-2]) if len(job.shape) > 2 else 1
        if w.size != n_cols * n_mat:
            if job.name.startswith("token_embd."):
                _refuse_unweighted(job, file_arg)
                continue
            raise QtoolError(f"{file_arg}: importance for {job.name} has {w.size} values, the tensor needs "
                             f"{n_cols * n_mat}")
        # an expert tensor's entry is one row per expert (llama-quant.cpp: expert row // rows per expert)
        job.quant_weights = np.ascontiguousarray(w.reshape(n_mat, n_cols) if n_mat > 1 else w, dtype=np.float32)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        plan.warnings.append(f"the importance matrix has no entry for {len(missing)} tensor(s), quantized without "
                             f"it: {shown}")
    Q = Keys.Quantize
    md = [(Q.IMATRIX_FILE, _kv_string(str(file_arg)), ValueType.STRING, None)]
    if data.datasets:
        md.append((Q.IMATRIX_DATASET, _kv_string(data.datasets[0]), ValueType.STRING, None))
    md.append((Q.IMATRIX_N_ENTRIES, len(weights), ValueType.UINT32, None))
    if data.chunk_count > 0:
        md.append((Q.IMATRIX_N_CHUNKS, int(data.chunk_count), ValueType.UINT32, None))
    plan.metadata.extend(md)


def _refuse_unweighted(job, file_arg: str) -> None:
    """llama.cpp stops when a tensor of a very-low-bit type gets no weights (or, for the types ggml asserts on,
    aborts): so does qtool, before writing."""
    from qtool.recipes import GGML_NEEDS_IMATRIX, requires_imatrix
    if requires_imatrix(job.name, job.ggml_type) or job.ggml_type in GGML_NEEDS_IMATRIX:
        raise QtoolError(f"{file_arg}: no importance for {job.name}, which {job.ggml_type.name} needs")


def read(path: str) -> ImatrixData:
    from qtool.formats.imatrix import read_imatrix
    if not Path(path).is_file():
        raise QtoolError(f"{path}: no such importance-matrix file")
    return read_imatrix(path)
