"""The CPU runner against llama.cpp's measured anchors (../shared/reference/llama-cpp-on-*.md): llama-perplexity
-c 256 on the eval text, scoring the second half of each window."""
from __future__ import annotations

import re

import pytest

from conftest import SHARED
from qtool import perplexity
from qtool.model import Model


def anchor(model: str) -> float:
    """The F32 perplexity llama.cpp measured, read from the reference note."""
    path = SHARED / "reference" / f"llama-cpp-on-{model}.md"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return float(re.search(r"F32 PPL = ([\d.]+)", path.read_text()).group(1))


@pytest.mark.parametrize("model", ["stories260K", "stories3M"])
def test_f32_perplexity_equals_llama_cpp(model, converted, eval_text):
    m = Model(converted(model, "F32"), n_ctx=256)
    try:
        r = perplexity.run(m, eval_text, 256)
    finally:
        m.close()
    assert r.n_chunks == 53
    assert r.perplexity == pytest.approx(anchor(model), rel=2e-4)
