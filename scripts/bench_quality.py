"""Accuracy per size: each type with and without an importance matrix, made and scored by qtool and by llama.cpp.

    python scripts/bench_quality.py [--model stories3M] [--imatrix FILE] [--ctx 256] [--types Q4_K_M,IQ2_S,...]

For every type: `qtool convert F32 --type T [--imatrix M]` and `llama-quantize [--imatrix M] F32 T`, then each
file scored on the evaluation text against the F32 model (`qtool perplexity --reference`, and llama-perplexity's
`--kl-divergence` against its own F32 logits). The table gives size, PPL, mean and 99th-percentile KLD and top-1
agreement for both, and whether the two files are byte-identical. The importance matrix defaults to
llama-imatrix's own file of the model in ../shared/reference, so the two sides quantize with the same statistics;
it comes from the calibration text, never the evaluation text. llama.cpp's tools are found or built as
bench_imatrix.py does (_bench_util.llama_tool).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import llama_tool, machine, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
K_QUANTS = "Q2_K,Q3_K_S,Q3_K_M,Q4_0,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K"
IQ_TYPES = "IQ4_NL,IQ4_XS,IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S,TQ2_0,TQ1_0"
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}


def qtool_score(model: Path, f32: Path, text: str, ctx: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "qtool", "perplexity", str(model), "--text", text, "--ctx", str(ctx),
                          "--reference", str(f32), "--json", "-q"], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return {"ppl": r["perplexity"], "kld": r["kl_mean"], "kld99": r["kl_p99"], "top1": 100 * r["top1_agreement"]}


def llama_score(model: Path, base: Path, text: str, ctx: int, threads: int) -> dict:
    cmd = [str(llama_tool("llama-perplexity")), "-m", str(model), "-f", text, "-c", str(ctx), "-t", str(threads),
           "--kl-divergence-base", str(base), "--kl-divergence"]
    for _ in range(3):  # its log thread sometimes drops the summary when the process ends: run it again
        log = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
        found = {key: re.search(rf"{label}\s*:\s*([0-9.]+)", log) for key, label in
                 (("ppl", r"Mean PPL\(Q\)"), ("kld", "Mean    KLD"), ("kld99", "99.0%   KLD"), ("top1", "Same top p"))}
        if all(found.values()):
            return {key: float(m.group(1)) for key, m in found.items()}
    raise RuntimeError(f"llama-perplexity printed no summary:\n{log[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stories3M", help="a model folder name under ../shared/models")
    ap.add_argument("--imatrix", default=None, help="default: ../shared/reference/MODEL.imatrix.gguf")
    ap.add_argument("--text", default=str(SHARED / "eval" / "tinystories_style_eval.txt"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=f"{K_QUANTS},{IQ_TYPES}")
    ap.add_argument("--out", default=str(REPO / "bench-out" / "quality"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    imatrix = Path(args.imatrix or SHARED / "reference" / f"{args.model}.imatrix.gguf")
    f32 = out / f"{args.model}.F32.gguf"
    if not f32.is_file():
        subprocess.run([sys.executable, "-m", "qtool", "convert", str(SHARED / "models" / args.model), "-o", str(f32),
                        "--type", "F32", "-q"], check=True)
    base = out / f"{args.model}.F32.kld"
    if not base.is_file():  # llama-perplexity's own F32 logits, the reference of its KLD
        subprocess.run([str(llama_tool("llama-perplexity")), "-m", str(f32), "-f", args.text, "-c", str(args.ctx),
                        "-t", str(args.threads), "--kl-divergence-base", str(base)], check=True, capture_output=True)
    print(f"machine: {machine()}")
    print(f"model {args.model}; eval {args.text}, ctx {args.ctx}; imatrix {imatrix}\n")
    rows = []
    for t in args.types.split(","):
        for weighted in (False, True):
            if t in NEEDS_IMATRIX and not weighted:
                continue
            tag = f"{t}{'.imat' if weighted else ''}"
            ours, theirs = out / f"qtool.{tag}.gguf", out / f"llama.{tag}.gguf"
            im = ["--imatrix", str(imatrix)] if weighted else []
            subprocess.run([sys.executable, "-m", "qtool", "convert", str(f32), "-o", str(ours), "--type", t, "-q",
                            *im], check=True)
            subprocess.run([str(llama_tool("llama-quantize")), *im, str(f32), str(theirs), t, str(args.threads)],
                           check=True, capture_output=True)
            q = qtool_score(ours, f32, args.text, args.ctx)
            ll = llama_score(theirs, base, args.text, args.ctx, args.threads)
            same = ours.read_bytes() == theirs.read_bytes()
            rows.append([t, "yes" if weighted else "no", ours.stat().st_size, "yes" if same else "NO",
                         f"{q['ppl']:.4f}", f"{ll['ppl']:.4f}", f"{q['kld']:.6f}", f"{ll['kld']:.6f}",
                         f"{q['kld99']:.4f}", f"{ll['kld99']:.4f}", f"{q['top1']:.2f}", f"{ll['top1']:.2f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(table(["type", "imatrix", "bytes", "same file", "PPL qtool", "PPL llama", "KLD qtool", "KLD llama",
                 "99% KLD qtool", "99% KLD llama", "top-1 % qtool", "top-1 % llama"], rows))


if __name__ == "__main__":
    main()
