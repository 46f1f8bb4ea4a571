"""`qtool convert --calibrate TEXT`: the importance matrix computed from the checkpoint itself, layer by layer
(qtool/calibrate.py), then the calibrated conversion, in one command.

The layer-by-layer sums are the same float32 additions in the same order as `qtool imatrix` on the F32 GGUF of
the same checkpoint, so the two matrices are equal exactly; against llama-imatrix's own file the tolerance is
test_imatrix.py's."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLE_260K, EXAMPLE_EVAL, SHARED, qtool_here
from qtool.formats.imatrix import read_imatrix
from qtool.formats.gguf_reader import GGUFFile


def test_layer_by_layer_equals_the_runner(tmp_path, monkeypatch):
    """stories260K (examples/), chunks of 128 tokens run in batches of 64 (the runner's split of a long chunk,
    made small here): every entry's sums and counts equal `qtool imatrix`'s on the F32 file."""
    from qtool import calibrate, model as model_mod
    from qtool import imatrix as im
    monkeypatch.setattr(model_mod, "N_BATCH", 64)
    text = EXAMPLE_EVAL.read_text()
    streamed = calibrate.importance_matrix(str(EXAMPLE_260K), text, "eval", n_ctx=128, max_chunks=5)
    f32 = tmp_path / "f32.gguf"
    qtool_here("convert", EXAMPLE_260K, "--type", "F32", "-o", f32, "--quiet", check=True)
    m = model_mod.Model(f32, n_ctx=128)
    try:
        ran = im.collect(m, text, 128, "eval", 5)
    finally:
        m.close()
    assert streamed.n_chunks == ran.n_chunks == 5
    assert sorted(streamed.data.entries) == sorted(ran.data.entries) and len(ran.data.entries) == 35
    for name, e in ran.data.entries.items():
        s = streamed.data.entries[name]
        np.testing.assert_array_equal(s.counts, e.counts, err_msg=name)
        np.testing.assert_array_equal(s.in_sum2, e.in_sum2, err_msg=name)
        np.testing.assert_array_equal(s.in_sum, e.in_sum, err_msg=name)
    assert streamed.data.chunk_count == ran.data.chunk_count == 5


def test_one_command_equals_convert_with_the_saved_matrix(tmp_path):
    """--calibrate default (the text qtool ships) on a fresh clone: the file equals `convert --imatrix` with the
    matrix it saved, byte for byte, and records the calibration text."""
    one, two, saved = tmp_path / "one.gguf", tmp_path / "two.gguf", tmp_path / "m.imatrix.gguf"
    proc = qtool_here("convert", EXAMPLE_260K, "--type", "Q4_K_M", "--calibrate", "default", "--calibrate-ctx", 64,
                 "--calibrate-chunks", 4, "--save-imatrix", saved, "-o", one, check=True)
    assert "importance matrix from 4 chunks of 64 tokens" in proc.stderr
    data = read_imatrix(saved)
    assert data.chunk_count == 4 and data.datasets == ["qtool default calibration text"]
    qtool_here("convert", EXAMPLE_260K, "--type", "Q4_K_M", "--imatrix", saved, "-o", two, "--quiet", check=True)
    assert one.read_bytes() == two.read_bytes()
    with GGUFFile(one) as g:
        assert g.get("quantize.imatrix.dataset") == "qtool default calibration text"
        assert g.get("quantize.imatrix.chunks_count") == 4


def test_the_default_text_ships_with_its_licence():
    from qtool.calibrate import DEFAULT_TEXT
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    assert text.startswith("qtool default calibration text.") and "CC0" in text.splitlines()[0]
    assert len(text) > 50_000


def test_calibrated_matrix_equals_llama_imatrix(tmp_path):
    """stories260K with the shared calibration text, chunks of 256: the saved matrix is llama-imatrix's."""
    from test_imatrix import assert_equals_llama_imatrix
    ref_path = SHARED / "reference" / "stories260K.imatrix.gguf"
    calib = SHARED / "eval" / "calibration_stories.txt"
    src = SHARED / "models" / "stories260K"
    if not (ref_path.is_file() and calib.is_file() and src.is_dir()):
        pytest.skip("needs ../shared (stories260K, its llama-imatrix file, the calibration text)")
    saved = tmp_path / "m.imatrix.gguf"
    qtool_here("convert", src, "--type", "Q8_0", "--calibrate", calib, "--calibrate-ctx", 256, "--save-imatrix", saved,
          "-o", tmp_path / "m.gguf", "--quiet", check=True)
    data = read_imatrix(saved)
    data.datasets = read_imatrix(ref_path).datasets  # llama-imatrix records the path it was given
    assert_equals_llama_imatrix(data, read_imatrix(ref_path))


@pytest.mark.parametrize("args,message", [
    (["--imatrix", "x.gguf", "--calibrate", "default"], "give one"),
    (["--save-imatrix", "x.gguf"], "needs --calibrate"),
    (["--calibrate", "no-such-text.txt"], "no such calibration text"),
    (["--calibrate", "default", "--calibrate-ctx", "0"], "at least 1"),
])
def test_calibrate_option_errors(tmp_path, args, message):
    proc = qtool_here("convert", EXAMPLE_260K, "--type", "Q4_0", "-o", tmp_path / "o.gguf", *args)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.gguf").exists()
