"""Issue 15, the checkpoint side: every bad config.json value, tokenizer file, safetensors header, shard index,
weights file kind and output path is a one-line `qtool:` error with no traceback and no output file. One test
(or one parametrized case) per failure class; mutated copies of the bundled sample model (examples/stories260K).

The CLI runs in-process (tests/fuzz/harness.py); cases that could block (FIFOs) run as a subprocess with a timeout,
so a regression fails instead of hanging the suite.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import EXAMPLE_260K, qtool
from fuzz.harness import run_cli
from qtool.formats import gguf_writer

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def ckpt(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(EXAMPLE_260K, folder)
    return folder


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))  # allow_nan: NaN and Infinity are what a hostile file would hold


def set_config(folder: Path, **changes: Any) -> None:
    cfg = read(folder / "config.json")
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    write_json(folder / "config.json", cfg)


DELETE = object()


def rewrite_header(path: Path, change: Callable[[dict], Any]) -> None:
    """Rewrite a safetensors file's JSON header (the data section kept as is: offsets are relative to it)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = change(header) or header
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def fails(folder: Path | str, out: Path, *extra: str, code: int = 1) -> str:
    """Convert and check the failure contract: the exit code, one stderr line starting "qtool:", no traceback,
    no output and no temporary file left beside it. Returns the error line."""
    got, _, err = run_cli("convert", str(folder), "-o", str(out), "--type", "F32", *extra)
    return check_failure(got, err, out, code)


def check_failure(got: int, err: str, out: Path, code: int = 1) -> str:
    assert got == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("qtool: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("qtool: error: "), err
    assert not out.exists() or out.is_dir(), "an output file was written"
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")], "a temporary file was left"
    return lines[0]


def test_the_unmutated_copy_converts(ckpt, tmp_path):
    # the mutants below are only meaningful if the copy itself is fine
    code, _, err = run_cli("convert", str(ckpt), "-o", str(tmp_path / "ok.gguf"), "--type", "F32", "-q")
    assert code == 0 and err == ""


# ---- 1. config.json values: type and range, the field named --------------------------------------------------

BAD_VALUES = {
    "hidden_size": ["64", [64], NAN, INF, -64, 0, 2**32, True, 64.5, None],
    "num_attention_heads": [0, "8", -8, 2**32, False, [8]],
    "num_key_value_heads": [3, 0, "4", NAN],
    "num_hidden_layers": [0, -1, 2**40, "5", 6, 4],
    "intermediate_size": [0, -172, 171, 1e20, "172"],
    "vocab_size": [2**40, 0, -1, "512", 511, 1e20, [512]],
    "head_dim": [7, 0, 16, "8", NAN],
    "max_position_embeddings": [-1, 0, 2**32, "512", INF],
    "rms_norm_eps": [NAN, INF, -1e-5, 0, "1e-5", [1e-5], True],
    "rope_theta": [0, NAN, -1.0, INF, "10000", [10000.0]],
    "tie_word_embeddings": ["yes", 1, [True]],
    "rope_scaling": ["llama3", [1], 5,
                     {"rope_type": "llama3", "factor": NAN},
                     {"rope_type": "llama3", "factor": -8.0},
                     {"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 1.0},
                     {"rope_type": "llama3", "original_max_position_embeddings": -5},
                     {"rope_type": ["llama3"]}],
    "architectures": ["LlamaForCausalLM", [1], {"a": 1}, []],
    "text_config": [5, "x"],
}
CASES = [(k, v) for k, vs in BAD_VALUES.items() for v in vs]


@pytest.mark.parametrize("field,value", CASES, ids=[f"{k}={str(v)[:30]}" for k, v in CASES])
def test_bad_config_value(ckpt, tmp_path, field, value):
    set_config(ckpt, **{field: value})
    line = fails(ckpt, tmp_path / "out.gguf")
    # the error names the file and the field (or, for shape contradictions, the tensor and the config's value)
    assert "config.json" in line
    if field not in ("num_hidden_layers", "head_dim", "intermediate_size", "vocab_size", "num_attention_heads",
                     "architectures"):
        assert field in line, line


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"])
def test_missing_required_config_value(ckpt, tmp_path, field):
    set_config(ckpt, **{field: DELETE})
    assert field in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("text", ["[1, 2]", '"config"', "1", "null", "{", "[" * 100_000 + "]" * 100_000,
                                  '{"a":' * 100_000 + "1" + "}" * 100_000, '{"hidden_size": ' + "9" * 5000 + "}",
                                  "\xff\xfe"])
def test_config_json_not_an_object(ckpt, tmp_path, text):
    (ckpt / "config.json").write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    assert "config.json" in fails(ckpt, tmp_path / "out.gguf")


def test_config_json_too_large(ckpt, tmp_path):
    cfg = read(ckpt / "config.json")
    cfg["padding"] = "x" * (17 << 20)
    write_json(ckpt / "config.json", cfg)
    assert "config.json" in fails(ckpt, tmp_path / "out.gguf")


def test_vocab_size_2_pow_40_is_refused_before_padding(ckpt, tmp_path):
    # the token list is padded to vocab_size: 2**40 entries would exhaust memory long before any error
    set_config(ckpt, vocab_size=2**40)
    t0 = time.perf_counter()
    assert "vocab_size" in fails(ckpt, tmp_path / "out.gguf")
    assert time.perf_counter() - t0 < 30


# ---- 2. tensor shapes against the config ---------------------------------------------------------------------

@pytest.mark.parametrize("name,shape", [
    ("model.embed_tokens.weight", [511, 64]),  # an embedding of 511 rows for a vocabulary of 512
    ("model.norm.weight", [65]),  # a norm of 65 for hidden 64
    ("model.layers.0.self_attn.q_proj.weight", [64, 63]),
    ("model.layers.0.mlp.down_proj.weight", [172, 64]),  # transposed
    ("model.layers.1.input_layernorm.weight", [64, 1]),
])
def test_tensor_shape_contradicting_the_config(ckpt, tmp_path, name, shape):
    # the tensor's bytes moved to the end of the file, sized for its new shape, so only the shape is wrong
    p = ckpt / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    count = 1
    for d in shape:
        count *= d
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + 4 * count]}
    text = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(text)) + text + data + bytes(4 * count))
    assert name in fails(ckpt, tmp_path / "out.gguf")


