"""Mixture of experts: tiny transformers MixtralForCausalLM (GGUF `llama` with experts) and Qwen3MoeForCausalLM
(`qwen3moe`) checkpoints, converted by qtool, have the tensors and metadata llama.cpp's converter writes (experts
stacked into blk.N.ffn_{gate,up,down}_exps, the router blk.N.ffn_gate_inp), llama.cpp's logits on them are
transformers', and qtool's runner (router softmax, top-k, renormalized weights, per-expert SwiGLU) gives llama.cpp's.

4 experts, 2 used per token, expert rows of 256: whole K-quant blocks, so Q4_K_M quantizes every expert tensor.
The router weights are large enough that tokens spread over every expert (checked through the imatrix counts)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE_EVAL, assert_same_metadata, qtool_here
from arch_oracle import l2, llama_cpp_logits, qtool_logits, rel, transformers_logits
from llama_oracle import need_llama_cpp

REPO = Path(__file__).resolve().parent.parent
HIDDEN, N_EXPERT, N_USED, N_CTX = 256, 4, 2, 64
CHECKPOINTS = ("mixtral", "qwen3moe")


def _checkpoint(folder: Path, kind: str) -> tuple[Path, list[int], str | None]:
    """(folder, prompt ids, the pre-tokenizer name llama.cpp's converter must be told) of a seeded random MoE
    checkpoint saved by transformers (which writes each expert's weights apart, as published checkpoints do)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=N_USED, max_position_embeddings=128)
    folder.mkdir(parents=True)
    if kind == "mixtral":  # the stories260K SentencePiece vocabulary, untied output
        vocab, pre = 512, None
        cfg = transformers.MixtralConfig(vocab_size=vocab, intermediate_size=256, num_local_experts=N_EXPERT,
                                         bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, **common)
        cfg.architectures = ["MixtralForCausalLM"]
        model_class = transformers.MixtralForCausalLM
        for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(REPO / "examples" / "stories260K" / f, folder / f)
    else:  # Qwen2MoeModel's converter reads only a BPE tokenizer.json: one trained here, tied embeddings
        from test_convert_bpe import STYLES, train
        tok = train("qwen2", EXAMPLE_EVAL.read_text())
        vocab, pre = tok.get_vocab_size(), STYLES["qwen2"][0]
        eos = tok.token_to_id(STYLES["qwen2"][1][0])
        cfg = transformers.Qwen3MoeConfig(vocab_size=vocab, intermediate_size=512, moe_intermediate_size=256,
                                          num_experts=N_EXPERT, head_dim=128, norm_topk_prob=True,
                                          tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos,
                                          rms_norm_eps=1e-6, **common)
        cfg.architectures = ["Qwen3MoeForCausalLM"]
        model_class = transformers.Qwen3MoeForCausalLM
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    model = model_class(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # norms
            elif "embed" in name or "lm_head" in name or name.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))  # embeddings and routers
            else:
                p.copy_(0.05 * torch.randn_like(p))  # projections and experts
    model.save_pretrained(folder)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, vocab, 48)]
    return folder, ids, pre


@pytest.fixture(scope="module", params=CHECKPOINTS)
def moe(request, tmp_path_factory):
    """{kind, src, ids, pre, files: {type: qtool's GGUF}, reference: transformers' logits}."""
    tmp = tmp_path_factory.mktemp(request.param)
    src, ids, pre = _checkpoint(tmp / "ckpt", request.param)
    files = {}
    for t in ("F32", "Q4_K_M"):
        files[t] = tmp / f"m.{t}.gguf"
        qtool_here("convert", src, "-o", files[t], "--type", t, "--quiet", check=True)
    reference = transformers_logits(src, ids)
    return dict(kind=request.param, src=src, ids=ids, pre=pre, files=files, reference=reference)






