"""Checkpoints with a byte-level BPE tokenizer.json (Llama-3 and Qwen2 layouts): the GGUF's vocabulary makes llama.cpp
and qtool's own tokenizer split text exactly as Hugging Face's `tokenizers` does.

The tokenizers are trained here with `tokenizers` on the eval text (no download), with the pre-tokenizer, specials
and post-processor of the published Llama-3 and Qwen2 tokenizer.json files."""
from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import assert_same_metadata, qtool_here
from llama_oracle import need_llama_cpp
from qtool.formats.gguf_reader import GGUFFile
from qtool.formats.hf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT
from qtool.tokenizer import Tokenizer as QtoolTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_checkpoint import make_checkpoint  # noqa: E402

STYLES = {  # pre-tokenizer name llama.cpp uses, specials (BOS first where there is one), split regex, NFC
    "llama3": ("llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], _LLAMA3_SPLIT, False),
    "qwen2": ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], _QWEN2_SPLIT, True),
}
VARIED = ["Hello  world\n\n  x", "naïve café 日本 🙂🚀", "x = [1, 22, 333, 12345678]\n\tif y:\n    return z", "end  ",
          " leading space", "don't I'M we'll THEY'RE", "\r\n\r\n", "   ", "a\u00a0b", "tabs\t\tand\u3000ideographic"]


def train(style: str, text: str):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    _, specials, split, nfc = STYLES[style]
    tok = tokenizers.Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text, "".join(VARIED) * 20], trainer)
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A",
                                                           special_tokens=[(specials[0], 0)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory, eval_text):
    """(style) → (HF tokenizer, converted GGUF path)."""
    made = {}

    def get(style: str):
        if style not in made:
            tok = train(style, eval_text)
            folder = tmp_path_factory.mktemp(style) / "model"
            make_checkpoint(folder, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128,
                            vocab=tok.get_vocab_size(), dtype="f32", arch="qwen2" if style == "qwen2" else "llama")
            for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (folder / f).unlink(missing_ok=True)
            tok.save(str(folder / "tokenizer.json"))
            specials = STYLES[style][1]
            bos = specials[0] if style == "llama3" else None
            eos = specials[1] if style == "llama3" else specials[0]
            (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
            config = json.loads((folder / "config.json").read_text())
            config.update(bos_token_id=tok.token_to_id(bos) if bos else None, eos_token_id=tok.token_to_id(eos))
            (folder / "config.json").write_text(json.dumps(config))
            out = folder.parent / f"{style}.gguf"
            qtool_here("convert", folder, "-o", out, "--type", "F32", "--quiet", check=True)
            made[style] = tok, out
        return made[style]
    return get


@pytest.mark.parametrize("style", list(STYLES))
def test_vocabulary_metadata(style, bpe_model):
    tok, path = bpe_model(style)
    pre, specials, _, _ = STYLES[style]
    with GGUFFile(path) as g:
        assert g.get("tokenizer.ggml.model") == "gpt2"
        assert g.get("tokenizer.ggml.pre") == pre
        tokens = list(g.get("tokenizer.ggml.tokens"))
        assert tokens == [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
        merges = json.loads(tok.to_str())["model"]["merges"]
        assert list(g.get("tokenizer.ggml.merges")) == [m if isinstance(m, str) else " ".join(m) for m in merges]
        types = list(g.get("tokenizer.ggml.token_type"))
        assert all(types[tok.token_to_id(s)] == 3 for s in specials)  # CONTROL
        assert g.get("tokenizer.ggml.eos_token_id") == tok.token_to_id(specials[1 if style == "llama3" else 0])
        if style == "llama3":
            assert g.get("tokenizer.ggml.bos_token_id") == tok.token_to_id(specials[0])
            assert g.get("tokenizer.ggml.add_bos_token") is True


@pytest.mark.parametrize("style", list(STYLES))
def test_metadata_equals_convert_hf_to_gguf(style, bpe_model, llama_convert):
    """Told the pre-tokenizer (a vocabulary trained here has no hash llama.cpp's converter knows), llama.cpp's
    converter writes the same metadata. (Tensor order differs: it sorts the checkpoint's names.)"""
    _, path = bpe_model(style)
    assert_same_metadata(path, llama_convert(path.parent / "model", STYLES[style][0]))


@pytest.mark.parametrize("style", list(STYLES))
def test_llama_cpp_and_qtool_tokenize_like_tokenizers(style, bpe_model, eval_text):
    llama_cpp = need_llama_cpp()
    tok, path = bpe_model(style)
    add_bos = style == "llama3"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    with GGUFFile(path) as g:
        ours = QtoolTokenizer.from_metadata(g.metadata)
    for text in [eval_text, *VARIED]:
        # llama.cpp applies no Unicode normalization, so Qwen2's NFC is compared on text that is already NFC
        want = tok.encode(text).ids
        assert llm.tokenize(text.encode(), add_bos=add_bos, special=False) == want, text
        assert ours.encode(text, add_bos=add_bos) == want, text
        assert ours.decode(want[1:] if add_bos else want) == (unicodedata.normalize("NFC", text)
                                                              if STYLES[style][3] else text)
    chat = "<|im_start|>user\nhi<|im_end|>" if style == "qwen2" else "<|begin_of_text|>hi<|eot_id|>"
    want = tok.encode(chat, add_special_tokens=False).ids
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == want
    assert ours.encode(chat, add_bos=False, parse_special=True) == want


@pytest.mark.parametrize("style", list(STYLES))
def test_llama_cpp_runs_the_converted_model(style, bpe_model):
    llama_cpp = need_llama_cpp()
    tok, path = bpe_model(style)
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    llm.eval(tok.encode("Once upon a time").ids)
    assert llm.n_tokens == len(tok.encode("Once upon a time").ids)


def test_nfc_is_not_applied_by_llama_cpp(bpe_model):
    """Documented difference, not ours: Qwen2's tokenizer.json normalizes to NFC and llama.cpp does not, so
    decomposed accents split differently; qtool follows llama.cpp (the files are llama.cpp's)."""
    llama_cpp = need_llama_cpp()
    tok, path = bpe_model("qwen2")
    text = "e\u0301"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    with GGUFFile(path) as g:
        ours = QtoolTokenizer.from_metadata(g.metadata)
    assert ours.encode(text, add_bos=False) == llm.tokenize(text.encode(), add_bos=False, special=False)
    assert llm.tokenize(text.encode(), add_bos=False) != tok.encode(text).ids
