"""Requantize speed: `qtool convert F16.gguf --type T` beside llama.cpp's `llama_model_quantize`, same threads.

    python scripts/bench_quantize.py [--quick] [--types Q8_0,Q4_K_M] [--threads 1,2]

Builds (or reuses, in bench-out/) the synthetic ~0.66B BF16 checkpoint of the foundation benchmark and its F16
GGUF, then for each type times both tools in child processes, interleaved so that machine load hits both alike,
checks that every tensor qtool writes equals llama.cpp's, and prints one table with the ratio, relative RMSE and
bits/weight. Also: the cold first call (import + first quantize, numba cache present).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine, run_measured, table  # noqa: E402
from make_checkpoint import make_checkpoint  # noqa: E402

from qtool.formats.constants import FILE_TYPES, FLOAT_TYPES  # noqa: E402
from qtool.formats.gguf_reader import GGUFFile  # noqa: E402
from qtool.recipes import default_type  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
# llama-quantize on this model, 2 threads, idle machine (wall s), as issue 3 quotes them
ISSUE_FIGURES = {"Q8_0": 5.4, "Q4_0": 3.8, "Q4_1": 3.8, "Q5_0": 4.0, "Q5_1": 3.9, "Q2_K": 16.9, "Q3_K_M": 13.5,
                 "Q4_K_M": 26.2, "Q5_K_M": 22.5, "Q6_K": 12.5}
BASE = dict(hidden=2048, layers=12, heads=32, kv_heads=4, intermediate=5632, vocab=32000, dtype="bf16")
QUICK = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=32000, dtype="bf16")

LLAMA_QUANTIZE = r"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""
COLD = r"""
import time; t = time.perf_counter()
import numpy as np
from qtool import kernels
from qtool.formats.constants import GGMLType
kernels.quantize(GGMLType[__import__("sys").argv[1]], np.ones((1, 256), np.float32))
print(time.perf_counter() - t)
"""


def same_tensors(a: Path, b: Path) -> bool:
    with GGUFFile(a) as x, GGUFFile(b) as y:
        return set(x.tensors) == set(y.tensors) and all(
            x.tensors[n].ggml_type == t.ggml_type and np.array_equal(x.raw(n), y.raw(n)) for n, t in y.tensors.items())


def rel_rmse(src: Path, out: Path) -> float:
    from qtool import kernels
    err = ref = 0.0
    with GGUFFile(src) as s, GGUFFile(out) as q:
        for name, t in q.tensors.items():
            if t.ggml_type in FLOAT_TYPES:
                continue
            x = s.array(name).astype(np.float32)
            dq = kernels.dequantize(t.ggml_type, q.raw(name), t.shape[-1]).reshape(t.shape)
            err += float(np.sum((dq - x).astype(np.float64) ** 2))
            ref += float(np.sum(x.astype(np.float64) ** 2))
    return math.sqrt(err / ref)


def f16_model(out: Path, quick: bool) -> tuple[str, Path]:
    """The F16 GGUF of the foundation benchmark's synthetic model (built once under `out`): (label, path)."""
    label = "quick-base" if quick else "base"
    ckpt = out / "models" / label
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, **(QUICK if quick else BASE))
    f16 = out / f"{label}.F16.gguf"
    if not f16.is_file():
        subprocess.run([sys.executable, "-m", "qtool", "convert", ckpt, "-o", f16, "--type", "F16", "-q"], check=True)
    return label, f16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    args = ap.parse_args()
    out = Path(args.out)
    label, f16 = f16_model(out, args.quick)
    with GGUFFile(f16) as g:
        n_params = sum(t.n_elements for t in g.tensors.values())
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"model: {label}, {n_params / 1e9:.2f}B parameters, F16 input {f16.stat().st_size / 1e6:,.0f} MB\n")

    rows = []
    for type_name in args.types.split(","):
        cold = subprocess.run([sys.executable, "-c", COLD, default_type(type_name).name], capture_output=True,
                              text=True)
        cold_s = float(cold.stdout.strip()) if cold.returncode == 0 else float("nan")
        for nt in (int(n) for n in args.threads.split(",")):
            ours, ref = out / f"{label}.{type_name}.qtool.gguf", out / f"{label}.{type_name}.llama.gguf"
            q = run_measured([sys.executable, "-m", "qtool", "convert", f16, "-o", ours, "--type", type_name, "-q"],
                             env={"NUMBA_NUM_THREADS": str(nt)}).check()
            lq = run_measured([sys.executable, "-c", LLAMA_QUANTIZE, f16, ref, int(FILE_TYPES[type_name]), nt]).check()
            rows.append([type_name, nt, f"{lq.seconds:.2f}", f"{q.seconds:.2f}", f"{lq.seconds / q.seconds:.2f}",
                         f"{n_params / q.seconds / 1e6:.0f}", f"{rel_rmse(f16, ours):.4f}",
                         f"{8 * ours.stat().st_size / n_params:.3f}", f"{cold_s:.2f}",
                         "yes" if same_tensors(ours, ref) else "NO",
                         ISSUE_FIGURES.get(type_name, "") if nt == 2 and not args.quick else ""])
            ours.unlink()
            ref.unlink()
            print(f"  {type_name} threads={nt}: llama.cpp {lq.seconds:.2f} s, qtool {q.seconds:.2f} s", flush=True)
    print()
    print(table(["type", "threads", "llama.cpp s", "qtool s", "speed-up", "qtool Mparam/s", "rel. RMSE", "bits/weight",
                 "cold start s", "same tensors", "issue's llama.cpp s"], rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; speed-up = llama.cpp time / qtool time (both whole "
          "runs: reading F16, quantizing, writing); cold start = fresh process import + first quantize, cache warm")


if __name__ == "__main__":
    main()
