"""`qtool convert` on the real shared checkpoints: tensors, metadata and tokenizer as llama.cpp expects them."""
from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import sentencepiece
from safetensors.numpy import load_file

from conftest import assert_same_metadata, qtool, qtool_here, shared_model
from qtool.archs import gguf_tensor_name, unpermute_qk
from qtool.formats.gguf_reader import GGUFFile


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def source_tensors(folder) -> dict[str, np.ndarray]:
    """The checkpoint as float32, read by the safetensors package (BF16 through its raw bits)."""
    from safetensors import safe_open
    out = {}
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        for name in f.keys():
            try:
                out[name] = f.get_tensor(name).astype(np.float32)
            except (TypeError, ValueError):  # bf16: numpy has no such dtype
                raw = open(folder / "model.safetensors", "rb").read()
                n = int.from_bytes(raw[:8], "little")
                entry = json.loads(raw[8:8 + n])[name]
                b, e = entry["data_offsets"]
                bits = np.frombuffer(raw[8 + n + b:8 + n + e], dtype="<u2").reshape(entry["shape"])
                out[name] = bf16_to_f32(bits)
    return out


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
def test_f32_tensors_equal_the_source_after_undoing_the_qk_permutation(model, converted, request):
    folder = request.getfixturevalue(model.lower().replace("stories", "stories"))
    config = json.loads((folder / "config.json").read_text())
    src = source_tensors(folder)
    with GGUFFile(converted(model, "F32")) as g:
        expected = {gguf_tensor_name(n): n for n in src}
        assert set(g.tensors) == set(expected)
        for name, hf_name in expected.items():
            got = np.array(g.array(name))
            if ".attn_q." in name:
                got = unpermute_qk(got, config["num_attention_heads"])
            elif ".attn_k." in name:
                got = unpermute_qk(got, config["num_key_value_heads"])
            np.testing.assert_array_equal(got, src[hf_name], err_msg=name)
        tied = config["tie_word_embeddings"]
        assert ("output.weight" in g.tensors) == (not tied)


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
def test_metadata_carries_the_hyperparameters(model, converted, request):
    folder = request.getfixturevalue(model.lower())
    c = json.loads((folder / "config.json").read_text())
    with GGUFFile(converted(model, "Q8_0")) as g:
        md = g.metadata
    assert md["general.architecture"] == "llama"
    assert md["general.file_type"] == 7 and md["general.quantization_version"] == 2
    assert md["llama.block_count"] == c["num_hidden_layers"]
    assert md["llama.context_length"] == c["max_position_embeddings"]
    assert md["llama.embedding_length"] == c["hidden_size"]
    assert md["llama.feed_forward_length"] == c["intermediate_size"]
    assert md["llama.attention.head_count"] == c["num_attention_heads"]
    assert md["llama.attention.head_count_kv"] == c["num_key_value_heads"]
    assert md["llama.rope.dimension_count"] == c["head_dim"]
    assert md["llama.rope.freq_base"] == c["rope_theta"]
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c["rms_norm_eps"])
    assert md["llama.vocab_size"] == c["vocab_size"]
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.eos_token_id"] == 2
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
def test_f32_file_equals_convert_hf_to_gguf(model, converted, llama_convert):
    """Every metadata key (the same keys in llama.cpp's order, value types and values), then the whole file."""
    ours = converted(model, "F32")
    theirs = llama_convert(shared_model(model))
    assert_same_metadata(ours, theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def test_tokenizer_metadata_equals_sentencepiece(stories260k, converted):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories260k / "tokenizer.model"))
    with GGUFFile(converted("stories260K", "F32")) as g:
        tokens = g.get("tokenizer.ggml.tokens")
        scores = g.get("tokenizer.ggml.scores")
        types = g.get("tokenizer.ggml.token_type")
        assert g.get("tokenizer.ggml.model") == "llama" and g.get("tokenizer.ggml.unknown_token_id") == sp.unk_id()
    assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    np.testing.assert_array_equal(scores, np.float32([sp.get_score(i) for i in range(sp.vocab_size())]))
    want = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
            for i in range(sp.vocab_size())]
    assert list(types) == want


