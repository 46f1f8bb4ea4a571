"""Runner speed: prompt and decode tokens/s and peak RSS of qtool's runner beside llama.cpp's, same file, threads.

    python scripts/bench_run.py [--model base|135m|moe|quick] [--types F16,Q8_0,Q4_0,Q4_K_M,Q2_K] [--threads 2]
                                [--prompt 512] [--decode 128] [--cpu-name haswell]

Uses (or builds, in bench-out/) a synthetic checkpoint and its F16 GGUF, and qtool-quantized files of each type:
`base` is the ~0.66B model of the foundation benchmark (12 layers, hidden 2048); `moe` a small Mixtral (8 layers,
hidden 1024, 8 experts of FFN 1536, 2 per token: a token reads about a third of the weights); `135m` has the shape
of a real 135M Llama (30 layers, hidden 576, 9 heads / 3 KV heads, FFN 1536, vocab 49152, tied embeddings), where
per-call overhead rather than bandwidth dominates decoding. --cpu-name compiles qtool's kernels for an older target
(numba's NUMBA_CPU_NAME, e.g. haswell = AVX2 without AVX-512) to measure AVX2 speed on a newer CPU; llama.cpp stays
built for this CPU, so that column compares qtool-on-AVX2 with llama.cpp at its best. Each measurement is a fresh
child process (peak RSS is its own): evaluate a prompt of --prompt tokens in one batch (llama-bench's pp), then
--decode tokens one at a time (tg), greedy. qtool and llama.cpp (llama-cpp-python) alternate per type so that
machine load hits both alike. The decode bound is the machine's measured copy bandwidth over the weight bytes one
token reads (every tensor but the token embedding; of an expert tensor, the experts a token uses).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine, mb, run_measured, table  # noqa: E402
from bench_quantize import BASE, QUICK  # noqa: E402
from make_checkpoint import make_checkpoint  # noqa: E402

from qtool.formats.gguf_reader import GGUFFile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TYPES = ["F16", "Q8_0", "Q4_0", "Q4_K_M", "Q2_K"]
# llama-bench on this model, 2 threads, uncontended (tokens/s), as the runner issue quotes them
ISSUE_TG = {"F16": 27.3, "Q8_0": 38.5, "Q4_0": 74.6, "Q4_K_M": 70.8, "Q2_K": 79.8}
ISSUE_PP = {"F16": 163, "Q8_0": 152, "Q4_0": 229, "Q4_K_M": 233, "Q2_K": 162}

# Both children print one JSON line: prompt and decode seconds. Token ids are fixed pseudo-random ids.
QTOOL_CHILD = r"""
import json, sys, time
import numpy as np
from qtool.model import Model
path, n_pp, n_tg, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = Model(path, n_ctx=n_pp + n_tg + 8, threads=threads)
ids = (np.random.default_rng(0).integers(3, m.cfg.n_vocab, n_pp)).tolist()
m.eval(ids[:16]); m.eval(ids[16:17]); m.reset()  # load numba's cache for both paths
t = time.perf_counter(); logits = m.eval(ids); pp = time.perf_counter() - t
t = time.perf_counter()
for _ in range(n_tg):
    logits = m.eval([int(np.argmax(logits))])
tg = time.perf_counter() - t
print(json.dumps([pp, tg, m.kv_bytes()]))
"""
LLAMA_CHILD = r"""
import json, sys, time
import numpy as np, llama_cpp
path, n_pp, n_tg, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=n_pp + n_tg + 8, n_batch=n_pp, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
ids = (np.random.default_rng(0).integers(3, llm.n_vocab(), n_pp)).tolist()
llm.eval(ids[:16]); llm.reset()
t = time.perf_counter(); llm.eval(ids); pp = time.perf_counter() - t
t = time.perf_counter()
for _ in range(n_tg):
    nxt = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))  # the one output row
    llm.eval([nxt])
