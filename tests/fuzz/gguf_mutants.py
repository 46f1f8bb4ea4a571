"""A small deterministic GGUF mutator: from one valid GGUF file, mutated copies that a hostile user could hand us.

Structured mutants are rebuilt by a serializer of its own (not qtool's writer, so writer bugs cannot hide reader
bugs): metadata rewritten to the wrong type, tensor dims zero or 2^64-1, nested arrays, rich markup in strings.
Byte mutants are bit flips, truncations and huge counts at the header. Every mutant is (label, bytes); the same
seed gives the same mutants.
"""
from __future__ import annotations

import random
import struct
from typing import Any, Iterator

import numpy as np

from qtool.formats.constants import VALUE_DTYPES, ValueType
from qtool.formats.gguf_reader import GGUFFile

V = ValueType
Field = tuple[int, Any, "int | None"]  # (vtype, value in writer form, elem type); vtype may be any u32


def _s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def _val(vtype: int, value: Any, elem: int | None) -> bytes:
    if vtype == V.STRING:
        return _s(value)
    if vtype == V.ARRAY:
        if elem == V.ARRAY:
            return struct.pack("<IQ", V.ARRAY, len(value)) + b"".join(_val(V.ARRAY, v, e) for e, v in value)
        head = struct.pack("<IQ", elem, len(value))
        if elem == V.STRING:
            return head + b"".join(_s(v) for v in value)
        return head + np.asarray(value).astype(VALUE_DTYPES[V(elem)]).tobytes()
    if vtype == V.BOOL:
        return struct.pack("<B", 1 if value else 0)
    return np.array(value).astype(VALUE_DTYPES[V(vtype)]).tobytes()


class Model:
    """A parsed valid GGUF file as plain lists, to rewrite and serialize again."""

    def __init__(self, path) -> None:
        with GGUFFile(path) as g:
            self.kv: dict[str, Field] = {k: (f.type, f.writer_value(), f.elem_type) for k, f in g.fields.items()}
            self.tensors = [[t.name, list(reversed(t.shape)), int(t.ggml_type), bytes(g.raw(t.name).tobytes())]
                            for t in g.tensors.values()]
            self.alignment = g.alignment

    def copy(self) -> "Model":
        m = Model.__new__(Model)
        m.kv = dict(self.kv)
        m.tensors = [list(t) for t in self.tensors]
        m.alignment = self.alignment
        return m

    def to_bytes(self) -> bytes:
        out = [struct.pack("<IIQQ", 0x46554747, 3, len(self.tensors), len(self.kv))]
        for k, (vt, v, e) in self.kv.items():
            out.append(_s(k) + struct.pack("<I", vt) + _val(vt, v, e))
        rel = 0
        datas = []
        for name, ne, ty, data in self.tensors:
            out.append(_s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ty, rel))
            pad = -len(data) % self.alignment
            datas.append(data + b"\0" * pad)
            rel += len(data) + pad
        head = b"".join(out)
        return head + b"\0" * (-len(head) % self.alignment) + b"".join(datas)


MARKUP = ["[/]", "[bold]x", "[link=file:///etc/passwd]a[/link]", "[red", "\x1b[31mred", "[/bold red]"]


