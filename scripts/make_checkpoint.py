#!/usr/bin/env python3
"""Write a synthetic Hugging Face checkpoint: real shapes, random weights, for tests and benchmarks.

    python scripts/make_checkpoint.py OUT_DIR [--hidden 2048 --layers 12 --heads 32 --kv-heads 4
        --intermediate 5632 --vocab 32000 --dtype bf16|f16|f32 --shards N --seed S --arch llama|qwen2|mixtral
        --experts 8 --experts-used 2 --tie-embeddings]

The folder holds `config.json` (LlamaForCausalLM, Qwen2ForCausalLM or MixtralForCausalLM, whose feed-forward is
`experts` SwiGLU experts of `intermediate` each, `experts_used` of them per token), `generation_config.json`, the
weights as `model.safetensors` or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (Hugging
Face's names and index layout), and the SentencePiece tokenizer of examples/stories260K (512 pieces; a larger
`vocab_size` is padded by converters with [PAD] tokens, as llama.cpp does).

Weights are normal with std 0.02, norms 1 + 0.02 * normal, biases std 0.02. For speed (normal sampling runs at
~70 M values/s), each tensor draws its values uniformly from its own table of 65536 normal samples, using 16
random bits per value: the values are iid from that sample, i.e. normal for every practical purpose. The table
and every chunk of indices come from generators seeded by (seed, tensor index, chunk index), so the output is
byte-identical for a seed whatever the sharding or thread count; chunks are generated on several threads (numpy
releases the GIL). Files are
written directly (8-byte header length, JSON header, raw little-endian data) one chunk at a time, so memory stays
at a few chunks however large the model. BF16 is float32 rounded to nearest even, as torch does.

Importable: `make_checkpoint(out_dir, hidden=64, layers=2, ...)` returns the folder's Path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_SRC = REPO / "examples" / "stories260K"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
N_PIECES = 512  # pieces in the stories260K tokenizer
CHUNK = 1 << 22  # values generated per task
TABLE = 1 << 16  # normal samples per tensor that its values are drawn from (indexed by 16 random bits)
DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}
TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "mixtral": ("MixtralForCausalLM", "mixtral")}
DEFAULTS = dict(hidden=2048, layers=12, heads=32, kv_heads=4, intermediate=5632, vocab=32000, dtype="bf16",
                shards=1, seed=0, arch="llama", tie_embeddings=False, head_dim=None, max_position=2048,
                threads=None, experts=8, experts_used=2)


def tensor_specs(p: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in model order (the order of a module's state_dict); kind is weight|norm|bias."""
    h, hd = p["hidden"], p["head_dim"]
    q_out, kv_out = p["heads"] * hd, p["kv_heads"] * hd
    specs = [("model.embed_tokens.weight", (p["vocab"], h), "weight")]
    for i in range(p["layers"]):
        pre = f"model.layers.{i}."
        specs.append((pre + "self_attn.q_proj.weight", (q_out, h), "weight"))
        if p["arch"] == "qwen2":
            specs.append((pre + "self_attn.q_proj.bias", (q_out,), "bias"))
        specs.append((pre + "self_attn.k_proj.weight", (kv_out, h), "weight"))
        if p["arch"] == "qwen2":
            specs.append((pre + "self_attn.k_proj.bias", (kv_out,), "bias"))
        specs.append((pre + "self_attn.v_proj.weight", (kv_out, h), "weight"))
        if p["arch"] == "qwen2":
            specs.append((pre + "self_attn.v_proj.bias", (kv_out,), "bias"))
        specs.append((pre + "self_attn.o_proj.weight", (h, q_out), "weight"))
        ff = p["intermediate"]
        if p["arch"] == "mixtral":  # the router, then each expert's w1 (gate), w2 (down), w3 (up)
            specs.append((pre + "block_sparse_moe.gate.weight", (p["experts"], h), "weight"))
            for e in range(p["experts"]):
                x = f"{pre}block_sparse_moe.experts.{e}."
                specs += [(x + "w1.weight", (ff, h), "weight"), (x + "w2.weight", (h, ff), "weight"),
                          (x + "w3.weight", (ff, h), "weight")]
        else:
            specs += [(pre + "mlp.gate_proj.weight", (ff, h), "weight"),
                      (pre + "mlp.up_proj.weight", (ff, h), "weight"),
                      (pre + "mlp.down_proj.weight", (h, ff), "weight")]
        specs += [(pre + "input_layernorm.weight", (h,), "norm"),
                  (pre + "post_attention_layernorm.weight", (h,), "norm")]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not p["tie_embeddings"]:
        specs.append(("lm_head.weight", (p["vocab"], h), "weight"))
    return specs


