#!/usr/bin/env python3
"""Benchmark `qtool convert` against llama.cpp's convert_hf_to_gguf.py: wall time and peak RSS.

    python scripts/bench_convert.py [--quick] [--repeat N] [--types F16,Q8_0] [--skip-llama] [--skip-large]

Models (synthetic BF16 checkpoints from scripts/make_checkpoint.py, cached under bench-out/models/):
  base   ~0.66B parameters: hidden 2048, 12 layers, 32 heads / 4 KV heads, intermediate 5632, vocab 32000
  large  ~2.6B parameters: hidden 3072, 24 layers, 24 heads / 8 KV heads, intermediate 8192, vocab 32000
         (shows that qtool's peak RSS follows the largest tensor, not the model size)
`--quick` uses much smaller models of the same shape family, for a smoke run.

Each command runs as a child process; its wall time is measured from start to exit and its peak RSS is the
kernel's high-water mark for it (os.wait4 → ru_maxrss). Dirty pages are synced before each run, a warm-up pass on
a tiny model compiles numba's cache and warms imports first, and with --repeat the best time is kept. Both tools
read the same checkpoint from the page cache. qtool fsyncs its output before renaming it into place; llama.cpp
does not, so qtool's time includes writing the file to disk and llama.cpp's does not.

Targets (issue 2): qtool at most half llama.cpp's time; qtool's peak RSS under 2 × the largest tensor (as
float32, qtool's working precision) + 300 MB.

llama.cpp's converter is taken from $LLAMA_CPP_DIR (a llama.cpp checkout), or else from the llama-cpp-python sdist
of the installed version (it vendors llama.cpp), downloaded once with pip into ~/.cache/qtool-bench/.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_checkpoint as mc  # noqa: E402
from _bench_util import MB, machine, mb, run_measured, table  # noqa: E402

MODELS = {
    "base": dict(hidden=2048, layers=12, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    "large": dict(hidden=3072, layers=24, heads=24, kv_heads=8, intermediate=8192, vocab=32000),
}
QUICK = {
    "base": dict(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1408, vocab=32000),
    "large": dict(hidden=768, layers=8, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
}
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)
LLAMA_TYPES = {"F16": "f16", "Q8_0": "q8_0", "BF16": "bf16", "F32": "f32"}
REFERENCE = "issue 2's figures for llama.cpp on the base model, 2 cores: f16 15.5 s / 744 MB, q8_0 12.7 s / 718 MB"
MAX_SHARD = 5_000_000_000  # transformers' default max_shard_size
BOUND_EXTRA = 300 * MB
DEFAULT_LCP_VERSION = "0.3.36"  # the reference extra's pin, if llama-cpp-python is not installed


# ---- inputs ----------------------------------------------------------------------------------------------------
def ensure_model(root: Path, name: str, params: dict) -> Path:
    """The synthetic checkpoint for params, generated once and reused while its parameters match."""
    params = {**params, "dtype": "bf16", "seed": 0}
    params["shards"] = max(1, math.ceil(mc.n_params(**params) * 2 / MAX_SHARD))
    folder = root / "models" / name
    stamp = folder / ".params.json"
    want = json.dumps(params, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want:
        return folder
    print(f"generating {name} model ({mc.n_params(**params) / 1e9:.2f}B parameters) in {folder} ...", flush=True)
    stamp.unlink(missing_ok=True)
    mc.make_checkpoint(folder, **params)
    stamp.write_text(want)
    return folder


def largest_tensor_elems(folder: Path) -> tuple[str, int]:
    best = ("", 0)
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__" and math.prod(t["shape"]) > best[1]:
                best = (name, math.prod(t["shape"]))
    return best


def find_llama_cpp(cache: Path) -> Path:
    """Folder holding llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/ beside it)."""
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        path = Path(env).expanduser()
        if not (path / "convert_hf_to_gguf.py").is_file():
            sys.exit(f"bench_convert: LLAMA_CPP_DIR={env} has no convert_hf_to_gguf.py")
        return path
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = DEFAULT_LCP_VERSION
    dest = cache / f"llama-cpp-python-{version}"
    tree = dest / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    sdists = cache / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    found = sorted(sdists.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        print(f"downloading the llama-cpp-python {version} sdist (vendors llama.cpp) into {sdists} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdists)], check=True)
        found = sorted(sdists.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            sys.exit(f"bench_convert: pip did not leave llama_cpp_python-{version}.tar.gz in {sdists}")
    # only the converter and what it imports or reads
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(found[0]) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/vendor/llama.cpp/", 1)
            if len(parts) == 2 and parts[1].startswith(wanted) and (m.isfile() or m.isdir()):
                m.name = parts[1]
                members.append(m)
        tmp.mkdir(parents=True)
        tar.extractall(tmp / "llama.cpp", members=members, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return tree


# ---- runs ------------------------------------------------------------------------------------------------------
def qtool_cmd(src: Path, out: Path, type_name: str) -> list:
    return [sys.executable, "-m", "qtool", "convert", src, "-o", out, "--type", type_name, "--quiet"]


def llama_cmd(lcp: Path, src: Path, out: Path, type_name: str) -> list:
    return [sys.executable, lcp / "convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", LLAMA_TYPES[type_name]]


def best_of(cmd: list, out: Path, repeat: int, env: dict | None = None, cwd: Path | None = None):
    """Run repeat times; the fastest run's time, the highest peak RSS, the fastest run's CPU seconds."""
    runs = []
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        runs.append(run_measured(cmd, env=env, cwd=cwd).check())
    best = min(runs, key=lambda r: r.seconds)
    return best.seconds, max(r.peak_rss for r in runs), best.cpu_seconds


def compare_files(a: Path, b: Path) -> str:
    """'n/n' tensors with identical type, shape and bytes in both GGUF files (by name)."""
    import numpy as np
    from qtool.formats.gguf_reader import GGUFFile
    with GGUFFile(a) as ra, GGUFFile(b) as rb:
        same = 0
        for name, t in ra.tensors.items():
            u = rb.tensors.get(name)
            if u is not None and t.ggml_type == u.ggml_type and t.shape == u.shape and \
                    np.array_equal(ra.raw(name), rb.raw(name)):
                same += 1
        return f"{same}/{max(len(ra.tensors), len(rb.tensors))}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="qtool convert vs llama.cpp convert_hf_to_gguf.py: time and peak RSS")
    ap.add_argument("--quick", action="store_true", help="small models, for a smoke run")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out", help="work folder (models are cached here)")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/qtool-bench").expanduser(),
                    help="where the llama.cpp sources are kept")
    ap.add_argument("--types", default="F16,Q8_0")
    ap.add_argument("--repeat", type=int, default=1, help="runs per command; the fastest is reported")
    ap.add_argument("--skip-llama", action="store_true", help="qtool only")
    ap.add_argument("--skip-large", action="store_true", help="only the base model")
    ap.add_argument("--no-verify", action="store_true", help="don't compare qtool's tensors with llama.cpp's")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                    help="also time `python -m qtool` imported from DIR (a folder holding a qtool package, put "
                         "on PYTHONPATH), e.g. a proposed change; repeatable")
    a = ap.parse_args(argv)
    types = [t.strip().upper() for t in a.types.split(",") if t.strip()]
    for t in types:
        if t not in LLAMA_TYPES:
            ap.error(f"--types: {t} is not one of {', '.join(LLAMA_TYPES)}")
    variants = []
    for v in a.variant:
        label, sep, folder = v.partition("=")
        if not sep or not (Path(folder) / "qtool").is_dir():
            ap.error(f"--variant {v}: expected LABEL=DIR with DIR/qtool a package")
        variants.append((label, Path(folder).resolve()))
    specs = QUICK if a.quick else MODELS
    names = ["base"] + ([] if a.skip_large else ["large"])

    a.out.mkdir(parents=True, exist_ok=True)
    lcp = None if a.skip_llama else find_llama_cpp(a.cache)
    models = {n: ensure_model(a.out, ("quick-" if a.quick else "") + n, specs[n]) for n in names}
    tiny = ensure_model(a.out, "tiny", TINY)
    work = a.out / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    # (label, command maker, env, cwd); this checkout's qtool runs with the checkout as working directory so
    # `python -m qtool` imports it; variants run elsewhere with their folder on PYTHONPATH
    tools = []
    if lcp:
        tools.append(("llama.cpp", lambda src, out, t: llama_cmd(lcp, src, out, t), None, None))
    tools.append(("qtool", qtool_cmd, None, REPO))
    for label, folder in variants:
        tools.append((label, qtool_cmd, {"PYTHONPATH": str(folder)}, work))

    width = max(len(tool[0]) for tool in tools)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    if lcp:
        print(f"llama.cpp converter: {lcp / 'convert_hf_to_gguf.py'}")
    print("warm-up (numba cache, imports) ...", flush=True)
    for t in types:
        for label, make, env, cwd in tools:
            run_measured(make(tiny, work / "warm.gguf", t), env=env, cwd=cwd).check()
    (work / "warm.gguf").unlink(missing_ok=True)

    rows = []
    for n in names:
        src = models[n]
        params = mc.n_params(**{**specs[n], "dtype": "bf16"})
        big_name, big = largest_tensor_elems(src)
        bound = 2 * 4 * big + BOUND_EXTRA
        label = f"{n} {params / 1e9:.2f}B"
        print(f"{label}: largest tensor {big_name} {big:,} values; qtool RSS bound 2 × {mb(4 * big)} MB + 300 MB "
              f"= {mb(bound)} MB", flush=True)
        for t in types:
            results = {}
            outs = {}
            for tool, make, env, cwd in tools:
                out = work / f"{n}.{len(outs)}.{t}.gguf"
                results[tool] = best_of(make(src, out, t), out, a.repeat, env, cwd)
                outs[tool] = out
                secs, rss, cpu = results[tool]
                print(f"  {tool:<{width}} {t:<5} {secs:6.2f} s  CPU {cpu:6.1f} s  {mb(rss):>6} MB  "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
                if tool != "llama.cpp" and lcp and a.no_verify:
                    out.unlink(missing_ok=True)
            ref = results.get("llama.cpp")
            for tool, (secs, rss, cpu) in results.items():
                is_ref = tool == "llama.cpp"
                same = "-"
                if not is_ref and lcp and not a.no_verify:
                    same = compare_files(outs[tool], outs["llama.cpp"])
                rows.append([label, t, tool, f"{secs:.2f}", f"{cpu:.1f}", mb(rss),
                             f"{secs / ref[0]:.2f}" if ref and not is_ref else "-",
                             f"{rss / ref[1]:.2f}" if ref and not is_ref else "-",
                             "-" if is_ref else mb(bound),
                             "-" if is_ref or not ref else ("yes" if secs <= ref[0] / 2 else "NO"),
                             "-" if is_ref else ("yes" if rss < bound else "NO"), same])
            for out in outs.values():
                out.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(["model", "type", "tool", "wall s", "CPU s", "peak RSS MB", "time ratio", "RSS ratio",
                 "RSS bound MB", "time ≤ ½", "RSS < bound", "same tensors"], rows))
    print()
    print("wall = seconds from start to exit (best of --repeat); CPU = user + sys seconds of that run; peak RSS in")
    print("10^6 bytes; ratios are tool / llama.cpp; RSS bound = 2 × largest tensor as float32 + 300 MB;")
    print("same tensors = tensors with identical name, type, shape and bytes as llama.cpp's output.")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine inflates wall times)")
    print(REFERENCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
