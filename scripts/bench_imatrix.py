"""Importance-matrix speed: `qtool imatrix` beside `llama-imatrix`, same F32 file, text, chunk size and threads.

    python scripts/bench_imatrix.py [--model stories3M|260K] [--text FILE] [--ctx 256] [--threads 2] [--repeat 3]

llama-cpp-python builds llama.cpp's libraries but not its tools, so llama-imatrix comes from $LLAMA_CPP_BIN (a
folder holding it), from PATH, or is built once from the llama.cpp that llama-cpp-python vendors (its sdist,
fetched with pip) into ~/.cache/qtool-bench/llama-build (cmake, a few minutes on 2 cores, AMX disabled as the
Makefile does). Both run as child processes alternating per round, so machine load hits both alike; the table
gives each one's best wall time, tokens/s and peak RSS, and checks that the two matrices agree (entries, counts,
Σx² within 1e-4 relative per tensor).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import llama_tool, machine, mb, run_measured, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def compare(ours: Path, theirs: Path) -> str:
    from qtool.formats.imatrix import read_imatrix
    a, b = read_imatrix(ours), read_imatrix(theirs)
    if sorted(a.entries) != sorted(b.entries):
        return "different entries"
    worst = max(float(np.linalg.norm(a.entries[n].in_sum2 - b.entries[n].in_sum2) / np.linalg.norm(b.entries[n].in_sum2))
                for n in b.entries)
    same_counts = all(np.array_equal(a.entries[n].counts, b.entries[n].counts) for n in b.entries)
    return f"{len(b.entries)} entries, counts {'equal' if same_counts else 'DIFFER'}, Σx² within {worst:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stories3M", help="a model folder name under ../shared/models")
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "eval" / "calibration_stories.txt"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = REPO.parent / "shared" / "models" / args.model
    f32 = out / f"{args.model}.F32.gguf"
    if not f32.is_file():
        subprocess.run([sys.executable, "-m", "qtool", "convert", str(src), "-o", str(f32), "--type", "F32", "-q"],
                       check=True)
    tool = llama_tool("llama-imatrix")
    ours, theirs = out / "qtool.imatrix.gguf", out / "llama.imatrix.gguf"
    cmds = {
        "qtool imatrix": [sys.executable, "-m", "qtool", "imatrix", str(f32), "--text", args.text, "--ctx",
                          str(args.ctx), "-o", str(ours), "--quiet"],
        "llama-imatrix": [str(tool), "-m", str(f32), "-f", args.text, "-c", str(args.ctx), "-t", str(args.threads),
                          "-o", str(theirs), "--no-ppl"],
    }
    env = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads)}
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"model: {args.model} F32; text {args.text}; chunks of {args.ctx}; {args.threads} threads\n")
    best: dict[str, object] = {}
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            m = run_measured(cmd, env=env).check()
            if name not in best or m.seconds < best[name].seconds:
                best[name] = m
    from qtool.formats.imatrix import read_imatrix
    tokens = read_imatrix(theirs).chunk_count * args.ctx
    rows = [[name, f"{m.seconds:.2f}", f"{tokens / m.seconds:.0f}", mb(m.peak_rss)] for name, m in best.items()]
    print(table(["tool", "best wall s", "tokens/s", "peak RSS MB"], rows))
    ratio = best["llama-imatrix"].seconds / best["qtool imatrix"].seconds
    print(f"\nqtool / llama.cpp speed: {ratio:.2f}x; {tokens} tokens; the matrices: {compare(ours, theirs)}")


if __name__ == "__main__":
    main()