def config_json(p: dict) -> dict:
    arch_class, model_type = ARCHS[p["arch"]]
    cfg = {
        "architectures": [arch_class],
        "model_type": model_type,
        "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["head_dim"],
        "vocab_size": p["vocab"],
        "max_position_embeddings": p["max_position"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": p["tie_embeddings"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": TORCH_DTYPE[p["dtype"]],
    }
    if p["arch"] == "llama":
        cfg.update({"rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
                    "mlp_bias": False, "pretraining_tp": 1})
    elif p["arch"] == "mixtral":
        cfg.update({"rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": None,
                    "num_local_experts": p["experts"], "num_experts_per_tok": p["experts_used"],
                    "router_aux_loss_coef": 0.02, "output_router_logits": False})
    else:
        cfg.update({"rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None,
                    "use_sliding_window": False, "sliding_window": None, "max_window_layers": p["layers"]})
    return cfg


# ---- values --------------------------------------------------------------------------------------------------
def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), round to nearest even. Values are finite."""
    bits = x.view(np.uint32)
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) >> 16).astype("<u2")


def _table(seed: int, index: int, kind: str, dtype: str) -> np.ndarray:
    """The tensor's value table: TABLE normal samples (std 0.02; 1 + that for norms) in the stored dtype."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 0)))
    x = rng.standard_normal(TABLE, dtype=np.float32) * np.float32(0.02)
    if kind == "norm":
        x += np.float32(1.0)
    return {"f32": lambda: x.astype("<f4"), "f16": lambda: x.astype("<f2"), "bf16": lambda: _to_bf16(x)}[dtype]()


