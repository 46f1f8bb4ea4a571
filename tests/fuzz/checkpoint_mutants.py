"""A small deterministic checkpoint mutator: from one valid checkpoint folder, mutated copies a hostile user could
hand `qtool convert`.

Each mutant is (label, mutate) where mutate(folder) rewrites a fresh copy of the folder in place: a config.json
value replaced by a hostile one (wrong type, NaN, inf, negative, ≥ 2^32, nested), any node of tokenizer.json or
tokenizer_config.json replaced likewise, a safetensors header field rewritten, header bytes flipped, a file
truncated, the weights split into a shard index with a bad weight_map. The same seed gives the same mutants.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

Mutate = Callable[[Path], None]

HOSTILE: list[Any] = ["64", "", "x" * 300, [], [64], [[1]], {}, {"a": 1}, None, True, False, 0, -1, -2**31, 2**31,
                      2**32, 2**40, 2**64, 10**30, 0.5, 64.5, -0.0, 1e308, float("nan"), float("inf"),
                      float("-inf"), "[/]", "\x1b[31m", "../../etc/passwd", "/etc/passwd"]
CONFIG_FIELDS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
                 "intermediate_size", "rms_norm_eps", "rope_theta", "head_dim", "max_position_embeddings",
                 "tie_word_embeddings", "rope_scaling", "rope_parameters", "architectures", "bos_token_id",
                 "eos_token_id", "text_config", "attention_bias", "_name_or_path"]
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "tokenizer.model"]
# what a file of the folder can be instead of a regular file; a FIFO must be refused, never waited on
FILE_KINDS = ["fifo", "symlink to a fifo", "symlink to /dev/zero", "symlink outside", "directory", "symlink loop",
              "empty", "dangling symlink"]
ROPE_SCALING = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_type"]


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _dump(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def _nodes(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths to every node of a JSON tree (long lists sampled at their ends: vocabularies have thousands)."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(value, list):
        idx = range(len(value)) if len(value) <= 8 else [0, 1, len(value) - 1]
        for i in idx:
            yield from _nodes(value[i], path + (i,))


def _replace(tree: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = new
    return tree


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: Any, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def checkpoint_mutants(base: Path, n: int, seed: int = 0) -> Iterator[tuple[str, Mutate]]:
    """`n` mutants of the checkpoint folder `base` (which is only read)."""
    rng = random.Random(seed)
    config = _load(base / "config.json")
    tok_files = [f for f in ("tokenizer.json", "tokenizer_config.json") if (base / f).exists()]
    tok_nodes = {f: list(_nodes(_load(base / f))) for f in tok_files}
    header, _ = _header(base / "model.safetensors")
    tensors = sorted(k for k in header if k != "__metadata__")
    n_head = struct.unpack("<Q", (base / "model.safetensors").read_bytes()[:8])[0]
    for k in range(n):
        kind = k % 9
        if kind == 8:
            name, how = rng.choice(FILES), rng.choice(FILE_KINDS)
            yield f"{name} a {how}", lambda d, name=name, how=how: _file_kind(d, name, how)
            continue
        value = rng.choice(HOSTILE)
        if kind == 0:
            field = rng.choice(CONFIG_FIELDS)
            yield f"config {field}={value!r:.40}", lambda d, f=field, v=value: _dump(
                d / "config.json", {**_load(d / "config.json"), f: v})
        elif kind == 1:
            field = rng.choice(ROPE_SCALING)
            yield f"rope_scaling {field}={value!r:.40}", lambda d, f=field, v=value: _dump(
                d / "config.json", {**_load(d / "config.json"), "rope_scaling": {"rope_type": "llama3", f: v}})
        elif kind in (2, 3):
            name = tok_files[k % len(tok_files)]
            node = rng.choice(tok_nodes[name])
            yield f"{name} {'.'.join(map(str, node))[:50]}={value!r:.40}", lambda d, f=name, p=node, v=value: _dump(
                d / f, _replace(_load(d / f), p, v))
        elif kind == 4:
            t, field = rng.choice(tensors), rng.choice(["dtype", "shape", "data_offsets"])
            pos = rng.randrange(2)
            element = rng.random() < 0.5  # one element of shape / offsets, or the whole field

            def mutate(d: Path, t=t, field=field, v=value, pos=pos, element=element) -> None:
                h, data = _header(d / "model.safetensors")
                if element and isinstance(h[t][field], list) and len(h[t][field]) > pos:
                    h[t][field][pos] = v
                else:
                    h[t][field] = v
                _write_header(d / "model.safetensors", h, data)
            yield f"safetensors {t} {field}{f'[{pos}]' if element else ''}={value!r:.40}", mutate
        elif kind == 5:
            flips = [(rng.randrange(8 + n_head), 1 << rng.randrange(8)) for _ in range(rng.randint(1, 4))]

            def flip(d: Path, flips=flips) -> None:
                b = bytearray((d / "model.safetensors").read_bytes())
                for pos, bit in flips:
                    b[pos] ^= bit
                (d / "model.safetensors").write_bytes(bytes(b))
            yield f"safetensors header bit flips {flips}", flip
        elif kind == 6:
            name = rng.choice(["config.json", "model.safetensors", *tok_files])
            frac = rng.random()

            def truncate(d: Path, name=name, frac=frac) -> None:
                raw = (d / name).read_bytes()
                (d / name).write_bytes(raw[:int(len(raw) * frac)])
            yield f"truncate {name} to {frac:.2f}", truncate
        else:
            t = rng.choice(tensors)

            def shard(d: Path, t=t, v=value) -> None:
                st = d / "model-00001-of-00001.safetensors"
                (d / "model.safetensors").rename(st)
                weight_map = {name: st.name for name in tensors}
                weight_map[t] = v
                _dump(d / "model.safetensors.index.json", {"weight_map": weight_map})
            yield f"index weight_map[{t}]={value!r:.40}", shard


def _file_kind(folder: Path, name: str, how: str) -> None:
    p = folder / name
    outside = folder.parent / f"{folder.name}.outside"
    outside.mkdir(exist_ok=True)
    if how == "symlink outside" and p.exists():
        shutil.copy(p, outside / name)
    if p.exists() or p.is_symlink():
        p.unlink()
    if how == "fifo":
        os.mkfifo(p)
    elif how == "symlink to a fifo":
        os.mkfifo(outside / "pipe")
        p.symlink_to(outside / "pipe")
    elif how == "symlink to /dev/zero":
        p.symlink_to("/dev/zero")
    elif how == "symlink outside":
        p.symlink_to(outside / name)
    elif how == "directory":
        p.mkdir()
    elif how == "symlink loop":
        p.symlink_to(name)
    elif how == "empty":
        p.write_bytes(b"")
    else:
        p.symlink_to(outside / "missing")
