"""Accuracy per size, the measuring stick of qtool's quantization methods: for each size class, llama.cpp without
and with an importance matrix, then each qtool method, every file scored by llama.cpp's own logits.

    python scripts/bench_quality.py [--model stories3M] [--types Q2_K,Q3_K_M,Q4_K_M,Q4_0,Q5_K_M]
                                    [--methods gptq] [--ctx 256] [--text EVAL] [--calibration TEXT]

Rows per type:
- `llama.cpp`: llama_model_quantize (llama-cpp-python's low-level API) on the F32 file; qtool's plain file of the
  same type is checked byte-identical (the "same file" column), so it is shown once.
- `llama.cpp imatrix`: the reference importance matrix llama-imatrix made from the calibration text
  (../shared/reference/MODEL.imatrix.gguf), applied by `qtool convert --imatrix`: the file llama-quantize --imatrix
  writes (byte-identical, tests/test_convert_imatrix.py; llama-cpp-python cannot hand llama_model_quantize an
  imatrix), scored here by llama.cpp.
- `qtool <method>`: `qtool convert CHECKPOINT --type T --calibrate TEXT --method M` (calibration included in its time).

Scoring: llama-cpp-python loads each file (n_ctx = --ctx, logits for every token, llama-perplexity's windows: the
text tokenized once with BOS, cut into windows of ctx tokens whose first token is BOS, the second half scored);
PPL, and KL(P_F32 || P_file) per scored token in numpy against the F32 model's llama.cpp logits: mean, 99th
percentile, and top-1 agreement. `qtool perplexity --reference F32` scores the same file too; the table gives its
mean KLD and the largest relative difference of PPL and mean KLD between the two scorers. Conversion time and peak
RSS come from the converting process (_bench_util.run_measured). The calibration text and the evaluation text
never overlap.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import machine, run_measured, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TYPES = "Q2_K,Q3_K_M,Q4_K_M,Q4_0,Q5_K_M"
MB = 1_000_000

# llama_model_quantize in a child process, so its time and peak RSS are its own
_LLAMA_QUANTIZE = r"""
import ctypes, sys, llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = ftype, threads
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))
"""


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def llama_logprobs(path: Path, text: str, n_ctx: int, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's log-probabilities (scored tokens, vocab) float64 at llama-perplexity's scored positions, and
    the tokens they predict."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        bos = llm.token_bos() if tokens and tokens[0] == llm.token_bos() else None
        first, out, targets = n_ctx // 2, [], []
        for i in range(len(tokens) // n_ctx):
            win = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if bos is not None:
                win[0] = bos
            llm.reset()
            llm.eval(win)
            out.append(_log_softmax(np.array(llm.scores[first:n_ctx - 1], dtype=np.float32)))
            targets.append(np.array(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]))
        return np.concatenate(out), np.concatenate(targets)
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm


def score(lp: np.ndarray, ref: np.ndarray, targets: np.ndarray) -> dict:
    """PPL, mean and 99% KL(ref || model), top-1 agreement (%) from log-probabilities."""
    nll = -lp[np.arange(len(targets)), targets]
    kl = (np.exp(ref) * (ref - lp)).sum(axis=-1)
    return {"ppl": math.exp(float(nll.mean())), "kld": float(kl.mean()), "kld99": float(np.percentile(kl, 99)),
            "top1": 100.0 * float((lp.argmax(-1) == ref.argmax(-1)).mean())}


def qtool_score(model: Path, f32: Path, text_file: str, ctx: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "qtool", "perplexity", str(model), "--text", text_file,
                          "--ctx", str(ctx), "--reference", str(f32), "--json", "-q"],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return {"ppl": r["perplexity"], "kld": r["kl_mean"], "kld99": r["kl_p99"], "top1": 100 * r["top1_agreement"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stories3M", help="a model folder name under ../shared/models, or a folder")
    ap.add_argument("--imatrix", default=None, help="default: ../shared/reference/MODEL.imatrix.gguf")
    ap.add_argument("--text", default=str(SHARED / "eval" / "tinystories_style_eval.txt"))
    ap.add_argument("--calibration", default=str(SHARED / "eval" / "calibration_stories.txt"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--methods", default="gptq", help="qtool methods beyond llama.cpp's, comma-separated")
    ap.add_argument("--no-qtool-score", action="store_true", help="skip the qtool perplexity cross-check")
    ap.add_argument("--out", default=str(REPO / "bench-out" / "quality"))
    args = ap.parse_args()
    from qtool.formats.constants import FILE_TYPES
    folder = Path(args.model) if Path(args.model).is_dir() else SHARED / "models" / args.model
    name = folder.name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(args.text).resolve() == Path(args.calibration).resolve():
        sys.exit("the calibration text must not be the evaluation text")
    imatrix = Path(args.imatrix or SHARED / "reference" / f"{name}.imatrix.gguf")
    text = Path(args.text).read_text()
    f32 = out / f"{name}.F32.gguf"
    if not f32.is_file():
        subprocess.run([sys.executable, "-m", "qtool", "convert", str(folder), "-o", str(f32), "--type", "F32", "-q"],
                       check=True)
    ref, targets = llama_logprobs(f32, text, args.ctx, args.threads)
    f32_ppl = score(ref, ref, targets)["ppl"]
    print(f"machine: {machine()}")
    print(f"model {name}; eval {args.text} ({len(targets)} scored tokens, ctx {args.ctx}); calibration "
          f"{args.calibration}; imatrix {imatrix}; F32 PPL (llama.cpp) {f32_ppl:.4f}\n", flush=True)

    def qtool_convert(dst: Path, t: str, *extra: str, src: Path = folder):
        m = run_measured([sys.executable, "-m", "qtool", "convert", str(src), "-o", str(dst), "--type", t, "-q",
                          *extra]).check()
        return m.seconds, m.peak_rss

    rows = []
    for t in args.types.split(","):
        made = []  # (method, file, seconds, peak rss, note)
        ll = out / f"llama.{t}.gguf"
        m = run_measured([sys.executable, "-c", _LLAMA_QUANTIZE, str(f32), str(ll), str(int(FILE_TYPES[t])),
                          str(args.threads)]).check()
        plain = out / f"qtool.{t}.gguf"
        s, rss = qtool_convert(plain, t, src=f32)
        same = plain.read_bytes() == ll.read_bytes()
        made.append(("llama.cpp", ll, m.seconds, m.peak_rss, f"qtool plain: {'same file' if same else 'DIFFERS'}, "
                     f"{s:.1f} s, {rss / MB:.0f} MB"))
        imat = out / f"qtool.{t}.imatrix.gguf"
        s, rss = qtool_convert(imat, t, "--imatrix", str(imatrix), src=f32)
        made.append(("llama.cpp imatrix", imat, s, rss, "qtool --imatrix (llama-imatrix's file)"))
        for method in [x for x in args.methods.split(",") if x]:
            f = out / f"qtool.{t}.{method}.gguf"
            s, rss = qtool_convert(f, t, "--calibrate", args.calibration, "--calibrate-ctx", str(args.ctx),
                                   "--method", method)
            made.append((f"qtool {method}", f, s, rss, "calibration included"))
        scored = []
        for method, f, s, rss, note in made:
            lp, _ = llama_logprobs(f, text, args.ctx, args.threads)
            q = None if args.no_qtool_score else qtool_score(f, f32, args.text, args.ctx)
            scored.append((method, f, s, rss, note, score(lp, ref, targets), q))
        best = min(r["kld"] for method, *_, r, q in scored if method.startswith("llama.cpp"))
        for method, f, s, rss, note, r, q in scored:
            diff = "" if q is None else f"{100 * max(abs(q['ppl'] / r['ppl'] - 1), abs(q['kld'] / r['kld'] - 1)):.2f}%"
            rows.append([t, method, f.stat().st_size, f"{r['ppl']:.4f}", f"{r['kld']:.6f}",
                         f"{r['kld'] / best:.2f}", f"{r['kld99']:.4f}", f"{r['top1']:.2f}",
                         "" if q is None else f"{q['kld']:.6f}", diff, f"{s:.1f}", f"{rss / MB:.0f}", note])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(table(["type", "method", "bytes", "PPL", "mean KLD", "× best llama.cpp", "99% KLD", "top-1 %",
                 "mean KLD (qtool ppl)", "max Δ scorers", "convert s", "peak RSS MB", "note"], rows))


if __name__ == "__main__":
    main()