def semantic_mutants(base: Model, arch: str = "llama") -> Iterator[tuple[str, bytes]]:
    """Valid GGUF structure, wrong meaning: the cases `qtool run` and `inspect` must report in one line."""
    a = lambda k: f"{arch}.{k}"  # noqa: E731
    n_vocab = len(base.kv["tokenizer.ggml.tokens"][1])

    def mut(label: str, **kv: Field | None) -> tuple[str, bytes]:
        m = base.copy()
        for k, v in kv.items():
            k = k.replace("__", ".")
            if v is None:
                m.kv.pop(k, None)
            else:
                m.kv[k] = v
        return label, m.to_bytes()

    emb = a("embedding_length").replace(".", "__")
    yield mut("embedding_length a string", **{emb: (V.STRING, "64", None)})
    yield mut("embedding_length a float", **{emb: (V.FLOAT32, 64.5, None)})
    yield mut("embedding_length an array", **{emb: (V.ARRAY, [64], V.UINT32)})
    yield mut("embedding_length 0", **{emb: (V.UINT32, 0, None)})
    yield mut("block_count a string", **{a("block_count").replace(".", "__"): (V.STRING, "5", None)})
    yield mut("head_count 0", **{a("attention.head_count").replace(".", "__"): (V.UINT32, 0, None)})
    yield mut("rms eps a string", **{a("attention.layer_norm_rms_epsilon").replace(".", "__"): (V.STRING, "x", None)})
    yield mut("rope base an array", **{a("rope.freq_base").replace(".", "__"): (V.ARRAY, [1.0], V.FLOAT32)})
    yield mut("architecture an array", general__architecture=(V.ARRAY, ["llama"], V.STRING))
    yield mut("architecture an int", general__architecture=(V.UINT32, 7, None))
    yield mut("tokens a scalar", tokenizer__ggml__tokens=(V.STRING, "a", None))
    yield mut("tokens an int array", tokenizer__ggml__tokens=(V.ARRAY, list(range(n_vocab)), V.INT32))
    yield mut("tokens shorter than the vocab", tokenizer__ggml__tokens=(
        V.ARRAY, base.kv["tokenizer.ggml.tokens"][1][:10], V.STRING))
    yield mut("tokens nested", tokenizer__ggml__tokens=(V.ARRAY, [(V.STRING, ["a"])], V.ARRAY))
    yield mut("scores a scalar", tokenizer__ggml__scores=(V.FLOAT32, 1.0, None))
    yield mut("scores short", tokenizer__ggml__scores=(V.ARRAY, [0.0] * 5, V.FLOAT32))
    yield mut("scores strings", tokenizer__ggml__scores=(V.ARRAY, ["x"] * n_vocab, V.STRING))
    yield mut("token_type a scalar", tokenizer__ggml__token_type=(V.INT32, 1, None))
    yield mut("token_type short", tokenizer__ggml__token_type=(V.ARRAY, [1] * 3, V.INT32))
    yield mut("bos id NaN", tokenizer__ggml__bos_token_id=(V.FLOAT32, float("nan"), None))
    yield mut("bos id empty string", tokenizer__ggml__bos_token_id=(V.STRING, "", None))
    yield mut("eos id out of range", tokenizer__ggml__eos_token_id=(V.UINT32, 2**31, None))
    yield mut("eos id negative", tokenizer__ggml__eos_token_id=(V.INT32, -3, None))
    yield mut("add_eos_token an array", tokenizer__ggml__add_eos_token=(V.ARRAY, [True], V.BOOL))
    yield mut("add_bos_token a string", tokenizer__ggml__add_bos_token=(V.STRING, "yes", None))
    yield mut("tokenizer model an int", tokenizer__ggml__model=(V.UINT32, 1, None))
    yield mut("chat template an int", tokenizer__chat_template=(V.UINT32, 1, None))
    yield mut("chat template markup", tokenizer__chat_template=(V.STRING, "[/]{{ messages }}", None))
    yield mut("no bos, no add_bos", tokenizer__ggml__bos_token_id=None,
              tokenizer__ggml__add_bos_token=(V.BOOL, False, None))
    ctx = a("context_length").replace(".", "__")
    yield mut("context 2^32-1", **{ctx: (V.UINT32, 2**32 - 1, None)})
    yield mut("context 2^40", **{ctx: (V.UINT64, 2**40, None)})
    yield mut("context 0", **{ctx: (V.UINT32, 0, None)})
    yield mut("context a string", **{ctx: (V.STRING, "512", None)})
    for i, s in enumerate(MARKUP):
        yield mut(f"markup name {i}", general__name=(V.STRING, s, None))
        yield mut(f"markup key {i}", **{f"x{i}__{s}".replace(".", "_"): (V.STRING, s, None)})
    yield mut("nested arrays", general__nested=(V.ARRAY, [(V.UINT8, [1, 2]), (V.STRING, ["[/]"]), (V.INT32, []),
                                                           (V.ARRAY, [(V.FLOAT32, [1.5])])], V.ARRAY))


def tensor_mutants(base: Model) -> Iterator[tuple[str, bytes]]:
    """Tensor infos rewritten: zero and huge dims, a markup name, a wrong type."""
    for i in (0, len(base.tensors) // 2, len(base.tensors) - 1):
        name = base.tensors[i][0]
        for dims in ([0], [0, 0], [0, 0, 2**64 - 1], [2**64 - 1], [2**63, 1], [2**32, 2**32], [1, 0], [2**62, 0]):
            m = base.copy()
            m.tensors[i] = [name, dims, m.tensors[i][2], b""]
            yield f"{name} dims {dims}", m.to_bytes()
        m = base.copy()
        m.tensors[i][0] = "[/]" + name[:40]
        yield f"{name} markup name", m.to_bytes()
        m = base.copy()
        m.tensors[i][2] = 99
        yield f"{name} unknown type", m.to_bytes()


def byte_mutants(data: bytes, n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Bit flips in the header, truncations, and huge counts where the header's counts are."""
    rng = random.Random(seed)
    head = min(len(data), 4096)  # past the header, flips only change weights
    for k in range(n):
        kind = k % 4
        b = bytearray(data)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(head)
                b[pos] ^= 1 << rng.randrange(8)
            yield f"bitflip {k}", bytes(b)
        elif kind == 1:
            yield f"truncate {k}", bytes(b[:rng.randrange(len(data))])
        elif kind == 2:
            pos = rng.choice([8, 16]) if rng.random() < 0.5 else rng.randrange(24, head - 8)
            b[pos:pos + 8] = struct.pack("<Q", rng.choice([2**64 - 1, 2**63, 2**40, 2**32 - 1, 0]))
            yield f"huge count {k}", bytes(b)
        else:
            pos = rng.randrange(head)
            b[pos:pos + 4] = struct.pack("<I", rng.choice([V.ARRAY, V.STRING, 13, 2**32 - 1]))
            yield f"type rewrite {k}", bytes(b)
