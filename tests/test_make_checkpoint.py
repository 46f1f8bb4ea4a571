"""The synthetic checkpoint generator (scripts/make_checkpoint.py): valid for transformers and safetensors,
deterministic, the same tensors sharded or not, and qtool converts it reproducibly."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, qtool_here

_spec = importlib.util.spec_from_file_location("make_checkpoint", REPO / "scripts" / "make_checkpoint.py")
mc = importlib.util.module_from_spec(_spec)
sys.modules["make_checkpoint"] = mc
_spec.loader.exec_module(mc)

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=600, max_position=128)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_digests(folder: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _read_all(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32, read with the safetensors library (torch for BF16, numpy otherwise)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
        if any(v.get("dtype") == "BF16" for k, v in header.items() if k != "__metadata__"):
            torch = pytest.importorskip("torch")
            from safetensors.torch import load_file
            out.update({k: v.to(torch.float32).numpy() for k, v in load_file(f).items()})
        else:
            from safetensors.numpy import load_file
            out.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny BF16 model, unsharded and in 3 shards; both folders are named 'synth' so that
    general.name (taken from the folder name) is the same in converted files."""
    base = tmp_path_factory.mktemp("pair")
    one = mc.make_checkpoint(base / "one" / "synth", seed=7, **TINY)
    three = mc.make_checkpoint(base / "three" / "synth", seed=7, shards=3, **TINY)
    return one, three


def test_layout(pair):
    one, three = pair
    assert (one / "model.safetensors").is_file() and not (one / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in three.glob("*.safetensors"))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((three / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in three.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in three.glob("*.safetensors"))
    for folder in pair:
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 600
        for name in ("tokenizer.model", "tokenizer_config.json"):
            assert (folder / name).read_bytes() == (REPO / "examples" / "stories260K" / name).read_bytes()
        for f in folder.glob("*.safetensors"):
            n = int.from_bytes(f.read_bytes()[:8], "little")
            assert n % 8 == 0
            assert json.loads(f.read_bytes()[8:8 + n])["__metadata__"] == {"format": "pt"}


def test_sharded_and_unsharded_hold_the_same_tensors(pair):
    a, b = (_read_all(f) for f in pair)
    assert a.keys() == b.keys()
    assert len(a) == 1 + 9 * TINY["layers"] + 1 + 1
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_values_have_realistic_scale(pair):
    t = _read_all(pair[0])
    w = t["model.layers.0.mlp.up_proj.weight"]
    assert w.shape == (128, 64) and abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    n = t["model.layers.1.input_layernorm.weight"]
    assert n.shape == (64,) and abs(n.mean() - 1) < 0.02 and n.std() < 0.05
    assert not np.array_equal(t["model.layers.0.self_attn.q_proj.weight"],
                              t["model.layers.1.self_attn.q_proj.weight"])
    assert t["model.embed_tokens.weight"].shape == (600, 64) and t["lm_head.weight"].shape == (600, 64)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)


def test_deterministic_for_a_seed(tmp_path, pair):
    again = mc.make_checkpoint(tmp_path / "again", seed=7, threads=1, **TINY)
    assert _folder_digests(again) == _folder_digests(pair[0])
    other = mc.make_checkpoint(tmp_path / "other", seed=8, **TINY)
    assert _digest(other / "model.safetensors") != _digest(pair[0] / "model.safetensors")


def test_bf16_rounds_to_nearest_even_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * 0.02,
                        # exact ties: low 16 bits 0x8000, with even and odd upper halves
                        np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x3F80FFFF], np.uint32)
                        .view(np.float32)])
    ours = mc._to_bf16(x.copy())
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("params", [dict(arch="llama", dtype="bf16"),
                                    dict(arch="qwen2", dtype="f16", shards=2),
                                    dict(arch="llama", dtype="f32", tie_embeddings=True)],
                         ids=["llama-bf16", "qwen2-f16-sharded", "llama-f32-tied"])
def test_loads_in_transformers(tmp_path, params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = mc.make_checkpoint(tmp_path / "m", seed=1, **{**TINY, **params})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected_class = "Qwen2ForCausalLM" if params["arch"] == "qwen2" else "LlamaForCausalLM"
    assert type(model).__name__ == expected_class
    stored = _read_all(folder)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, value in stored.items():
        assert np.array_equal(state[name], value), name
    if params.get("tie_embeddings"):
        assert "lm_head.weight" not in stored
        assert np.array_equal(state["lm_head.weight"], stored["model.embed_tokens.weight"])
    if params["arch"] == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in stored
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 600) and torch.isfinite(logits).all()


@pytest.mark.parametrize("type_name", ["F16", "Q8_0"])
def test_convert_is_byte_identical_sharded_or_not_and_when_repeated(tmp_path, pair, type_name):
    one, three = pair
    outs = [tmp_path / "one.gguf", tmp_path / "three.gguf", tmp_path / "one-again.gguf"]
    for src, out in zip((one, three, one), outs):
        qtool_here("convert", src, "-o", out, "--type", type_name, "--quiet", check=True)
    digests = {_digest(o) for o in outs}
    assert len(digests) == 1, "conversions differ"
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(outs[0])
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 600  # 512 pieces padded to the config's vocab_size
