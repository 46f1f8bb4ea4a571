"""Shared test fixtures: where the real models and texts are, and running the CLI as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
EXAMPLE_260K = REPO / "examples" / "stories260K"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import llama_oracle as a plain module


def shared_model(name: str) -> Path:
    path = SHARED / "models" / name
    if path.is_dir():
        return path
    if name == "stories260K":
        return EXAMPLE_260K
    pytest.skip(f"{path} is not here")


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_model("stories260K")


@pytest.fixture(scope="session")
def stories3m() -> Path:
    return shared_model("stories3M")


@pytest.fixture(scope="session")
def eval_text() -> str:
    path = SHARED / "eval" / "tinystories_style_eval.txt"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path.read_text()


def qtool(*args: str, check: bool = False, env: dict | None = None, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, as a user would; returns the completed process (text stdout/stderr)."""
    proc = subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qtool {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Convert a shared model once per session and type: converted('stories260K', 'F32') → Path."""
    cache: dict[tuple[str, str], Path] = {}
    folder = tmp_path_factory.mktemp("converted")

    def get(model: str, type_name: str) -> Path:
        key = (model, type_name)
        if key not in cache:
            out = folder / f"{model}.{type_name}.gguf"
            qtool("convert", shared_model(model), "-o", out, "--type", type_name, "--quiet", check=True)
            cache[key] = out
        return cache[key]
    return get
