"""Issue 15: every bad input is a one-line error, never a traceback. One regression test per failure class the fuzz
run found (zero/huge tensor dims, nested-array metadata, rich markup, wrong-typed metadata, a huge context, bad
options and numerics), and a short deterministic fuzz run of tests/fuzz/gguf_mutants.py.

All on the bundled sample model (examples/stories260K), converted once in a temporary folder; the CLI runs
in-process (tests/fuzz/harness.py) so a few hundred cases take seconds, not a numba import each.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE_260K, EXAMPLE_EVAL, qtool
from fuzz.gguf_mutants import V, Model, byte_mutants, semantic_mutants, tensor_mutants
from fuzz.harness import run_cli
from qtool.errors import QtoolError
from qtool.formats.gguf_reader import GGUFFile


@pytest.fixture(scope="module")
def f32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "stories260K.F32.gguf"
    qtool("convert", EXAMPLE_260K, "-o", out, "--type", "F32", "--quiet", check=True)
    return out


@pytest.fixture(scope="module")
def base(f32) -> Model:
    return Model(f32)


def write(tmp_path: Path, m: Model, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(m.to_bytes())
    return p


def one_line_error(code: int, err: str, expect_code: int = 1) -> str:
    """The last stderr line is the error; anything before it may only be qtool's own warnings."""
    assert code == expect_code, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("qtool: error: "), err
    assert all(line.startswith("qtool: warning: ") for line in lines[:-1]), err
    return lines[-1]


def test_mutator_serializes_the_valid_file_byte_identically(f32, base):
    # the mutants are only meaningful if the unmutated model round-trips exactly
    assert base.to_bytes() == f32.read_bytes()


# ---- 1. tensors with a zero-length dimension ------------------------------------------------------------------

@pytest.mark.parametrize("dims", [[0], [0, 0], [64, 0], [0, 3, 2]])
def test_zero_dim_tensors_are_empty_views(tmp_path, base, dims):
    # ggml's gguf_init accepts a 0 dim (it rejects only negative ones and element-count overflow): so do we,
    # with views of the right empty shape instead of "cannot reshape array of size 0"
    m = base.copy()
    name = m.tensors[-1][0]
    m.tensors[-1] = [name, dims, 0, b""]  # F32
    with GGUFFile(write(tmp_path, m)) as g:
        shape = tuple(reversed(dims))
        assert g.tensors[name].shape == shape and g.tensors[name].nbytes == 0
        assert g.array(name).shape == shape
        assert g.raw(name).size == 0 and g.raw(name).shape[-1] == dims[0] * 4


@pytest.mark.parametrize("dims", [[0, 0, 2**64 - 1], [2**64 - 1], [2**63, 1], [2**32, 2**32], [2**62, 0]])
def test_huge_dims_are_refused_at_open_naming_file_and_tensor(tmp_path, base, dims):
    m = base.copy()
    name = m.tensors[0][0]
    m.tensors[0] = [name, dims, 0, b""]
    p = write(tmp_path, m)
    with pytest.raises(QtoolError) as e:
        GGUFFile(p)
    assert str(p) in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


def test_convert_of_an_empty_tensor_is_a_one_line_error(tmp_path, base):
    m = base.copy()
    m.tensors[-1] = [m.tensors[-1][0], [0, 0], 0, b""]
    out = tmp_path / "out.gguf"
    line = one_line_error(*run_cli("convert", write(tmp_path, m), "-o", out, "--type", "Q8_0", "--quiet")[0::2])
    assert "is empty" in line and not out.exists() and not list(tmp_path.glob(".*.partial"))


# ---- 2. nested-array metadata round-trips through requantizing ------------------------------------------------

