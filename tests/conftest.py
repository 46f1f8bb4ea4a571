"""Shared test fixtures: where the real models and texts are, and running the CLI as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the real models, texts and measurements beside the checkout; QTOOL_SHARED=/nonexistent runs as a fresh clone would
SHARED = Path(os.environ.get("QTOOL_SHARED") or REPO.parent / "shared")
EXAMPLE_260K = REPO / "examples" / "stories260K"
EXAMPLE_EVAL = REPO / "examples" / "tinystories_style_eval.txt"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import llama_oracle as a plain module


def shared_model(name: str) -> Path:
    path = SHARED / "models" / name
    if path.is_dir():
        return path
    if name == "stories260K":
        return EXAMPLE_260K
    pytest.skip(f"{path} is not here")


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_model("stories260K")


@pytest.fixture(scope="session")
def stories3m() -> Path:
    return shared_model("stories3M")


@pytest.fixture(scope="session")
def eval_text() -> str:
    """The shared eval text, else the copy bundled with the examples."""
    path = SHARED / "eval" / "tinystories_style_eval.txt"
    return (path if path.is_file() else EXAMPLE_EVAL).read_text()


def qtool(*args: str, check: bool = False, env: dict | None = None, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, as a user would; returns the completed process (text stdout/stderr)."""
    proc = subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qtool {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def qtool_here(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """The same CLI call in this process (main()'s error handling included): for the many conversions whose output
    file is what a test checks, a subprocess each would spend ~2 s importing numba and loading its cache."""
    from fuzz.harness import run_cli
    code, out, err = run_cli(*map(str, args))
    if check and code != 0:
        raise AssertionError(f"qtool {' '.join(map(str, args))} failed ({code}):\n{err}")
    return subprocess.CompletedProcess(["qtool", *map(str, args)], code, out, err)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Convert a shared model once per session and type: converted('stories260K', 'F32') → Path."""
    cache: dict[tuple[str, str], Path] = {}
    folder = tmp_path_factory.mktemp("converted")

    def get(model: str, type_name: str) -> Path:
        key = (model, type_name)
        if key not in cache:
            out = folder / f"{model}.{type_name}.gguf"
            qtool_here("convert", shared_model(model), "-o", out, "--type", type_name, "--quiet", check=True)
            cache[key] = out
        return cache[key]
    return get


# ---- llama.cpp's own converter, the oracle for metadata ---------------------------------------------------------
_RUN_CONVERTER = """
import runpy, sys
tree, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
if pre:  # a BPE vocabulary trained in a test has no published hash: tell the converter its pre-tokenizer
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_converter_tree() -> Path:
    """llama.cpp's convert_hf_to_gguf.py of the installed llama-cpp-python (LLAMA_CPP_DIR, or fetched once by
    scripts/bench_convert.py's find_llama_cpp into ~/.cache/qtool-bench); skips when it cannot be had."""
    pytest.importorskip("llama_cpp", reason="needs the reference extra (llama-cpp-python)")
    pytest.importorskip("torch", reason="convert_hf_to_gguf.py needs torch")
    pytest.importorskip("transformers", reason="convert_hf_to_gguf.py needs transformers")
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_convert import find_llama_cpp
    try:
        return find_llama_cpp(Path("~/.cache/qtool-bench").expanduser())
    except (Exception, SystemExit) as e:  # offline, or no sdist: nothing to compare with
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py is not available ({e})")


@pytest.fixture(scope="session")
def llama_convert(tmp_path_factory):
    """llama_convert(src, pre_tokenizer=None) → the F32 GGUF llama.cpp's convert_hf_to_gguf.py writes for src."""
    folder = tmp_path_factory.mktemp("llama_converted")
    cache: dict[tuple[str, str | None], Path] = {}

    def get(src: Path, pre_tokenizer: str | None = None) -> Path:
        key = (str(src), pre_tokenizer)
        if key not in cache:
            tree = llama_converter_tree()
            out = folder / f"{len(cache)}.gguf"
            proc = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(tree), pre_tokenizer or "", str(src),
                                   "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0:
                raise AssertionError(f"convert_hf_to_gguf.py failed on {src}:\n{proc.stderr[-3000:]}")
            cache[key] = out
        return cache[key]
    return get


def assert_same_metadata(ours: Path, theirs: Path) -> None:
    """Every metadata key of two GGUF files: the same keys in the same order, value types and values."""
    import numpy as np
    from qtool.formats.gguf_reader import GGUFFile
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert list(a.fields) == list(b.fields)
        for key, fa in a.fields.items():
            fb = b.fields[key]
            assert (fa.type, fa.elem_type) == (fb.type, fb.elem_type), key
            if isinstance(fa.value, np.ndarray):
                np.testing.assert_array_equal(fa.value, fb.value, err_msg=key)
                assert fa.value.dtype == fb.value.dtype, key
            else:
                assert fa.value == fb.value, key