def test_tensors_and_metadata_are_llama_cpps(moe, llama_convert):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same metadata (keys, order, types, values,
    the "4x…" size label among them), and the same tensors (names, order, shapes, types, values): each layer's
    experts stacked in the converter's order where its last expert is read."""
    from qtool.formats.gguf_reader import GGUFFile
    ours, theirs = moe["files"]["F32"], llama_convert(moe["src"], moe["pre"])
    assert_same_metadata(ours, theirs)
    arch = "llama" if moe["kind"] == "mixtral" else "qwen3moe"
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert a.metadata["general.architecture"] == arch
        assert (a.metadata[f"{arch}.expert_count"], a.metadata[f"{arch}.expert_used_count"]) == (N_EXPERT, N_USED)
        assert a.metadata["general.size_label"].startswith(f"{N_EXPERT}x")
        assert list(a.tensors) == list(b.tensors)
        for kind in ("gate", "up", "down"):
            assert tuple(a.tensors[f"blk.1.ffn_{kind}_exps.weight"].shape) == (N_EXPERT, 256, 256)
        assert tuple(a.tensors["blk.1.ffn_gate_inp.weight"].shape) == (N_EXPERT, HIDDEN)
        assert not any(n.startswith("blk.0.ffn_gate.") for n in a.tensors)
        for name in a.tensors:
            ta, tb = a.tensors[name], b.tensors[name]
            assert (tuple(ta.shape), ta.ggml_type) == (tuple(tb.shape), tb.ggml_type), name
            np.testing.assert_array_equal(a.array(name), b.array(name), err_msg=name)
    assert ours.read_bytes() == theirs.read_bytes()  # and so the same file, byte for byte