def test_missing_layer_tensor(ckpt, tmp_path):
    rewrite_header(ckpt / "model.safetensors", lambda h: h.pop("model.layers.4.mlp.up_proj.weight") and None)
    assert "blk.4.ffn_up.weight" in fails(ckpt, tmp_path / "out.gguf")


def test_tensor_of_a_layer_beyond_the_config(ckpt, tmp_path):
    def change(h):
        h["model.layers.9.input_layernorm.weight"] = dict(h["model.layers.0.input_layernorm.weight"])
    rewrite_header(ckpt / "model.safetensors", change)
    assert "model.layers.9.input_layernorm.weight" in fails(ckpt, tmp_path / "out.gguf")


# ---- 3. safetensors headers ----------------------------------------------------------------------------------

T = "model.norm.weight"


def _set(field: str, value: Any) -> Callable[[dict], None]:
    return lambda h: h[T].__setitem__(field, value)


@pytest.mark.parametrize("change", [
    _set("dtype", ["F32"]), _set("dtype", "Q9"), _set("dtype", None),
    _set("shape", [2**64]), _set("shape", [1e20]), _set("shape", ["64"]), _set("shape", [-1, -64]),
    _set("shape", None), _set("shape", [1] * 9), _set("shape", 64), _set("shape", [True] * 2),
    _set("data_offsets", ["0", "256"]), _set("data_offsets", None), _set("data_offsets", [0.0, 256.0]),
    _set("data_offsets", [256, 0]), _set("data_offsets", [0, 2**64]), _set("data_offsets", [0]),
    _set("data_offsets", [0, 256, 512]), _set("data_offsets", [-256, 0]),
    lambda h: h.__setitem__(T, [1, 2]),
    lambda h: h.__setitem__("__metadata__", 5),
    lambda h: h[T].__setitem__("data_offsets", list(h["model.layers.0.input_layernorm.weight"]["data_offsets"])),
    lambda h: b"[1, 2]",
    lambda h: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    lambda h: b"\xff" * 16,
], ids=lambda c: "")
def test_bad_safetensors_header(ckpt, tmp_path, change):
    rewrite_header(ckpt / "model.safetensors", change)
    assert "model.safetensors" in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("dtype,size", [("I8", 1), ("U8", 1), ("BOOL", 1), ("I16", 2), ("I32", 4)])
