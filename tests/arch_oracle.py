"""What the per-architecture tests (test_bitnet, test_qwen3, test_moe, test_gemma) share: a tiny random
checkpoint saved as Hugging Face writes it, the logits of a prompt from transformers, llama.cpp and qtool's runner,
and the two measures their bounds are written in."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llama_oracle import need_llama_cpp

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "examples" / "stories260K"  # SentencePiece, 512 pieces
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_checkpoint(model, folder: Path, value: Callable, rename: Callable[[str], str] = lambda n: n,
                    tokenizer: Path | None = TOKENIZER) -> Path:
    """model's state dict with each tensor replaced by value(name, tensor) (None: left out, as a tied lm_head),
    names mapped by `rename`, written as model.safetensors with its config and the stories260K tokenizer."""
    from safetensors.torch import save_file
    state = {}
    for name, p in model.state_dict().items():
        v = value(name, p)
        if v is not None:
            state[rename(name)] = v.contiguous()
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        for f in TOKENIZER_FILES:
            shutil.copy(tokenizer / f, folder / f)
    return folder


def transformers_logits(folder: Path, ids: list[int], **kw) -> np.ndarray:
    """transformers' float32 logits (T, vocab) of the prompt on the checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int = 64, one_at_a_time: bool = False) -> np.ndarray:
    """llama.cpp's logits (T, vocab) of the prompt (an F32 KV cache); one_at_a_time: batches of one token."""
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0, **({"n_batch": 1, "n_ubatch": 1} if one_at_a_time else {}))
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def qtool_logits(path: Path, ids: list[int], decoded: int = 0, n_ctx: int = 64,
                 patch: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """qtool's logits of the prompt as one batch, and of its first `decoded` tokens one at a time (the decode
    kernels), with an F32 KV cache; `patch(model)` may change the loaded model first."""
    from qtool.model import Model
    m = Model(path, n_ctx=n_ctx, kv_type="f32")
    try:
        if patch:
            patch(m)
        batch = m.eval(ids, all_logits=True)
        m.reset()
        return batch, np.stack([m.eval(ids[i:i + 1]) for i in range(decoded)]) if decoded else batch[:0]
    finally:
        m.close()


def rel(got: np.ndarray, want: np.ndarray) -> float:
    """test_archs' measure: the largest error relative to the largest logit."""
    assert want.std() > 0
    return float(np.abs(got - want).max() / np.abs(want).max())


def l2(got: np.ndarray, want: np.ndarray) -> float:
    """test_runner_quant's measure for quantized files: relative L2 error over all positions."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def greedy_texts(path: Path, prompt: list[int], n_new: int, n_ctx: int) -> tuple[list[int], list[int], float]:
    """Greedy continuations of the prompt by llama.cpp and by qtool's runner (F32 KV caches, one token per step
    after the prompt), and the smallest top-2 margin of llama.cpp's logits (a near-tie could flip either way)."""
    llama_cpp = need_llama_cpp()
    from qtool.model import Model
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    theirs, margins = list(prompt), []
    llm.eval(prompt)
    while len(theirs) < len(prompt) + n_new:
        logits = np.array(llm.scores[llm.n_tokens - 1])
        top = np.sort(logits)[-2:]
        margins.append(float(top[1] - top[0]))
        theirs.append(int(np.argmax(logits)))
        llm.eval(theirs[-1:])
    del llm
    m = Model(path, n_ctx=n_ctx, kv_type="f32")
    try:
        ours = list(prompt)
        logits = m.eval(prompt)
        while len(ours) < len(theirs):
            ours.append(int(np.argmax(logits)))
            logits = m.eval(ours[-1:])
    finally:
        m.close()
    return ours, theirs, min(margins)