def test_requantizing_equals_llama_quantize(moe, tmp_path):
    """llama.cpp's quantizer on qtool's F32 file (3-D expert tensors quantized row by row over all experts, the
    router kept F32): qtool's Q4_K_M of the same file is byte-identical, and the checkpoint converted directly has
    the same tensors (types and bytes)."""
    import ctypes
    from test_quantize_files import assert_same_file
    from qtool.formats.constants import FILE_TYPES
    from qtool.formats.gguf_reader import GGUFFile
    llama_cpp = need_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(FILE_TYPES["Q4_K_M"]), 2
    theirs, ours = tmp_path / "llama.Q4_K_M.gguf", tmp_path / "ours.Q4_K_M.gguf"
    assert llama_cpp.llama_model_quantize(str(moe["files"]["F32"]).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    qtool_here("convert", moe["files"]["F32"], "-o", ours, "--type", "Q4_K_M", "--quiet", check=True)
    assert_same_file(ours, theirs)
    with GGUFFile(moe["files"]["Q4_K_M"]) as a, GGUFFile(theirs) as b:
        assert set(a.tensors) == set(b.tensors)
        for name, t in b.tensors.items():
            assert a.tensors[name].ggml_type == t.ggml_type, name
            assert (a.raw(name) == b.raw(name)).all(), name
        assert b.tensors["blk.0.ffn_gate_inp.weight"].ggml_type.name == "F32"
        assert {b.tensors[f"blk.0.ffn_{k}_exps.weight"].ggml_type.name for k in ("gate", "up")} == {"Q4_K"}


def test_llama_cpp_logits_equal_transformers(moe):
    assert rel(llama_cpp_logits(moe["files"]["F32"], moe["ids"]), moe["reference"]) < 1e-4


# F32 is test_archs' bound (measured 1.4e-6). Q4_K_M: one token at a time both sides take the same integer dot
# products, so qtool's decode equals llama.cpp's own token-by-token logits (measured 2.6e-7); a prompt as one
# batch differs as test_qwen3's does (qtool multiplies dequantized tiles in float, and llama.cpp's own batch and
# token-by-token logits differ by 1.5e-2 on qwen3moe: a flipped activation code or routing near a tie), measured
# 5.2e-3 (Mixtral) and 1.2e-2 (Qwen3-MoE) relative L2.
RUNNER_BOUND = {"F32": 1e-4, "Q4_K_M": 2e-2}
DECODE_BOUND = 1e-5


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_runner_logits_equal_llama_cpps(moe, type_name):
    ids = moe["ids"]
    path = moe["files"][type_name]
    (got, decoded), want = qtool_logits(path, ids, 12), llama_cpp_logits(path, ids)
    if type_name == "F32":
        assert rel(got, want) < RUNNER_BOUND[type_name]
        assert rel(decoded, want[:12]) < RUNNER_BOUND[type_name]
        assert rel(got, moe["reference"]) < 1e-4
    else:
        assert l2(got[:1], want[:1]) < DECODE_BOUND  # the products alone: position 0 attends only to itself
        assert l2(got, want) < RUNNER_BOUND[type_name]
        assert l2(decoded, llama_cpp_logits(path, ids[:12], one_at_a_time=True)) < DECODE_BOUND
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97


def _llama_imatrix() -> Path | None:
    """llama.cpp's llama-imatrix when one is built (LLAMA_CPP_BIN, PATH, or the benchmarks' cache); never built
    here."""
    env = os.environ.get("LLAMA_CPP_BIN")
    for cand in ([Path(env) / "llama-imatrix"] if env else []) + [
            Path(p) for p in [shutil.which("llama-imatrix")] if p] + [
            Path("~/.cache/qtool-bench/llama-build/bin/llama-imatrix").expanduser()]:
        if cand.is_file():
            return cand
    return None


IMATRIX_ARGS = ("--ctx", 32, "--chunks", 3)
CALIBRATE_ARGS = ("--calibrate", EXAMPLE_EVAL, "--calibrate-ctx", 32, "--calibrate-chunks", 3)


@pytest.fixture(scope="module")
def moe_imatrix(moe, tmp_path_factory) -> Path:
    """`qtool imatrix` on the F32 file, 3 chunks of 32 tokens of the bundled evaluation text."""
    out = tmp_path_factory.mktemp("imatrix") / "q.imatrix.gguf"
    qtool_here("imatrix", moe["files"]["F32"], "--text", EXAMPLE_EVAL, "-o", out, *IMATRIX_ARGS, "--quiet",
               check=True)
    return out


def test_imatrix_has_llama_imatrixs_expert_entries(moe, moe_imatrix, tmp_path):
    """`qtool imatrix` on the F32 file: every expert tensor an (n_expert, cols) entry with per-expert counts, as
    llama-imatrix's MUL_MAT_ID statistics (entries and counts exactly, Σx² within 1e-3: attention through each
    side's F16 KV cache), and --calibrate's layer-by-layer matrix from the checkpoint equals it exactly."""
    from qtool import calibrate
    from qtool.formats.imatrix import read_imatrix
    text = EXAMPLE_EVAL.read_text()
    got = read_imatrix(moe_imatrix)
    names = sorted(got.entries)
    assert len(names) == 2 * 8  # per layer: q, k, v, output, the router, the three expert tensors
    for i in range(2):
        for k in ("gate", "up", "down"):
            e = got.entries[f"blk.{i}.ffn_{k}_exps.weight"]
            assert e.in_sum2.shape == (N_EXPERT, 256)
            assert e.counts.sum() == 3 * 32 * N_USED and (e.counts > 0).all()  # every expert is used
    streamed = calibrate.importance_matrix(str(moe["src"]), text, "eval", n_ctx=32, max_chunks=3)
    assert sorted(streamed.data.entries) == names and streamed.data.chunk_count == got.chunk_count == 3
    for name in names:
        np.testing.assert_array_equal(streamed.data.entries[name].counts, got.entries[name].counts, err_msg=name)
        np.testing.assert_array_equal(streamed.data.entries[name].in_sum2, got.entries[name].in_sum2, err_msg=name)
    tool = _llama_imatrix()
    if tool is None:
        pytest.skip("no llama-imatrix binary built (scripts/bench_quality.py builds one)")
    theirs = tmp_path / "l.imatrix.gguf"
    subprocess.run([str(tool), "-m", str(moe["files"]["F32"]), "-f", str(EXAMPLE_EVAL), "-o", str(theirs), "-c", "32",
                    "--chunks", "3", "-t", "2", "--no-ppl"], check=True, capture_output=True, timeout=120)
    ref = read_imatrix(theirs)
    assert sorted(ref.entries) == names and ref.chunk_count == got.chunk_count
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(got.entries[name].counts, e.counts, err_msg=name)
        assert np.abs(got.entries[name].in_sum2 - e.in_sum2).max() <= 1e-3 * np.abs(e.in_sum2).max(), name


def _llama_quantize_with(src: Path, out: Path, type_name: str, imatrix: Path) -> None:
    """llama-quantize --imatrix: llama_model_quantize given each entry's in_sum2 / counts."""
    import ctypes
    from test_quantize_files import _imatrix_param
    from qtool.formats.constants import FILE_TYPES
    llama_cpp = need_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(FILE_TYPES[type_name]), 2
    keep = _imatrix_param(llama_cpp, params, imatrix)  # noqa: F841 (the buffers must outlive the call)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0


def test_imatrix_quantization_equals_llama_quantize(moe, moe_imatrix, tmp_path):
    """`convert --imatrix` on the F32 file: llama.cpp's quantizer given the same importance (each expert's rows of
    a stacked tensor quantized with that expert's row of the entry) writes the same file, but the
    quantize.imatrix.* keys, which the llama-quantize tool adds. Q4_K_M on both checkpoints, and on Mixtral IQ2_XXS
    (refused without an imatrix: the lattice quantizers; ~2 s for both sides, so once). The expert tensors differ from the
    file without an imatrix, so the weights were used; --calibrate from the checkpoint gives the same tensors as
    --imatrix with the matrix of its F32 file."""
    from test_quantize_files import assert_same_file
    from qtool.formats.gguf_reader import GGUFFile
    experts = [f"blk.{i}.ffn_{k}_exps.weight" for i in range(2) for k in ("gate", "up", "down")]
    main_type = {"Q4_K_M": "Q4_K", "IQ2_XXS": "IQ2_XXS"}  # what the recipe gives the gate and up experts
    for type_name in ["Q4_K_M"] + (["IQ2_XXS"] if moe["kind"] == "mixtral" else []):
        theirs, ours = tmp_path / f"llama.{type_name}.gguf", tmp_path / f"ours.{type_name}.gguf"
        _llama_quantize_with(moe["files"]["F32"], theirs, type_name, moe_imatrix)
        qtool_here("convert", moe["files"]["F32"], "-o", ours, "--type", type_name, "--imatrix", moe_imatrix,
                   "--quiet", check=True)
        assert_same_file(ours, theirs, skip_keys=("quantize.imatrix.",))
        with GGUFFile(ours) as a:
            assert a.tensors["blk.0.ffn_up_exps.weight"].ggml_type.name == main_type[type_name]
    with GGUFFile(tmp_path / "ours.Q4_K_M.gguf") as a, GGUFFile(moe["files"]["Q4_K_M"]) as plain:
        assert all(not np.array_equal(a.raw(n), plain.raw(n)) for n in experts)
    calibrated = tmp_path / "calibrated.gguf"
    qtool_here("convert", moe["src"], "-o", calibrated, "--type", "Q4_K_M", *CALIBRATE_ARGS, "--quiet", check=True)
    with GGUFFile(calibrated) as c, GGUFFile(tmp_path / "ours.Q4_K_M.gguf") as a:
        assert set(c.tensors) == set(a.tensors)  # in the checkpoint's order, not llama-quantize's
        for name, t in a.tensors.items():
            assert c.tensors[name].ggml_type == t.ggml_type and np.array_equal(c.raw(name), a.raw(name)), name


def test_inspect_shows_experts_and_the_bytes_a_token_reads(moe):
    """`qtool inspect` on the Q4_K_M file: experts per layer and used per token, and what one token's forward pass
    reads: every tensor whole but each expert tensor's N_USED of N_EXPERT experts (sizes from gguf-py)."""
    import gguf
    path = moe["files"]["Q4_K_M"]
    r = json.loads(qtool_here("inspect", path, "--json", check=True).stdout)
    ref = gguf.GGUFReader(path)
    experts = [t for t in ref.tensors if "_exps." in t.name]
    assert len(experts) == 2 * 3
    dense = sum(int(t.n_bytes) for t in ref.tensors if t not in experts)
    assert (r["expert_count"], r["expert_used_count"]) == (N_EXPERT, N_USED)
    assert r["bytes_per_token"] == dense + sum(int(t.n_bytes) * N_USED // N_EXPERT for t in experts)
    assert r["tensor_bytes"] - r["bytes_per_token"] == sum(int(t.n_bytes) for t in experts) // 2  # half the experts
    assert r["active_parameters"] == r["parameters"] - sum(int(t.n_elements) for t in experts) // 2
    assert {row["layer"]: row["experts"] for row in r["layers"]} == {
        row["layer"]: N_EXPERT if row["layer"].isdigit() else 0 for row in r["layers"]}
    text = qtool_here("inspect", path, check=True).stdout
    assert f"{N_EXPERT} per layer, {N_USED} used per token" in text
    assert f"{r['bytes_per_token'] / 1e6:,.2f} MB read, {r['active_parameters']:,} parameters" in text


def _edited(src: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **changes}))
    return out


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts_per_tok=5), "5 experts used per token, but there are only 4"),
    (dict(norm_topk_prob=False), "norm_topk_prob is false"),
    (dict(num_local_experts=3, num_experts=3), "expert 3 does not exist"),
])
def test_inconsistent_expert_configs_are_refused(moe, tmp_path, changes, message):
    """One-line errors before anything is written: more experts used than there are, a routing llama.cpp's graph
    does not compute, expert tensors the config does not count."""
    src = _edited(moe["src"], tmp_path, **changes)
    proc = qtool_here("convert", src, "-o", tmp_path / "x.gguf", "--type", "F16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_eight_expert_recipes_equal_llama_quantize(tmp_path):
    """llama-quantize's rules for 8-expert models (Mixtral-8x7B: attn_v and attn_k bumped to Q8_0, ffn_down by
    its layer number) on a 2-layer, 8-expert checkpoint: qtool gives every tensor llama.cpp's type."""
    import ctypes
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama_cpp = need_llama_cpp()
    from qtool import recipes
    from qtool.formats.constants import FILE_TYPES
    from qtool.formats.gguf_reader import GGUFFile
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128)
    cfg.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(0)
    src = tmp_path / "mix8"
    transformers.MixtralForCausalLM(cfg).float().save_pretrained(src)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(REPO / "examples" / "stories260K" / f, src / f)
    f32 = tmp_path / "mix8.F32.gguf"
    qtool_here("convert", src, "-o", f32, "--type", "F32", "--quiet", check=True)
    with GGUFFile(f32) as g:
        facts = recipes.ModelFacts.from_gguf_kv(g.metadata)
        shapes = [(n, tuple(t.shape)) for n, t in g.tensors.items()]
    assert facts.n_expert == 8
    for ftype in ("Q2_K", "Q3_K_M", "Q4_K_M"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = int(FILE_TYPES[ftype]), 2
        out = tmp_path / f"{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
        with GGUFFile(out) as q:
            theirs = {n: t.ggml_type for n, t in q.tensors.items()}
        ours = {p.name: p.ggml_type for p in recipes.plan_types(ftype, shapes, facts) if p.quantizable}
        assert ours == {n: theirs[n] for n in ours}, ftype
        assert theirs["blk.0.attn_v.weight"].name == "Q8_0"