def test_integer_weights_are_refused_before_writing(ckpt, tmp_path, dtype, size):
    def change(h):
        begin = h[T]["data_offsets"][0]
        h[T].update(dtype=dtype, data_offsets=[begin, begin + size * h[T]["shape"][0]])
    rewrite_header(ckpt / "model.safetensors", change)
    assert "dtype" in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 10**12, 0])
def test_safetensors_header_length(ckpt, tmp_path, length):
    p = ckpt / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", length) + raw[8:])
    assert "model.safetensors" in fails(ckpt, tmp_path / "out.gguf")


# ---- 4. the shard index --------------------------------------------------------------------------------------

def shard(folder: Path) -> Path:
    """The sample as one shard with an index, as Hugging Face writes a sharded checkpoint."""
    st = folder / "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(st)
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    names = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {}, "weight_map": {k: st.name for k in names}})
    return folder / "model.safetensors.index.json"


def test_sharded_copy_converts(ckpt, tmp_path):
    shard(ckpt)
    code, _, err = run_cli("convert", str(ckpt), "-o", str(tmp_path / "ok.gguf"), "--type", "F32", "-q")
    assert code == 0, err


@pytest.mark.parametrize("change", [
    lambda i: [1],
    lambda i: {"weight_map": [1]},
    lambda i: {"weight_map": "model.safetensors"},
    lambda i: {"metadata": {}},
    lambda i: {"weight_map": {"model.norm.weight": 5}},
    lambda i: {"weight_map": dict(i["weight_map"], **{"model.norm.weight": "/etc/passwd"})},
    lambda i: {"weight_map": dict(i["weight_map"], **{"model.norm.weight": "../outside.safetensors"})},
    lambda i: {"weight_map": dict(i["weight_map"], **{"model.norm.weight": "sub/../../x.safetensors"})},
    lambda i: {"weight_map": dict(i["weight_map"], **{"model.norm.weight": "model-00002-of-00002.safetensors"})},
    lambda i: {"weight_map": dict(i["weight_map"], **{"model.norm.weight": ""})},
    lambda i: {"weight_map": dict(i["weight_map"], **{"model.extra.weight": "model-00001-of-00001.safetensors"})},
], ids=lambda c: "")
def test_bad_shard_index(ckpt, tmp_path, change):
    idx = shard(ckpt)
    shutil.copy(ckpt / "model-00001-of-00001.safetensors", tmp_path / "outside.safetensors")
    write_json(idx, change(read(idx)))
    line = fails(ckpt, tmp_path / "out.gguf")
    assert "index.json" in line or "model-0000" in line, line


