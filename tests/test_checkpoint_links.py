"""Issue 15: config and tokenizer files, like weights, are read only from inside the model folder; a hub cache
snapshot's links into its own blob store stay allowed (that case: tests/test_hardening_checkpoint.py)."""
from __future__ import annotations

import shutil

import pytest

from conftest import EXAMPLE_260K
from fuzz.harness import run_cli


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                  "generation_config.json", "special_tokens_map.json"])
def test_metadata_symlink_outside_the_folder_is_refused(tmp_path, name):
    folder, outside = tmp_path / "model", tmp_path / "elsewhere"
    shutil.copytree(EXAMPLE_260K, folder)
    outside.mkdir()
    (folder / name).rename(outside / name)
    (folder / name).symlink_to(outside / name)
    out = tmp_path / "out.gguf"
    code, _, err = run_cli("convert", str(folder), "-o", str(out), "--type", "F32", "-q")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "outside the model folder" in lines[0] and name in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model"]  # no output, no temp file


def test_metadata_symlink_inside_the_folder_is_followed(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(EXAMPLE_260K, folder)
    (folder / "config.json").rename(folder / "real-config.json")
    (folder / "config.json").symlink_to("real-config.json")
    code, _, err = run_cli("convert", str(folder), "-o", str(tmp_path / "ok.gguf"), "--type", "F32", "-q")
    assert code == 0, err