tg = time.perf_counter() - t
print(json.dumps([pp, tg, 0]))
"""


# the real 135M Llama shape of the runner-speed issue (SmolLM-135M's), with tied embeddings
SHAPE_135M = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, dtype="bf16",
                  tie_embeddings=True)
# a small Mixtral: 8 experts of which 2 per token, so decoding reads about a third of the weights
SHAPE_MOE = dict(arch="mixtral", hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=1536, experts=8,
                 experts_used=2, vocab=32000, dtype="bf16")
MODELS = {"base": BASE, "135m": SHAPE_135M, "moe": SHAPE_MOE, "quick": QUICK}


def f16_model(out: Path, model: str) -> tuple[str, Path]:
    """The F16 GGUF of a synthetic model (built once under `out`): (label, path)."""
    ckpt = out / "models" / model
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, **MODELS[model])
    f16 = out / f"{model}.F16.gguf"
    if not f16.is_file():
        subprocess.run([sys.executable, "-m", "qtool", "convert", ckpt, "-o", f16, "--type", "F16", "-q"], check=True)
    return model, f16


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes per second moved by a large numpy copy (read + write), best of three."""
    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of the weights one decoded token reads: all but the token embedding (one row of it), and of each
    expert tensor only the experts a token uses."""
    with GGUFFile(path) as g:
        arch = g.metadata.get("general.architecture")
        n_expert = g.metadata.get(f"{arch}.expert_count") or 1
        used = g.metadata.get(f"{arch}.expert_used_count") or 1
        return int(sum(t.nbytes * (used / n_expert if n.endswith("_exps.weight") else 1)
                       for n, t in g.tensors.items() if n != "token_embd.weight"))


def measure(child: str, path: Path, args, cpu_name: str | None = None) -> tuple[float, float, int, int]:
    env = {"NUMBA_NUM_THREADS": str(args.threads_n)}
    if cpu_name:
        env["NUMBA_CPU_NAME"] = cpu_name
    r = run_measured([sys.executable, "-c", child, path, args.prompt, args.decode, args.threads_n], env=env).check()
    pp, tg, kv = json.loads(r.stdout.strip().splitlines()[-1])
    return args.prompt / pp, args.decode / tg, r.peak_rss, kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="base", help="synthetic model shape (quick: smoke run)")
    ap.add_argument("--quick", action="store_true", help="same as --model quick")
    ap.add_argument("--cpu-name", help="also measure qtool compiled for this numba CPU target (e.g. haswell)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", default="2")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    args = ap.parse_args()
    args.threads_n = int(args.threads)
    out = Path(args.out)
    args.quick = args.quick or args.model == "quick"
    label, f16 = f16_model(out, "quick" if args.quick else args.model)
    bw = copy_bandwidth()
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"model: {label}; prompt {args.prompt} tokens, decode {args.decode} tokens, {args.threads} threads\n")

    rows = []
    for type_name in args.types.split(","):
        path = f16 if type_name == "F16" else out / f"{label}.{type_name}.gguf"
        if not path.is_file():
            cmd = [sys.executable, "-m", "qtool", "convert", f16, "-o", path, "--type", type_name, "-q"]
            if subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode != 0:
                # the presets llama-quantize refuses without an importance matrix: from the bundled text
                subprocess.run([*cmd, "--calibrate", "default", "--calibrate-chunks", "20"], check=True)
        size = path.stat().st_size
        l_pp, l_tg, l_rss, _ = measure(LLAMA_CHILD, path, args)
        q_pp, q_tg, q_rss, kv = measure(QTOOL_CHILD, path, args)
        t_pp = t_tg = None
        if args.cpu_name:
            t_pp, t_tg, _, _ = measure(QTOOL_CHILD, path, args, args.cpu_name)
        per_token = weight_bytes_per_token(path)
        bound = bw / per_token
        print(f"  {type_name}: llama.cpp pp {l_pp:.1f} tg {l_tg:.2f}; qtool pp {q_pp:.1f} tg {q_tg:.2f} tok/s"
              + (f"; qtool on {args.cpu_name} pp {t_pp:.1f} tg {t_tg:.2f}" if t_pp else ""), flush=True)
        rows.append([type_name, mb(size), f"{l_pp:.1f}", f"{q_pp:.1f}", f"{q_pp / l_pp:.2f}", f"{l_tg:.2f}",
                     f"{q_tg:.2f}", f"{q_tg / l_tg:.2f}", mb(per_token), f"{bound:.1f}", mb(l_rss), mb(q_rss),
                     mb(size + kv), f"{q_rss / (size + kv):.2f}",
                     f"{ISSUE_PP.get(type_name, '')}/{ISSUE_TG.get(type_name, '')}" if label == "base" else ""]
                    + ([f"{t_pp:.1f}", f"{t_pp / l_pp:.2f}", f"{t_tg:.2f}", f"{t_tg / l_tg:.2f}"] if t_pp else []))
    print()
    print(table(["type", "file MB", "llama.cpp pp", "qtool pp", "pp ratio", "llama.cpp tg", "qtool tg", "tg ratio",
                 "MB read per token", "tg bound", "llama.cpp RSS MB", "qtool RSS MB", "file+KV MB",
                 "qtool RSS / (file+KV)",
                 "issue's llama-bench pp/tg"]
                + ([f"qtool pp ({args.cpu_name})", "pp ratio", f"qtool tg ({args.cpu_name})", "tg ratio"]
                   if args.cpu_name else []), rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; pp/tg in tokens/s; tg bound = copy bandwidth / "
          "weight bytes read per token")


if __name__ == "__main__":
    main()