def test_shard_index_nested_deeply(ckpt, tmp_path):
    idx = shard(ckpt)
    idx.write_text('{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "index.json" in fails(ckpt, tmp_path / "out.gguf")


# ---- 5. tokenizer files --------------------------------------------------------------------------------------

def edit(folder: Path, name: str, change: Callable[[dict], Any]) -> None:
    data = read(folder / name)
    result = change(data)
    write_json(folder / name, data if result is None else result)


TOKENIZER_JSON = [
    lambda t: [1],
    lambda t: t.__setitem__("model", "BPE"),
    lambda t: t["model"].__setitem__("type", ["BPE"]),
    lambda t: t.__setitem__("added_tokens", {"a": 1}),
    lambda t: t.__setitem__("added_tokens", [{"id": "x", "content": "a"}]),
    lambda t: t.__setitem__("added_tokens", [{"id": -1, "content": "a"}]),
    lambda t: t.__setitem__("added_tokens", [{"id": 2**40, "content": "a"}]),
    lambda t: t.__setitem__("added_tokens", [{"id": 3, "content": 5}]),
    lambda t: t.__setitem__("added_tokens", [5]),
    lambda t: t.__setitem__("post_processor", [1]),
    lambda t: t["post_processor"].__setitem__("single", "x"),
    lambda t: t["post_processor"].__setitem__("single", [{"SpecialToken": "x"}, {"Sequence": 1}]),
    lambda t: t["post_processor"].__setitem__("single", [{"SpecialToken": {"id": ["<s>"]}}, {}]),
    lambda t: t.__setitem__("post_processor", {"type": "Sequence", "processors": 5}),
    lambda t: t.__setitem__("post_processor", {"type": "RobertaProcessing", "cls": []}),
    lambda t: t.__setitem__("pre_tokenizer", {"type": "Sequence", "pretokenizers": 5}),
    lambda t: t.__setitem__("pre_tokenizer", {"type": "Split", "pattern": "x"}),
    lambda t: t.__setitem__("pre_tokenizer", {"type": "Split", "pattern": {"Regex": ["x"]}}),
    lambda t: t.__setitem__("pre_tokenizer", [1]),
    lambda t: t.__setitem__("normalizer", {"type": "Sequence", "normalizers": [5]}),
    lambda t: t.__setitem__("normalizer", "NFC"),
    lambda t: t.__setitem__("normalizer", {"type": "Sequence", "normalizers": 5}),
]


@pytest.mark.parametrize("change", TOKENIZER_JSON, ids=lambda c: "")
def test_bad_tokenizer_json(ckpt, tmp_path, change):
    edit(ckpt, "tokenizer.json", change)
    assert "tokenizer.json" in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("change", [
    lambda t: t["model"].__setitem__("vocab", [["a", 1]]),
    lambda t: t["model"].__setitem__("vocab", {"a": "1"}),
    lambda t: t["model"].__setitem__("vocab", {"a": -1}),
    lambda t: t["model"].__setitem__("vocab", {"a": 2**40}),
    lambda t: (t["model"].__setitem__("vocab", {}), t.__setitem__("added_tokens", [])),
    lambda t: t["model"].__setitem__("merges", 5),
    lambda t: t["model"].__setitem__("merges", [["a", "b", "c"]]),
    lambda t: t["model"].__setitem__("merges", [[1, 2]]),
], ids=lambda c: "")
def test_bad_bpe_tokenizer_json(ckpt, tmp_path, change):
    # without tokenizer.model the BPE path reads tokenizer.json's vocabulary and merges
    (ckpt / "tokenizer.model").unlink()
    edit(ckpt, "tokenizer.json", change)
    assert "tokenizer.json" in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("change", [
    lambda t: [1],
    lambda t: t.__setitem__("add_prefix_space", "yes"),
    lambda t: t.__setitem__("added_tokens_decoder", []),
    lambda t: t.__setitem__("added_tokens_decoder", {"x": {"content": "a"}}),
    lambda t: t.__setitem__("added_tokens_decoder", {"-1": {"content": "a"}}),
    lambda t: t.__setitem__("added_tokens_decoder", {str(2**40): {"content": "a"}}),
    lambda t: t.__setitem__("added_tokens_decoder", {"3": "a"}),
    lambda t: t.__setitem__("added_tokens_decoder", {"3": {"content": 3}}),
    lambda t: t.__setitem__("chat_template", 5),
    lambda t: t.__setitem__("chat_template", [5]),
    lambda t: t.__setitem__("chat_template", [{"name": 5, "template": "x"}]),
    lambda t: t.__setitem__("chat_template", [{"name": "default", "template": ["x"]}]),
], ids=lambda c: "")
def test_bad_tokenizer_config(ckpt, tmp_path, change):
    edit(ckpt, "tokenizer_config.json", change)
    assert "tokenizer_config.json" in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_tokenizer_files_nested_deeply(ckpt, tmp_path, name):
    (ckpt / name).write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    if name == "generation_config.json":  # ignored when unreadable, as gguf-py does: it must still not trace
        code, _, err = run_cli("convert", str(ckpt), "-o", str(tmp_path / "ok.gguf"), "--type", "F32", "-q")
        assert code == 0, err
    else:
        assert name in fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("field,value", [("temperature", NAN), ("top_k", 2**40), ("top_p", INF),
                                         ("top_p", 1e300), ("top_k", INF)])
def test_bad_generation_config_value(ckpt, tmp_path, field, value):
    edit(ckpt, "generation_config.json", lambda g: g.__setitem__(field, value))
    assert field in fails(ckpt, tmp_path / "out.gguf")


# ---- 6. weights files: regular files inside the folder only --------------------------------------------------

def _subprocess_fails(folder: Path, out: Path) -> str:
    """As fails(), in a subprocess with a timeout: a FIFO that blocks would hang an in-process run."""
    r = qtool("convert", folder, "-o", out, "--type", "F32", timeout=120)
    return check_failure(r.returncode, r.stderr, out)


def test_weights_file_a_fifo(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    assert "FIFO" in _subprocess_fails(ckpt, tmp_path / "out.gguf")


def test_weights_symlink_to_a_fifo(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "pipe")
    (ckpt / "model.safetensors").symlink_to("pipe")
    assert "FIFO" in _subprocess_fails(ckpt, tmp_path / "out.gguf")


def test_config_json_a_fifo(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    assert "config.json" in _subprocess_fails(ckpt, tmp_path / "out.gguf")


def test_tokenizer_model_a_fifo_is_refused_not_skipped(ckpt, tmp_path):
    # skipping it would silently convert with tokenizer.json's vocabulary instead
    (ckpt / "tokenizer.model").unlink()
    os.mkfifo(ckpt / "tokenizer.model")
    assert "tokenizer.model" in _subprocess_fails(ckpt, tmp_path / "out.gguf")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer.model"])
def test_broken_symlink_is_refused_not_skipped(ckpt, tmp_path, name):
    (ckpt / name).unlink()
    (ckpt / name).symlink_to(tmp_path / "missing")
    assert name in fails(ckpt, tmp_path / "out.gguf")


def test_weights_symlink_to_a_device(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to("/dev/zero")
    assert "model.safetensors" in fails(ckpt, tmp_path / "out.gguf")


def test_weights_directory_named_safetensors(ckpt, tmp_path):
    (ckpt / "extra.safetensors").mkdir()
    assert "extra.safetensors" in fails(ckpt, tmp_path / "out.gguf")


def test_weights_symlink_outside_the_folder(ckpt, tmp_path):
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    (ckpt / "model.safetensors").rename(outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    assert "outside the model folder" in fails(ckpt, tmp_path / "out.gguf")


def test_hub_cache_snapshot_links_into_its_blobs(tmp_path):
    # huggingface_hub's layout: snapshots/<rev>/<file> are relative links to ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--karpathy--stories260K"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(EXAMPLE_260K.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    code, _, err = run_cli("convert", str(snap), "-o", str(tmp_path / "ok.gguf"), "--type", "F32", "-q")
    assert code == 0, err


def test_symlink_into_another_repos_blobs_is_refused(tmp_path, ckpt):
    other = tmp_path / "hub" / "models--a--b" / "blobs"
    other.mkdir(parents=True)
    snap = tmp_path / "hub" / "models--c--d" / "snapshots" / "rev"
    shutil.copytree(ckpt, snap)
    (snap / "model.safetensors").rename(other / "blob")
    (snap / "model.safetensors").symlink_to(other / "blob")
    assert "outside the model folder" in fails(snap, tmp_path / "out.gguf")


# ---- 7. output safety ----------------------------------------------------------------------------------------

def test_output_an_existing_directory_is_a_usage_error(ckpt, tmp_path):
    (tmp_path / "dir").mkdir()
    line = fails(ckpt, tmp_path / "dir", code=2)
    assert "is a directory" in line and not list((tmp_path / "dir").iterdir())


def test_output_empty_is_a_usage_error(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("convert", str(ckpt), "-o", "", "--type", "F32")
    check_failure(code, err, tmp_path / "x.gguf", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_imatrix_a_directory_is_a_usage_error(ckpt, tmp_path):
    code, _, err = run_cli("convert", str(ckpt), "-o", str(tmp_path / "o.gguf"), "--calibrate", "default",
                           "--save-imatrix", str(tmp_path))
    check_failure(code, err, tmp_path / "o.gguf", code=2)


def test_imatrix_output_a_directory_is_a_usage_error(tmp_path):
    (tmp_path / "dir").mkdir()
    # the model need not even exist: the output is checked before any work
    code, _, err = run_cli("imatrix", str(tmp_path / "missing.gguf"), "--text", str(tmp_path / "t.txt"),
                           "-o", str(tmp_path / "dir"))
    check_failure(code, err, tmp_path / "dir" / "x", code=2)


@pytest.mark.parametrize("step", ["replace", "fsync"])
def test_failing_fsync_or_rename_leaves_nothing(ckpt, tmp_path, monkeypatch, step):
    def fail(*a, **k):
        raise OSError(5, "Input/output error")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    monkeypatch.setattr(gguf_writer.os, step, fail)
    line = fails(ckpt, out)
    assert str(out) in line and ".partial" not in line


def test_failing_rename_keeps_an_existing_output(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    monkeypatch.setattr(gguf_writer.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
    code, _, err = run_cli("convert", str(ckpt), "-o", str(out), "--type", "F32")
    assert code == 1 and "Traceback" not in err and out.read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_failing_write_names_the_output(tmp_path):
    import numpy as np
    from qtool.errors import QtoolError
    from qtool.formats.constants import GGMLType
    w = gguf_writer.GGUFWriter(tmp_path / "w.gguf")
    w.add_tensor("t", (4,), GGMLType.F32)
    w.open()
    real = w._fh

    class Full:
        def write(self, b):
            raise OSError(28, "No space left on device")

        def close(self):
            real.close()
    w._fh = Full()
    with pytest.raises(QtoolError, match="w.gguf: cannot write: No space left"):
        with w:
            w.write_tensor("t", np.zeros(4, np.float32))
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    for pid in range(4_000_000, 3_000_000, -7919):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
    pytest.skip("no free pid found")


def test_stale_partials_of_killed_runs_are_removed(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    old = time.time() - 2 * 3600
    recent = time.time() - 120
    dead = tmp_path / f".m.gguf.{_dead_pid()}.abcd_123.partial"  # writer gone (kill -9)
    ancient = tmp_path / ".m.gguf.x1y2z3w4.partial"  # an older run's name (no pid), untouched for hours
    live = tmp_path / f".m.gguf.{os.getppid()}.efgh_456.partial"  # a concurrent writer: kept
    fresh = tmp_path / ".m.gguf.q1w2e3r4.partial"  # no pid, recently written: kept
    other = tmp_path / "notes.partial"  # not ours: kept
    for p, t in ((dead, recent), (ancient, old), (live, recent), (fresh, time.time()), (other, old)):
        p.write_bytes(b"x")
        os.utime(p, (t, t))
    code, _, err = run_cli("convert", str(ckpt), "-o", str(out), "--type", "F32")
    assert code == 0, err
    assert not dead.exists() and not ancient.exists()
    assert live.exists() and fresh.exists() and other.exists()
    assert err.count("qtool: warning: removed") == 2, err


def test_temporary_file_name_carries_the_pid(tmp_path):
    from qtool.formats.constants import GGMLType
    w = gguf_writer.GGUFWriter(tmp_path / "w.gguf")
    w.add_tensor("t", (4,), GGMLType.F32)
    w.open()
    try:
        m = gguf_writer.PARTIAL.match(w._tmp.name)
        assert m and int(m.group("pid")) == os.getpid()
    finally:
        w.abort()
    assert list(tmp_path.iterdir()) == []


# ---- the short deterministic fuzz run ------------------------------------------------------------------------

def test_fuzz_checkpoint_mutants_never_trace(tmp_path):
    """Mutated copies of the sample through `convert`: every one converts or is a one-line error (exit 1 or 2)
    with no output and no temporary file left. Any exception escaping main() is a traceback a user would see."""
    import signal
    from fuzz.checkpoint_mutants import checkpoint_mutants

    def hang(signum, frame):  # some mutants are FIFOs: a blocking open must fail the test, not stall it
        raise TimeoutError("convert hung")
    t0 = time.perf_counter()
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    failed = 0
    previous = signal.signal(signal.SIGALRM, hang)
    try:
        for i, (label, mutate) in enumerate(checkpoint_mutants(EXAMPLE_260K, 120, seed=15)):
            folder = tmp_path / f"m{i}"
            shutil.copytree(EXAMPLE_260K, folder)
            mutate(folder)
            signal.alarm(30)
            code, _, err = run_cli("convert", str(folder), "-o", str(out), "--type", "F32", "-q")
            signal.alarm(0)
            if code:
                failed += 1
                check_failure(code, err, out, code)
            else:
                assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.endswith(".partial")], label
                out.unlink()
            shutil.rmtree(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert failed > 60  # the run exercised the checks, not only harmless fields
    assert time.perf_counter() - t0 <= 60


def test_ctrl_c_while_the_temporary_file_is_created_or_removed_is_delayed(tmp_path):
    # an interrupt between creating the file and remembering it (or while removing it) would leave it behind
    import signal
    from qtool.formats.constants import GGMLType
    w = gguf_writer.GGUFWriter(tmp_path / "w.gguf")
    w.add_tensor("t", (4,), GGMLType.F32)
    reached = []
    # Python's own handler, even where the suite was started with SIGINT ignored (a shell's background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        with gguf_writer._signals_held():
            signal.raise_signal(signal.SIGINT)
            w.open()
            reached.append(True)
            w.abort()
    signal.signal(signal.SIGINT, previous)
    assert reached and list(tmp_path.iterdir()) == []
