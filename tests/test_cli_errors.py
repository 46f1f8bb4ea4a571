"""Bad input: a clear one-line error, the right exit code, no traceback, and nothing lost."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import qtool


def assert_clean_error(proc, code: int, *phrases: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


@pytest.fixture
def model_copy(tmp_path, stories260k):
    dst = tmp_path / "model"
    shutil.copytree(stories260k, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_truncated_safetensors(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    proc = qtool("convert", model_copy, "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(model_copy, tmp_path):
    (model_copy / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json" + b"\0" * 30)
    proc = qtool("convert", model_copy, "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "model.safetensors", "header")


def test_missing_shard(model_copy, tmp_path):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = qtool("convert", model_copy, "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "model-00002-of-00002.safetensors", "missing")


def test_unknown_architecture_lists_the_supported_ones(model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    proc = qtool("convert", model_copy, "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_pickle_only_folder_is_refused_without_unpickling(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    # a pickle that would create a file if anything unpickled it
    marker = tmp_path / "pwned"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    proc = qtool("convert", model_copy, "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "pytorch_model.bin", "pickle", "safetensors")
    assert not marker.exists()


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = qtool("convert", tmp_path / "empty", "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "config.json")


def test_output_in_a_missing_folder(stories260k, tmp_path):
    proc = qtool("convert", stories260k, "-o", tmp_path / "nope" / "o.gguf")
    assert_clean_error(proc, 1, "does not exist")


def test_unknown_type_is_a_usage_error(stories260k, tmp_path):
    proc = qtool("convert", stories260k, "-o", tmp_path / "o.gguf", "--type", "Q9_9")
    assert proc.returncode in (1, 2) and "Q9_9" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_option_exits_2(stories260k):
    proc = qtool("convert", stories260k, "--frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_nonexistent_source(tmp_path):
    proc = qtool("convert", tmp_path / "no-such-dir", "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, 1, "no-such-dir")


def test_inspect_of_a_non_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"hello world, not gguf")
    proc = qtool("inspect", bad)
    assert_clean_error(proc, 1, "x.gguf", "bad magic")


def test_ctrl_c_mid_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    """SIGINT while a large conversion streams: exit 130, old output intact, no temporary file left."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "scripts"))
    make_checkpoint = pytest.importorskip("make_checkpoint").make_checkpoint
    src = tmp_path / "big"
    make_checkpoint(src, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1536, vocab=32000, dtype="f32")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    out.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-m", "qtool", "convert", str(src), "-o", str(out), "--type", "F32",
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".partial") for p in out_dir.iterdir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0 or out.read_bytes()[:4] == b"GGUF":
        pytest.skip("conversion finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]


def test_refuses_to_overwrite_its_input(tmp_path, converted):
    src = tmp_path / "in.gguf"
    src.write_bytes(converted("stories260K", "F32").read_bytes())
    before = src.read_bytes()
    proc = qtool("convert", src, "-o", src, "--type", "Q8_0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert src.read_bytes() == before


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_nan_in_a_weight_is_an_error_naming_the_tensor(tmp_path, type_name):
    import numpy as np
    from safetensors.numpy import load_file, save_file
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "scripts"))
    from make_checkpoint import make_checkpoint
    src = make_checkpoint(tmp_path / "m", hidden=256, layers=1, heads=4, kv_heads=4, intermediate=512, vocab=512,
                          dtype="f32")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(weights, src / "model.safetensors")
    out = tmp_path / "o.gguf"
    proc = qtool("convert", src, "-o", out, "--type", type_name)
    assert_clean_error(proc, 1, "blk.0.ffn_up.weight", "NaN")
    assert not out.exists() and not list(tmp_path.glob(".o.gguf*"))