def test_f16_and_bf16_round_the_f32_values(converted):
    with GGUFFile(converted("stories3M", "F32")) as f32, GGUFFile(converted("stories3M", "F16")) as f16, \
            GGUFFile(converted("stories3M", "BF16")) as bf16:
        for name, t in f32.tensors.items():
            x = np.array(f32.array(name))
            if len(t.shape) == 1:  # norms stay F32 whatever the type
                assert f16.tensors[name].ggml_type.name == bf16.tensors[name].ggml_type.name == "F32"
                continue
            np.testing.assert_array_equal(f16.array(name), x.astype(np.float16))
            ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16).reshape(x.shape)
            np.testing.assert_array_equal(bf16.array(name), ref)
            # the checkpoint is bf16, so BF16 output is lossless
            np.testing.assert_array_equal(bf16_to_f32(np.array(bf16.array(name))), x)


def test_q8_0_file_dequantizes_close_to_f32(converted):
    with GGUFFile(converted("stories3M", "F32")) as f32, GGUFFile(converted("stories3M", "Q8_0")) as q8:
        for name, t in q8.tensors.items():
            if t.ggml_type.name != "Q8_0":
                continue
            ref = np.array(f32.array(name))
            dq = gguf.quants.dequantize(np.array(q8.raw(name)), gguf.GGMLQuantizationType.Q8_0).reshape(ref.shape)
            rel = np.sqrt(np.mean((dq - ref) ** 2) / np.mean(ref ** 2))
            assert rel < 0.01, (name, rel)


def test_conversion_is_byte_identical_across_runs(tmp_path, stories260k, converted):
    again = tmp_path / "again.gguf"
    qtool_here("convert", stories260k, "-o", again, "--type", "Q8_0", "--quiet", check=True)
    assert again.read_bytes() == converted("stories260K", "Q8_0").read_bytes()


def test_default_output_name_and_summary_line(tmp_path, stories260k):
    proc = qtool("convert", stories260k, "--type", "F16", check=True, cwd=tmp_path)
    out = stories260k.name + ".F16.gguf"
    assert (tmp_path / out).is_file()
    assert f"wrote {out}" in proc.stdout and "bits/weight" in proc.stdout


def test_quiet_prints_nothing(tmp_path, stories260k):
    proc = qtool_here("convert", stories260k, "-o", tmp_path / "q.gguf", "--type", "F32", "--quiet", check=True)
    assert proc.stdout == "" and proc.stderr == ""


def test_hub_repo_id_is_read_from_an_offline_cache(tmp_path, stories260k):
    """A repo id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1 and no network."""
    cache = tmp_path / "hub"
    repo = cache / "models--karpathy--stories260K"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in stories260k.iterdir():
        if f.is_file() and f.suffix != ".md":
            (snap / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "hub.gguf"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = qtool("convert", "karpathy/stories260K", "-o", out, "--type", "F32", env=env)
    assert proc.returncode == 0, proc.stderr
    with GGUFFile(out) as g:
        assert g.get("general.name") == "stories260K" and len(g.tensors) == 47
    proc = qtool("convert", "karpathy/not-cached", "-o", tmp_path / "x.gguf", env=env)
    assert proc.returncode == 1 and "not in the local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_makefile_batch_rules_cover_every_type(tmp_path):
    """The Makefile's pattern rules read the --type names from FILE_TYPES, so a new type needs no Makefile edit."""
    import shutil
    import subprocess
    from conftest import REPO
    from qtool.formats.constants import FILE_TYPES
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    (tmp_path / "models" / "foo").mkdir(parents=True)
    (tmp_path / "models" / "foo" / "config.json").write_text("{}")
    targets = [f"models/foo.{t}.gguf" for t in FILE_TYPES]
    # under `make test` the parent make's flags would reach this make (and print "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(REPO / "Makefile"), *targets], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [line.split("--type ")[1].split()[0] for line in proc.stdout.splitlines()] == list(FILE_TYPES)
