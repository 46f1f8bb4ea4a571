"""Small helpers shared by the benchmark scripts: run a child process and measure its wall time and peak RSS,
describe the machine, and print a plain-text table.

Peak RSS comes from the kernel's accounting of the child (`os.wait4` → ru_maxrss, the high-water mark of its
resident set, including file pages it has mapped), so nothing polls and nothing is missed between samples; see
run_measured for why the child is started through a small launcher.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MB = 1_000_000
CACHE = Path("~/.cache/qtool-bench").expanduser()
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


@dataclass
class Measured:
    cmd: list[str]
    seconds: float
    peak_rss: int  # bytes
    cpu_seconds: float  # user + system
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> "Measured":
        if not self.ok:
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"command failed ({self.returncode}): {' '.join(self.cmd)}\n{tail}")
        return self


# The measured command is started by this small launcher, not by the benchmark process itself: Linux folds the
# high-water RSS of the address space a process had before exec() into its ru_maxrss, and a forked child starts
# from a copy of its parent's address space, so a child forked straight from a benchmark that has just generated
# or compared gigabytes would report the benchmark's peak, not its own. Forked from the launcher (~10 MB), the
# command's ru_maxrss is its own.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
cmd, env, cwd, result = json.loads(sys.argv[1])
t0 = time.perf_counter()
proc = subprocess.Popen(cmd, env=env, cwd=cwd)
_, status, ru = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - t0
with open(result, "w") as f:
    json.dump([seconds, ru.ru_maxrss, ru.ru_utime + ru.ru_stime, os.waitstatus_to_exitcode(status)], f)
"""


def run_measured(cmd: Sequence[str], env: dict | None = None, cwd: str | os.PathLike | None = None,
                 sync_first: bool = True) -> Measured:
    """Run cmd to completion; wall time from start to exit, the child's peak RSS in bytes and its CPU time.

    sync_first flushes dirty pages left by earlier steps (e.g. writing the input model) so they are not
    written back on this command's clock."""
    cmd = [str(c) for c in cmd]
    if sync_first:
        os.sync()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        arg = json.dumps([cmd, {**os.environ, **(env or {})}, str(cwd) if cwd else None, result])
        launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, arg], stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        if not os.path.exists(result):
            return Measured(cmd, 0.0, 0, 0.0, launcher.returncode or 1, out.read(), err.read())
        with open(result) as f:
            seconds, maxrss, cpu, code = json.load(f)
        # Linux reports ru_maxrss in kilobytes, macOS in bytes
        scale = 1 if sys.platform == "darwin" else 1024
        return Measured(cmd, seconds, maxrss * scale, cpu, code, out.read(), err.read())


def machine() -> str:
    """One line: CPU model, cores available to this process, RAM, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        ram = f", {kb / 1e6:.0f} GB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {cores} cores{ram}, Python {platform.python_version()}; SIMD {simd_level()}"


# the x86 vector extensions that change what the kernels compile to, widest first
_SIMD = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))
_SIMD_EXTRAS = ("avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "fma", "f16c")


def simd_level() -> str:
    """The CPU's widest vector extension and the extras that matter to int8/fp16 kernels (x86: /proc/cpuinfo
    flags; elsewhere the machine name, e.g. aarch64 = NEON), and numba's target when NUMBA_CPU_NAME overrides it."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    level = next((name for flag, name in _SIMD if flag in flags), platform.machine())
    extras = [f for f in _SIMD_EXTRAS if f in flags]
    target = os.environ.get("NUMBA_CPU_NAME")
    return level + (f" ({' '.join(extras)})" if extras else "") + (f"; numba target {target}" if target else "")


def mb(n_bytes: float) -> str:
    return f"{n_bytes / MB:,.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """A Markdown-style table (pastes into issues and reports); numbers right-aligned by default."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    if right is None:
        right = [all(_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if ra else ("-" * (w + 2)) for w, ra in zip(widths, right)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _numeric(s: str) -> bool:
    s = s.replace(",", "").replace("×", "").replace("x", "").strip()
    try:
        float(s)
        return True
    except ValueError:
        return s in ("", "-", "n/a")


def llama_tool(name: str) -> Path:
    """The path of one of llama.cpp's tools (llama-imatrix, llama-quantize, llama-perplexity, llama-bench)."""
    env = os.environ.get("LLAMA_CPP_BIN")
    if env and (Path(env) / name).is_file():
        return Path(env) / name
    found = shutil.which(name)
    if found:
        return Path(found)
    build = CACHE / "llama-build"
    tool = build / "bin" / name
    if tool.is_file():
        return tool
    src = _vendored_llama_cpp()
    print(f"building {name} from {src} into {build} (once) ...", flush=True)
    flags = [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DBUILD_SHARED_LIBS=OFF", *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", name], check=True,
                   stdout=subprocess.DEVNULL)
    return tool


def _vendored_llama_cpp() -> Path:
    """llama.cpp's source tree as vendored by the installed llama-cpp-python (its sdist, unpacked once)."""
    import importlib.metadata
    version = importlib.metadata.version("llama-cpp-python")
    tree = CACHE / f"llama-cpp-python-{version}-src"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    sdists = CACHE / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    tar_path = sdists / f"llama_cpp_python-{version}.tar.gz"
    if not tar_path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdists)], check=True)
    tmp = tree.with_name(tree.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/vendor/llama.cpp/", 1)
            if len(parts) == 2 and (m.isfile() or m.isdir()):
                m.name = parts[1]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(tree)
    return tree
