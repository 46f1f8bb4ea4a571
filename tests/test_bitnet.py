"""BitNet b1.58 (GGUF `bitnet`): a tiny transformers BitNetForCausalLM, converted by qtool, has the tensors and
metadata llama.cpp's converter writes, and llama.cpp and qtool's runner both give transformers' logits on it.

The projections are ±2^-5 per tensor (ternary, no zeros): the only weights llama.cpp's weight_quant leaves as they
are (with zeros, mean|w| shrinks and so does every weight), so transformers' logits on the checkpoint are the
reference. Its config says hidden_act "silu": transformers' default for BitNet is relu2, llama.cpp's graph
computes SiLU whatever the config says (qtool refuses another activation)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_metadata, qtool
from arch_oracle import l2, llama_cpp_logits, qtool_logits, rel, save_checkpoint, transformers_logits

VOCAB = 512  # the stories260K SentencePiece tokenizer's pieces
IDS = [1] + list(np.random.default_rng(0).integers(3, VOCAB, 47))
C = 2.0 ** -5  # every projection weight is ±C (256-wide rows: TQ1_0 and TQ2_0 blocks)


def _bitnet(folder: Path, ternary: bool, rename_sub_norms: bool = False) -> Path:
    """A BitNetForCausalLM checkpoint (F32, tied embeddings) with the stories260K tokenizer; `rename_sub_norms`
    spells the sub-norms as the 1bitLLM checkpoints do (the only names llama.cpp's converter maps)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BitNetConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                                    max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                                    eos_token_id=2, rms_norm_eps=1e-5)
    cfg.architectures = ["BitNetForCausalLM"]
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(cfg).float()

    def value(name, p):
        if name == "lm_head.weight":
            return None  # tied
        if p.ndim == 1:
            return 1 + 0.2 * torch.randn_like(p)  # norms
        if "proj" in name:
            return C * torch.sign(torch.randn_like(p)) if ternary else 0.05 * torch.randn_like(p)
        return 0.5 * torch.randn_like(p)  # the embedding

    def rename(name):  # the 1bitLLM checkpoints' names of the sub-norms
        return name.replace("attn_sub_norm", "inner_attn_ln").replace("ffn_sub_norm", "ffn_layernorm")
    return save_checkpoint(model, folder, value, rename if rename_sub_norms else (lambda n: n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, {type: qtool's GGUF}) of the ternary checkpoint."""
    tmp = tmp_path_factory.mktemp("bitnet")
    src = _bitnet(tmp / "ckpt", ternary=True)
    out = {}
    for t in ("F16", "F32", "TQ1_0", "TQ2_0"):
        out[t] = tmp / f"m.{t}.gguf"
        qtool("convert", src, "-o", out[t], "--type", t, "--quiet", check=True)
    return src, out


@pytest.fixture(scope="module")
def reference(files):
    return transformers_logits(files[0], IDS)






# test_runner_quant's bounds: both sides round activations to the weight's dot-product type, so summation order
# differs; F32 is test_archs' bound
RUNNER_BOUND = {"F32": 1e-4, "F16": 1e-3, "TQ1_0": 2e-2, "TQ2_0": 2e-2}


def test_tensors_and_metadata_are_llama_cpps(files, tmp_path, llama_convert):
    """llama.cpp's converter maps only the 1bitLLM sub-norm names, so it gets a copy spelled that way, with latent
    (not yet ternary) projections: qtool writes its tensor names, metadata and values, the projections rounded
    to mean|w| × {-1, 0, 1} as BitnetModel.weight_quant does. The transformers spelling gives the same names."""
    from qtool.formats.gguf_reader import GGUFFile
    src = _bitnet(tmp_path / "latent", ternary=False, rename_sub_norms=True)
    ours = tmp_path / "ours.gguf"
    qtool("convert", src, "-o", ours, "--type", "F32", "--quiet", check=True)
    theirs = llama_convert(src)
    assert_same_metadata(ours, theirs)
    with GGUFFile(ours) as a, GGUFFile(theirs) as b, GGUFFile(files[1]["F32"]) as c:
        assert list(a.tensors) == list(b.tensors) == list(c.tensors)
        assert {"blk.1.attn_sub_norm.weight", "blk.1.ffn_sub_norm.weight"} <= set(a.tensors)
        assert a.metadata["general.architecture"] == "bitnet"
        for name in a.tensors:
            got, want = a.array(name), b.array(name)
            if name.startswith("blk.") and "_norm" not in name:
                assert len(np.unique(np.abs(got))) == 2, name  # 0 and the scale
            # the scale is a float32 mean: torch's summation order can differ from qtool's in the last bit
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.parametrize("type_name", ["F32", "F16"])
def test_llama_cpp_logits_equal_transformers(files, reference, type_name):
    tol = {"F32": 1e-4, "F16": 2e-3}[type_name]  # F16 rounds the embedding and norms (measured 3.4e-4), not ±2^-5
    assert rel(llama_cpp_logits(files[1][type_name], IDS), reference) < tol


@pytest.mark.parametrize("type_name", ["F32", "F16", "TQ1_0", "TQ2_0"])
def test_runner_logits_equal_llama_cpps(files, reference, type_name):
    got, want = qtool_logits(files[1][type_name], IDS)[0], llama_cpp_logits(files[1][type_name], IDS)
    err = rel(got, want) if type_name == "F32" else l2(got, want)
    assert err < RUNNER_BOUND[type_name], err
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97
    if type_name == "F32":
        assert rel(got, reference) < 1e-4


def test_ternary_files_hold_the_projections_exactly(files):
    """TQ1_0 / TQ2_0 store the ±2^-5 projections without loss (one scale per 256-value block)."""
    from qtool import kernels
    from qtool.formats.gguf_reader import GGUFFile
    with GGUFFile(files[1]["F32"]) as ref:
        for t in ("TQ1_0", "TQ2_0"):
            with GGUFFile(files[1][t]) as g:
                projections = [n for n in g.tensors if n.startswith("blk.") and "_norm" not in n]
                assert len(projections) == 2 * 7
                for name in projections:
                    info = g.tensors[name]
                    assert info.ggml_type.name == t, name
                    got = kernels.dequantize(info.ggml_type, g.raw(name), info.shape[-1]).reshape(info.shape)
                    np.testing.assert_array_equal(got, ref.array(name), err_msg=name)


def test_per_tensor_scales_multiply_the_products(files, tmp_path):
    """A file whose projections are the codes ±1 with each one's scale in a `.scale` tensor (which llama.cpp's
    bitnet graph reads when present) gives the F32 file's logits in llama.cpp and in the runner."""
    from qtool.formats.constants import GGMLType
    from qtool.formats.gguf_reader import GGUFFile
    from qtool.formats.gguf_writer import GGUFWriter
    out = tmp_path / "scaled.gguf"
    with GGUFFile(files[1]["F32"]) as g:
        tensors = {}
        for name in g.tensors:
            a = np.array(g.array(name), np.float32)
            if name.startswith("blk.") and "_norm" not in name:
                a /= C
                tensors[name.removesuffix(".weight") + ".scale"] = np.array([C], np.float32)
            tensors[name] = a
        writer = GGUFWriter(out)
        for key, f in g.fields.items():
            if key != "general.alignment":
                writer.add(key, f.writer_value(), f.type, f.elem_type)
    assert set(np.unique(np.abs(tensors["blk.0.attn_q.weight"]))) == {1.0}
    for name, a in tensors.items():
        writer.add_tensor(name, a.shape, GGMLType.F32)
    with writer:
        writer.open()
        for name, a in tensors.items():
            writer.write_tensor(name, a)
    want = llama_cpp_logits(files[1]["F32"], IDS)
    assert rel(llama_cpp_logits(out, IDS), want) < 1e-4
    assert rel(qtool_logits(out, IDS)[0], want) < 1e-4


def test_other_activations_are_refused(tmp_path):
    src = _bitnet(tmp_path / "relu2", ternary=True)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu2"}))
    proc = qtool("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1
    assert "hidden_act is 'relu2'" in proc.stderr and "Traceback" not in proc.stderr


def test_an_untied_lm_head_is_refused(tmp_path):
    """llama.cpp's bitnet graph multiplies by token_embd for the logits: a separate lm_head would be ignored."""
    from safetensors.numpy import load_file, save_file
    src = _bitnet(tmp_path / "untied", ternary=True)
    state = load_file(src / "model.safetensors")
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"] * 2}, src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    proc = qtool("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1
    assert "lm_head.weight has no GGUF equivalent: llama.cpp's bitnet graph reads no output" in proc.stderr
