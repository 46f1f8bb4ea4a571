"""GGUF reader and writer against gguf-py (llama.cpp's own Python GGUF package), and the reader's refusals."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from qtool.errors import QtoolError
from qtool.formats.constants import GGMLType, ValueType
from qtool.formats.gguf_reader import GGUFFile
from qtool.formats.gguf_writer import GGUFWriter

SCALARS = [
    ("t.u8", 200, ValueType.UINT8), ("t.i8", -100, ValueType.INT8), ("t.u16", 60000, ValueType.UINT16),
    ("t.i16", -30000, ValueType.INT16), ("t.u32", 4_000_000_000, ValueType.UINT32),
    ("t.i32", -2_000_000_000, ValueType.INT32), ("t.f32", 1.25, ValueType.FLOAT32), ("t.bool", True, ValueType.BOOL),
    ("t.str", "héllo ▁ 🙂", ValueType.STRING), ("t.u64", 2**63 + 5, ValueType.UINT64),
    ("t.i64", -(2**62), ValueType.INT64), ("t.f64", 3.141592653589793, ValueType.FLOAT64),
]
ARRAYS = [
    ("a.i32", [1, -2, 3], ValueType.INT32), ("a.f32", [0.5, -1.5], ValueType.FLOAT32),
    ("a.str", ["a", "", "ü"], ValueType.STRING), ("a.bool", [True, False], ValueType.BOOL),
    ("a.u8", [], ValueType.UINT8), ("a.f64", [1e300], ValueType.FLOAT64),
]


def write_sample(path, alignment=32):
    w = GGUFWriter(path, alignment=alignment)
    w.add("general.architecture", "llama", ValueType.STRING)
    for key, value, vtype in SCALARS:
        w.add(key, value, vtype)
    for key, value, etype in ARRAYS:
        w.add(key, value, ValueType.ARRAY, etype)
    w.add("a.nested", [(ValueType.INT32, [1, 2]), (ValueType.STRING, ["x", "y"])], ValueType.ARRAY, ValueType.ARRAY)
    rng = np.random.default_rng(0)
    tensors = {"w.f32": rng.standard_normal((3, 5)).astype(np.float32),
               "w.f16": rng.standard_normal((2, 7)).astype(np.float16),
               "w.1d": rng.standard_normal(11).astype(np.float32)}
    types = {"w.f32": GGMLType.F32, "w.f16": GGMLType.F16, "w.1d": GGMLType.F32}
    for name, x in tensors.items():
        w.add_tensor(name, x.shape, types[name])
    with w:
        for name, x in tensors.items():
            w.write_tensor(name, x)
    return tensors


def test_gguf_py_reads_every_metadata_type_we_write(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = write_sample(path)
    r = gguf.GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}
    for key, value, vtype in SCALARS:
        assert fields[key].types == [gguf.GGUFValueType(int(vtype))]
        got = fields[key].contents()
        assert got == pytest.approx(value) if isinstance(value, float) else got == value
    for key, value, etype in ARRAYS:
        want_types = [gguf.GGUFValueType.ARRAY] + ([gguf.GGUFValueType(int(etype))] if value else [])
        assert fields[key].types[:2] == want_types  # gguf-py records no element type for empty arrays
        assert fields[key].contents() == pytest.approx(value) if etype == ValueType.FLOAT32 else \
            fields[key].contents() == value
    assert fields["a.nested"].types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY]
    for t in r.tensors:
        want = tensors[t.name]
        assert tuple(reversed(t.shape.tolist())) == want.shape
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)


def test_our_reader_round_trips_every_type(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = write_sample(path, alignment=64)
    with GGUFFile(path) as g:
        assert g.alignment == 64
        for key, value, vtype in SCALARS:
            assert g.fields[key].type == vtype
            assert g.get(key) == pytest.approx(value) if isinstance(value, float) else g.get(key) == value
        for key, value, etype in ARRAYS:
            assert g.fields[key].elem_type == etype
            assert list(g.get(key)) == pytest.approx(value) if etype == ValueType.FLOAT32 else list(g.get(key)) == value
        nested = g.get("a.nested")
        assert list(nested[0]) == [1, 2] and nested[1] == ["x", "y"]
        for name, x in tensors.items():
            np.testing.assert_array_equal(g.array(name), x)
            assert g.tensors[name].offset % 64 == 0


def test_our_reader_reads_gguf_py_writer_output(tmp_path):
    path = tmp_path / "py.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_string("general.name", "x")
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.add_float32("f", 0.5)
    a = np.arange(64, dtype=np.float32).reshape(2, 32)
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("a", a)
    w.add_tensor("q", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as g:
        assert g.get("general.architecture") == "llama" and g.get("llama.block_count") == 3
        assert g.get("tokenizer.ggml.tokens") == ["a", "b"] and g.get("f") == 0.5
        np.testing.assert_array_equal(g.array("a"), a)
        assert g.tensors["q"].ggml_type == GGMLType.Q8_0 and g.tensors["q"].shape == (2, 32)
        np.testing.assert_array_equal(g.raw("q"), q)


def test_writer_output_is_byte_identical_for_identical_input(tmp_path):
    write_sample(tmp_path / "a.gguf")
    write_sample(tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_writer_leaves_no_partial_file_and_keeps_existing_output(tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")
    w = GGUFWriter(out)
    w.add("general.architecture", "llama", ValueType.STRING)
    w.add_tensor("a", (4,), GGMLType.F32)
    w.add_tensor("b", (4,), GGMLType.F32)
    with pytest.raises(KeyboardInterrupt):
        with w:
            w.write_tensor("a", np.zeros(4, np.float32))
            raise KeyboardInterrupt  # as Ctrl-C would, mid-write
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_writer_refuses_out_of_order_and_wrong_sizes(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_tensor("a", (4,), GGMLType.F32)
    w.add_tensor("b", (4,), GGMLType.F32)
    with pytest.raises(RuntimeError, match="out of order"):
        with w:
            w.write_tensor("b", np.zeros(4, np.float32))
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_tensor("a", (4,), GGMLType.F32)
    with pytest.raises(RuntimeError, match="declared"):
        with w:
            w.write_tensor("a", np.zeros(3, np.float32))
    assert not list(tmp_path.iterdir())


# ---- the reader's refusals: each names the file and the problem --------------------------------------------

def header(n_tensors=0, n_kv=0, version=3, magic=b"GGUF"):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def tensor_info(name=b"t", dims=(32,), ggml_type=0, offset=0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


BAD_FILES = {
    "bad magic": (b"GGML" + b"\0" * 40, "bad magic"),
    "unsupported version": (header(version=7), "unsupported GGUF version 7"),
    "truncated header": (header()[:10], "truncated"),
    "huge kv count": (header(n_kv=2**40), "truncated"),
    "string longer than file": (header(n_kv=1) + struct.pack("<Q", 2**50) + b"key", "truncated"),
    "array count beyond file": (header(n_kv=1) + gguf_string(b"k") + struct.pack("<IIQ", 9, 4, 2**40), "truncated"),
    "unknown value type": (header(n_kv=1) + gguf_string(b"k") + struct.pack("<I", 99) + b"\0" * 8, "unknown metadata"),
    "duplicate key": (header(n_kv=2) + (gguf_string(b"k") + struct.pack("<IB", 0, 1)) * 2 + b"\0" * 16, "duplicate metadata"),
    "unknown tensor type": (header(n_tensors=1) + tensor_info(ggml_type=77) + b"\0" * 64, "unknown type 77"),
    "too many dims": (header(n_tensors=1) + tensor_info(dims=(1, 1, 1, 1, 1)) + b"\0" * 64, "dimensions"),
    "tensor beyond file": (header(n_tensors=1) + tensor_info(offset=1 << 20) + b"\0" * 64, "truncated: tensor"),
    "duplicate tensor": (header(n_tensors=2) + tensor_info() + tensor_info(offset=128) + b"\0" * 512, "duplicate tensor"),
    "misaligned tensor": (header(n_tensors=1) + tensor_info(offset=3) + b"\0" * 256, "not aligned"),
    "partial block": (header(n_tensors=1) + tensor_info(dims=(31,), ggml_type=8) + b"\0" * 256, "multiple"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_reader_rejects_bad_files_with_a_clear_error(tmp_path, case):
    data, expected = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(QtoolError) as e:
        GGUFFile(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_truncating_a_real_file_anywhere_gives_a_clear_error(tmp_path, converted):
    data = converted("stories260K", "Q8_0").read_bytes()
    for cut in (3, 30, 500, 20_000, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(QtoolError, match="truncated|bad magic"):
            GGUFFile(path)


def test_keys_and_tensor_names_are_spelled_as_gguf_py_spells_them():
    """formats/constants.py's Keys and TENSOR_NAMES against gguf-py's (llama-quantize's quantize.imatrix.* keys
    and the imatrix file's tensor suffixes live in llama.cpp's C++ only)."""
    import gguf
    from qtool.formats.constants import TENSOR_NAMES, Keys
    theirs = {v for cls in vars(gguf.Keys).values() if isinstance(cls, type)
              for k, v in vars(cls).items() if isinstance(v, str) and not k.startswith("_")}
    ours = {f"{name}.{k}": v for name, cls in vars(Keys).items() if isinstance(cls, type)
            for k, v in vars(cls).items() if isinstance(v, str) and not k.startswith("_")}
    unknown = {k: v for k, v in ours.items() if v not in theirs and not k.startswith("Quantize.")
               and not v.startswith("{name}.")}
    # newer than the gguf release on PyPI (0.19), already in the gguf-py vendored by llama-cpp-python 0.3.36
    newer = {"Tokenizer.NORMALIZER_LOWERCASE", "Tokenizer.NORMALIZER_STRIP_ACCENTS"}
    assert set(unknown) <= newer
    assert set(TENSOR_NAMES.values()) <= set(gguf.TENSOR_NAMES.values())