def test_requantizing_nested_array_metadata_round_trips(tmp_path, base):
    gguf = pytest.importorskip("gguf")
    m = base.copy()
    nested = [(V.UINT8, [1, 2]), (V.STRING, ["[/]", ""]), (V.INT32, []), (V.ARRAY, [(V.FLOAT32, [1.5]),
                                                                                      (V.ARRAY, [])])]
    m.kv["general.nested"] = (V.ARRAY, nested, V.ARRAY)
    src = write(tmp_path, m)
    out = tmp_path / "q8.gguf"
    code, _, err = run_cli("convert", src, "-o", out, "--type", "Q8_0", "--quiet")
    assert code == 0, err
    # gguf-py (llama.cpp's reader) sees the same field, byte for byte, with the same types
    a, b = gguf.GGUFReader(src).fields["general.nested"], gguf.GGUFReader(out).fields["general.nested"]
    assert a.types == b.types
    assert b"".join(p.tobytes() for p in a.parts) == b"".join(p.tobytes() for p in b.parts)
    with GGUFFile(out) as g:
        assert _plain(g.fields["general.nested"].writer_value()) == _plain(nested)


def _plain(x):
    """numpy arrays as lists, (type, values) pairs as lists: comparable with ==."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---- 3. rich markup in file-derived strings ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["[/]", "[bold red]x[/bold red]", "[/bold]", "[link=file:///etc]a"])
def test_inspect_prints_markup_as_text(tmp_path, base, text):
    m = base.copy()
    m.kv["general.name"] = (V.STRING, text, None)
    m.kv[f"x.{text}"] = (V.STRING, text, None)
    m.tensors[0][0] = text + "t"
    p = write(tmp_path, m)
    code, out, err = run_cli("inspect", p, "--meta", "--tensors")
    assert code == 0, err
    assert text in out  # printed literally, not interpreted (or refused) as markup
    assert run_cli("inspect", p)[0] == 0


def test_inspect_shows_control_characters_escaped(tmp_path, base):
    m = base.copy()
    m.kv["general.name"] = (V.STRING, "a\x1b[2Jb", None)
    code, out, _ = run_cli("inspect", write(tmp_path, m))
    assert code == 0 and "\x1b[2J" not in out and "a\\x1b[2Jb" in out


# ---- 4. run on semantic mutants: metadata of the wrong type ----------------------------------------------------

SEMANTIC = {  # mutant label → what the one-line error must name
    "embedding_length a string": "llama.embedding_length", "embedding_length a float": "llama.embedding_length",
    "embedding_length 0": "llama.embedding_length", "block_count a string": "llama.block_count",
    "head_count 0": "llama.attention.head_count", "rms eps a string": "layer_norm_rms_epsilon",
    "rope base an array": None, "architecture an array": "general.architecture",
    "architecture an int": "general.architecture", "tokens a scalar": "tokenizer.ggml.tokens",
    "tokens an int array": "tokenizer.ggml.tokens", "tokens shorter than the vocab": "tokenizer.ggml.token",
    "tokens nested": "tokenizer.ggml.tokens", "scores a scalar": "tokenizer.ggml.scores",
    "scores short": "tokenizer.ggml.scores", "scores strings": "tokenizer.ggml.scores",
    "token_type a scalar": "tokenizer.ggml.token_type", "token_type short": "tokenizer.ggml.token_type",
    "bos id NaN": "tokenizer.ggml.bos_token_id", "bos id empty string": "tokenizer.ggml.bos_token_id",
    "add_eos_token an array": "tokenizer.ggml.add_eos_token", "add_bos_token a string": "add_bos_token",
    "tokenizer model an int": "tokenizer.ggml.model", "context a string": "llama.context_length",
}


def test_run_on_semantic_mutants_is_a_one_line_error_naming_the_key(tmp_path, base):
    seen = set()
    for label, data in semantic_mutants(base):
        p = tmp_path / "s.gguf"
        p.write_bytes(data)
        code, _, err = run_cli("run", p, "-p", "Once", "-n", "1", "--temp", "0")
        if label in SEMANTIC:
            seen.add(label)
            if SEMANTIC[label] is None:  # a uniform one-element per-layer array is accepted, as before
                assert code == 0, (label, err)
                continue
            line = one_line_error(code, err)
            assert SEMANTIC[label] in line and str(p) in line, (label, line)
        else:
            assert code in (0, 1), (label, err)
            if code:
                one_line_error(code, err)
    assert seen == set(SEMANTIC)


def test_tokens_shorter_than_the_embedding_are_refused(tmp_path, base):
    m = base.copy()
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        vt, v, e = m.kv[k]
        m.kv[k] = (vt, v[:100], e)
    line = one_line_error(*run_cli("run", write(tmp_path, m), "-p", "Once", "-n", "1")[0::2])
    assert "100 tokens" in line and "512 rows" in line


def test_a_chat_template_that_is_not_a_string_falls_back_to_plain(base):
    from qtool.chat import ChatTemplate
    from qtool.tokenizer import Tokenizer
    meta = {k: (np.asarray(v) if vt == V.ARRAY and e not in (V.STRING, V.ARRAY) else v)
            for k, (vt, v, e) in base.kv.items()}
    meta["tokenizer.chat_template"] = 7
    tpl = ChatTemplate.from_metadata(meta, Tokenizer.from_metadata(meta))
    assert tpl.is_plain and "not a string" in tpl.note


@pytest.mark.parametrize("ctx", [2**32 - 1, 2**40])
def test_a_huge_context_length_is_capped_by_memory(tmp_path, base, ctx):
    m = base.copy()
    m.kv["llama.context_length"] = (V.UINT64, ctx, None)
    code, out, err = run_cli("run", write(tmp_path, m), "-p", "Once", "-n", "2", "--temp", "0")
    assert code == 0, err
    assert "capped" in err and out.startswith("Once")


def test_kv_cap_follows_available_memory(monkeypatch, f32):
    import psutil

    from qtool import model as qmodel

    class VM:
        available = 10 * 2**20
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    m = qmodel.Model(f32, n_ctx=512)
    try:
        fit = int(VM.available * qmodel.KV_MEMORY_FRACTION) // qmodel.kv_bytes_per_token(m.cfg, "f16")
        assert m.n_ctx == min(512, fit) and (m.notes != []) == (fit < 512)
    finally:
        m.close()


# ---- 5. options and numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--seed", "-5"], ["--seed", str(2**64)], ["--ctx", "-5"], ["--temp", "nan"],
                                  ["--temp", "-1"], ["--temp", "inf"], ["--repeat-penalty", "0"],
                                  ["--repeat-penalty", "nan"], ["--top-p", "nan"], ["--top-p", "2"],
                                  ["--top-k", "-1"], ["-n", "-1"]])
def test_bad_run_options_are_usage_errors(f32, args):
    line = one_line_error(*run_cli("run", f32, "-p", "Once", "-n", "1", *args)[0::2], expect_code=2)
    assert args[0].lstrip("-") in line or "max-tokens" in line


def test_seed_minus_one_is_random_as_in_llama_cpp(f32):
    code, out, err = run_cli("run", f32, "-p", "Once", "-n", "2", "--seed", "-1", "-q")
    assert code == 0 and out.startswith("Once"), err


def test_invalid_utf8_prompt_is_a_usage_error(f32):
    # what Python makes of undecodable argv bytes (surrogateescape); also through a real subprocess below
    assert "UTF-8" in one_line_error(*run_cli("run", f32, "-p", "caf\udce9", "-n", "1")[0::2], expect_code=2)


def test_invalid_utf8_prompt_in_a_subprocess(f32):
    import os
    import subprocess
    import sys
    proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"qtool", b"run", os.fsencode(f32), b"-p",
                           b"caf\xe9", b"-n", b"1"], capture_output=True, timeout=300)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr and b"UTF-8" in proc.stderr


def test_empty_prompt_without_bos_is_a_usage_error(tmp_path, base):
    m = base.copy()
    m.kv["tokenizer.ggml.add_bos_token"] = (V.BOOL, False, None)
    p = write(tmp_path, m)
    assert "empty" in one_line_error(*run_cli("run", p, "-p", "", "-n", "1")[0::2], expect_code=2)
    assert run_cli("run", p, "-p", "Once", "-n", "1", "-q")[0] == 0


def _with_norm(base: Model, value: float) -> Model:
    m = base.copy()
    for t in m.tensors:
        if t[0] == "output_norm.weight":
            t[3] = np.full(len(t[3]) // 4, value, np.float32).tobytes()
    return m


def test_nan_logits_are_reported_as_a_broken_model(tmp_path, base):
    line = one_line_error(*run_cli("run", write(tmp_path, _with_norm(base, np.nan)), "-p", "Once", "-n", "1")[0::2])
    assert "NaN" in line and "broken" in line


@pytest.mark.parametrize("value", [np.nan, 1e30])
def test_perplexity_on_broken_logits_is_a_one_line_error(tmp_path, base, value):
    p = write(tmp_path, _with_norm(base, value))
    text = tmp_path / "eval.txt"
    text.write_text(EXAMPLE_EVAL.read_text()[:2000])  # a few windows are enough to overflow
    line = one_line_error(*run_cli("perplexity", p, "--text", text, "--ctx", "64", "-q")[0::2])
    assert "perplexity is not finite" in line


def test_perplexity_negative_ctx_is_a_usage_error(f32):
    one_line_error(*run_cli("perplexity", f32, "--text", EXAMPLE_EVAL, "--ctx", "-5")[0::2], expect_code=2)


# ---- the short deterministic fuzz run ----------------------------------------------------------------------

def test_fuzz_gguf_mutants_never_trace(tmp_path, f32, base):
    """A few hundred mutants: in-process against the reader, and every one the reader opens through `inspect` and
    `run -n 1`. Any exception escaping is a traceback a user would see; every failure is one line, exit 1 or 2."""
    t0 = time.perf_counter()
    data = f32.read_bytes()
    cases = [*semantic_mutants(base), *tensor_mutants(base), *byte_mutants(data, 400, seed=15)]
    p = tmp_path / "fuzz.gguf"
    opened = 0
    for label, blob in cases:
        p.write_bytes(blob)
        try:
            GGUFFile(p).close()
        except QtoolError as e:
            assert "\n" not in str(e) and str(p) in str(e), label
            continue
        opened += 1
        for args in (["inspect", p, "--meta", "--tensors"], ["run", p, "-p", "Once", "-n", "1", "--temp", "0"]):
            code, _, err = run_cli(*args)
            assert code in (0, 1, 2), (label, args[0], err)
            if code:
                one_line_error(code, err, code)
    assert opened > 50  # the run exercised the commands, not only the reader's refusals
    assert time.perf_counter() - t0 <= 60


def test_error_messages_with_control_characters_stay_one_line(tmp_path, base):
    m = base.copy()
    m.kv["tokenizer.ggml.model"] = (V.STRING, "l\n\x1b[2Jx", None)
    line = one_line_error(*run_cli("run", write(tmp_path, m), "-p", "Once", "-n", "1")[0::2])
    assert "\x1b" not in line and "tokenizer model" in line


def test_a_chat_template_failing_on_a_later_turn_is_a_one_line_error(tmp_path, base, monkeypatch):
    import io
    m = base.copy()
    m.kv["tokenizer.chat_template"] = (V.STRING, "{% if messages|length > 1 %}{{ raise_exception('no second turn') }}"
                                                 "{% endif %}{{ messages[0]['content'] }}", None)
    monkeypatch.setattr("sys.stdin", io.StringIO("Once\nagain\n"))
    line = one_line_error(*run_cli("run", write(tmp_path, m), "-n", "2", "--temp", "0", "-q")[0::2])
    assert "turn 2" in line and "no second turn" in line