def _chunk(seed: int, index: int, chunk: int, n: int, table: np.ndarray) -> np.ndarray:
    """n values drawn uniformly from the table, with 16 random bits per value from the chunk's own generator."""
    bitgen = np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index, chunk + 1)))
    idx = bitgen.random_raw(-(-n // 4)).view("<u2")[:n]
    return table.take(idx)


def _tensor_chunks(pool: ThreadPoolExecutor, seed: int, index: int, n: int, kind: str, dtype: str):
    """Yield the tensor's values (arrays of the stored dtype) chunk by chunk, in order, a few chunks in flight."""
    table = _table(seed, index, kind, dtype)
    depth = 2 * pool._max_workers  # noqa: SLF001 - bounded read-ahead
    pending = []
    for c, start in enumerate(range(0, n, CHUNK)):
        pending.append(pool.submit(_chunk, seed, index, c, min(CHUNK, n - start), table))
        if len(pending) >= depth:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


# ---- files ---------------------------------------------------------------------------------------------------
def _header(specs, dtype: str) -> tuple[bytes, int]:
    """Safetensors header bytes (length prefix + JSON padded with spaces to 8 bytes) and the data size."""
    st_dtype, size = DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        nbytes = math.prod(shape) * size
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _split(sizes: list[int], n: int) -> list[int]:
    """Shard number of each tensor: contiguous runs in model order, about total/n bytes each."""
    n = max(1, min(n, len(sizes)))
    total = sum(sizes)
    out, shard, acc = [], 0, 0
    for i, s in enumerate(sizes):
        remaining_tensors = len(sizes) - i
        remaining_shards = n - shard - 1
        # move on when this shard has its share, keeping at least one tensor for every later shard
        if acc and shard < n - 1 and (acc + s / 2 > total * (shard + 1) / n or remaining_tensors <= remaining_shards):
            shard += 1
        out.append(shard)
        acc += s
    return out


def make_checkpoint(out_dir: str | os.PathLike, **params) -> Path:
    """Write the checkpoint into out_dir (created; existing model files in it are replaced)."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown parameters: {', '.join(sorted(unknown))}")
    p = {**DEFAULTS, **params}
    if p["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if p["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}")
    if p["head_dim"] is None:
        if p["hidden"] % p["heads"]:
            raise ValueError("hidden must be a multiple of heads (or give head_dim)")
        p["head_dim"] = p["hidden"] // p["heads"]
    if p["heads"] % p["kv_heads"]:
        raise ValueError("heads must be a multiple of kv_heads")
    if p["head_dim"] % 2:
        raise ValueError("head_dim must be even (RoPE)")
    if p["arch"] == "mixtral" and not 1 <= p["experts_used"] <= p["experts"]:
        raise ValueError("experts_used must be between 1 and experts")
    if p["vocab"] < N_PIECES:
        raise ValueError(f"vocab must be at least {N_PIECES}, the tokenizer's size")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config_json(p), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SRC / name, out / name)

    specs = tensor_specs(p)
    size = DTYPES[p["dtype"]][1]
    shard_of = _split([math.prod(s) * size for _, s, _ in specs], p["shards"])
    n_shards = shard_of[-1] + 1
    names = (["model.safetensors"] if n_shards == 1 else
             [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)])
    threads = p["threads"] or min(8, os.cpu_count() or 1)
    weight_map, total = {}, 0
    with ThreadPoolExecutor(threads) as pool:
        for k, fname in enumerate(names):
            members = [(i, spec) for i, spec in enumerate(specs) if shard_of[i] == k]
            head, data_size = _header([spec for _, spec in members], p["dtype"])
            total += data_size
            tmp = out / f".{fname}.partial"
            with open(tmp, "wb") as fh:
                fh.write(head)
                for i, (name, shape, kind) in members:
                    for buf in _tensor_chunks(pool, p["seed"], i, math.prod(shape), kind, p["dtype"]):
                        fh.write(memoryview(buf).cast("B"))
                    weight_map[name] = fname
            os.replace(tmp, out / fname)
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def n_params(**params) -> int:
    p = {**DEFAULTS, **params}
    if p["head_dim"] is None:
        p["head_dim"] = p["hidden"] // p["heads"]
    return sum(math.prod(s) for _, s, _ in tensor_specs(p))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    ap.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    ap.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    ap.add_argument("--kv-heads", type=int, default=DEFAULTS["kv_heads"])
    ap.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    ap.add_argument("--intermediate", type=int, default=DEFAULTS["intermediate"])
    ap.add_argument("--vocab", type=int, default=DEFAULTS["vocab"])
    ap.add_argument("--max-position", type=int, default=DEFAULTS["max_position"])
    ap.add_argument("--dtype", choices=list(DTYPES), default=DEFAULTS["dtype"])
    ap.add_argument("--shards", type=int, default=DEFAULTS["shards"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--arch", choices=list(ARCHS), default=DEFAULTS["arch"])
    ap.add_argument("--experts", type=int, default=DEFAULTS["experts"], help="mixtral: experts per layer")
    ap.add_argument("--experts-used", type=int, default=DEFAULTS["experts_used"], help="mixtral: experts per token")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="generator threads (default: cores, at most 8)")
    a = ap.parse_args(argv)
    params = {k: getattr(a, k) for k in DEFAULTS}
    try:
        out = make_checkpoint(a.out_dir, **params)
    except ValueError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {n_params(**params):,} parameters, {a.dtype}, {max(1, a.shards)} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
