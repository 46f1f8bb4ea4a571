"""The runner's tokenizer (qtool/tokenizer.py) against the reference tokenizers, from GGUF-style metadata alone.

SentencePiece ("llama"): the real stories260K model, compared with the `sentencepiece` library. That model folds
whitespace runs and llama.cpp does not, so the varied strings go to a copy of it with
normalizer_spec.remove_extra_whitespaces switched off (one protobuf field appended to the serialized model).
Byte-level BPE ("gpt2"): no real model is on disk, so each test trains a small one with the `tokenizers` library,
declared the way real Llama 3 / Qwen2 / GPT-2 / SmolLM tokenizer.json files declare their pre-tokenizers, and
compares ids with its own encode. The `reference` tests compare with llama.cpp itself when it is installed.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import EXAMPLE_260K, EXAMPLE_EVAL, SHARED, qtool_here
from llama_oracle import need_llama_cpp
from qtool.errors import QtoolError
from qtool.tokenizer import (BYTE, BYTE_CHARS, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, StreamDecoder,
                             Tokenizer, _clean_up_spaces)

spm = pytest.importorskip("sentencepiece")

TEXTS = [
    "Once upon a time", "Hello  world\n\n  x", "  leading and trailing  ", "\n", " ", "   ", "end.  ",
    "\t\ttabs\tand\r\nCRLF\r\n", "a  b   c    d", "x" * 50, "line one\nline two\n\n\nline five",
    "naïve café, Ünïcödé — “quotes” ‘single’", "日本語のテキスト、中文文本。", "Ωμέγα Привет мир שלום مرحبا",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "mixed\u00a0nbsp\u2003em space\u3000ideographic",
    "digits 1 22 333 4444 55555 3.14159 1,000,000 x1234y", "def f(x):\n    return x**2  # square\n\nprint(f(12))",
    "I'm can't we'll they've she'd you're IT'S DON'T", '<tag attr="v">text</tag> {"k": [1, 2]}',
    "...!!!??? a $+<=>^~| b", " ' quote ' , 's",
]


def training_text() -> str:
    """Text to train the byte-level BPE tokenizers on: the shared eval text, or the copy bundled with the examples
    (the sample model's README is too short for a 1200-token vocabulary)."""
    path = SHARED / "eval" / "tinystories_style_eval.txt"
    return (path if path.is_file() else EXAMPLE_EVAL).read_text()


def tokenizer_model_path():
    shared = SHARED / "models" / "stories260K" / "tokenizer.model"
    return shared if shared.is_file() else EXAMPLE_260K / "tokenizer.model"


def spm_metadata(sp, extra: list[tuple[str, int]] = ()) -> dict:
    """GGUF tokenizer metadata as llama.cpp's converter writes it for a SentencePiece model."""
    n = sp.vocab_size()
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)] + [t for t, _ in extra],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)] + [-1000.0] * len(extra),
        "tokenizer.ggml.token_type": types + [k for _, k in extra],
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model_path()))


@pytest.fixture(scope="module")
def sp_keep_spaces():
    # NormalizerSpec (ModelProto field 3) field 4 remove_extra_whitespaces = false; protobuf merges repeated
    # message fields, so appending it to the serialized model overrides just that flag
    return spm.SentencePieceProcessor(model_proto=tokenizer_model_path().read_bytes() + b"\x1a\x02\x20\x00")


@pytest.fixture(scope="module")
def spm_tok(sp):
    return Tokenizer.from_metadata(spm_metadata(sp))


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------------------

def test_spm_documented_ids(spm_tok):
    assert spm_tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert spm_tok.encode("Once upon a time", add_bos=False) == [403, 407, 261, 378]
    assert spm_tok.encode("") == [1] and spm_tok.encode("", add_bos=False) == []
    assert (spm_tok.n_vocab, spm_tok.bos_id, spm_tok.eos_id, spm_tok.unk_id) == (512, 1, 2, 0)
    assert spm_tok.is_eog(2) and not spm_tok.is_eog(1)


def test_spm_whole_eval_text_equals_sentencepiece(spm_tok, sp, eval_text):
    start = time.perf_counter()
    ids = spm_tok.encode(eval_text)
    seconds = time.perf_counter() - start
    assert ids == [sp.bos_id()] + sp.encode(eval_text)
    assert len(ids) == 13_583
    assert seconds < 1.0, f"encoding the eval text took {seconds:.2f} s"
    assert spm_tok.decode(ids) == sp.decode(ids) == eval_text


@pytest.mark.parametrize("text", TEXTS)
def test_spm_varied_text_equals_sentencepiece(spm_tok, sp_keep_spaces, text):
    ids = spm_tok.encode(text)
    assert ids == [1] + sp_keep_spaces.encode(text)
    assert spm_tok.decode(ids) == sp_keep_spaces.decode(ids) == text  # byte fallback makes every text round-trip


def test_spm_byte_fallback_for_characters_outside_the_vocabulary(spm_tok):
    ids = spm_tok.encode("日", add_bos=False)
    assert [spm_tok.tokens[i] for i in ids] == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]
    assert b"".join(spm_tok.token_bytes(i) for i in ids) == " 日".encode()


def test_spm_special_tokens_only_when_parsing_specials(spm_tok, sp):
    text = "<s>x</s>"
    assert spm_tok.encode(text) == [1] + sp.encode(text)  # plain text by default
    # a fragment after a special token gets its own "▁" prefix, as in llama.cpp
    assert spm_tok.encode(text, parse_special=True) == [1, 1] + sp.encode("x") + [2]
    assert spm_tok.decode([1, 1] + sp.encode("x") + [2]) == "x"
    assert spm_tok.decode([1, 1] + sp.encode("x") + [2], special=True) == "<s><s>x</s>"


def test_spm_user_defined_tokens_always_split(sp):
    tok = Tokenizer.from_metadata(spm_metadata(sp, extra=[("<|user|>", USER_DEFINED), ("<|ctl|>", CONTROL)]))
    for parse_special in (False, True):
        assert tok.encode("hi<|user|>there", parse_special=parse_special) == \
            [1] + sp.encode("hi") + [512] + sp.encode("there")
    assert tok.encode("a<|ctl|>b", parse_special=True) == [1] + sp.encode("a") + [513] + sp.encode("b")
    assert tok.encode("a<|ctl|>b") == [1] + sp.encode("a<|ctl|>b")
    assert tok.decode([1] + sp.encode("hi") + [512] + sp.encode("there")) == "hi<|user|> there"


def test_spm_defaults_when_the_file_names_no_special_tokens(sp):
    meta = spm_metadata(sp)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        del meta[key]
    tok = Tokenizer.from_metadata(meta)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.add_bos, tok.add_eos, tok.add_space_prefix) == \
        (1, 2, 0, True, False, True)


def test_spm_without_space_prefix_and_with_eos(sp):
    # NormalizerSpec field 3 add_dummy_prefix = false, appended the same way
    sp_no_prefix = spm.SentencePieceProcessor(model_proto=tokenizer_model_path().read_bytes() + b"\x1a\x02\x18\x00")
    tok = Tokenizer.from_metadata({**spm_metadata(sp), "tokenizer.ggml.add_space_prefix": False,
                                   "tokenizer.ggml.add_eos_token": True})
    text = "Once upon a time"
    assert tok.encode(text) == [1] + sp_no_prefix.encode(text) + [2]
    assert tok.encode(text, add_bos=False, add_eos=False) == sp_no_prefix.encode(text)
    assert tok.decode(tok.encode(" " + text)) == " " + text  # nothing to strip: the encoder added no space


def test_stream_decoder_holds_back_split_characters(spm_tok):
    text = "Tim saw 日本 and 🙂!"
    ids = spm_tok.encode(text, add_bos=False)
    stream = StreamDecoder(spm_tok)
    chunks = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == " " + text  # tokens as generated: the prompt's leading "▁" is a real space
    assert all("\ufffd" not in c for c in chunks)
    first_byte = ids.index(spm_tok.tokens.index("<0xE6>"))
    assert chunks[first_byte] == chunks[first_byte + 1] == "" and chunks[first_byte + 2] == "日"
    assert StreamDecoder(spm_tok).feed(2) == ""  # EOS prints nothing
    broken = StreamDecoder(spm_tok)
    assert broken.feed(spm_tok.tokens.index("<0xE6>")) == "" and broken.flush() == "\ufffd"


# ---------------------------------------------------------------------------------------------------------------
# byte-level BPE
# ---------------------------------------------------------------------------------------------------------------

# the Split patterns real tokenizer.json files declare (Llama 3, Qwen2)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|eot_id|>"]
USER_TOKEN = "[[sep]]"
BPE_TEXTS = TEXTS + ["<|eot_id|>hi<|endoftext|> there[[sep]]x", "Hi ,there . ok ' x ' 're 's"]


def hf_pre_tokenizer(pre: str):
    tokenizers = pytest.importorskip("tokenizers")
    Regex, pt = tokenizers.Regex, tokenizers.pre_tokenizers
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "llama-bpe":
        return pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
    if pre == "qwen2":  # Qwen2 also declares an NFC normalizer, which llama.cpp does not apply; left out here
        return pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre == "gpt-2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "default":  # no HF equivalent: the converter writes "default" for a pre-tokenizer it doesn't know
        return pt.Sequence([pt.Whitespace(), byte_level])
    raise ValueError(pre)


def train_byte_level_bpe(pre: str, corpus: list[str], vocab_size: int):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = hf_pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(corpus, trainer)
    hf.add_tokens([USER_TOKEN])
    if pre == "llama-bpe":  # Llama 3's tokenizer.json takes a word that is a whole token without merging
        spec = json.loads(hf.to_str())
        spec["model"]["ignore_merges"] = True
        hf = HFTokenizer.from_str(json.dumps(spec))
    return hf


def bpe_metadata(hf, pre: str) -> dict:
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    added = {t["id"]: t for t in spec["added_tokens"]}
    by_id = {i: t for t, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>")}


BPE_PRES = ["llama-bpe", "qwen2", "gpt-2", "smollm"]


@pytest.fixture(scope="module")
def bpe_pair():
    cache = {}

    def get(pre: str):
        if pre not in cache:
            hf = train_byte_level_bpe(pre, [training_text()] + BPE_TEXTS * 3, vocab_size=1200)
            cache[pre] = hf, Tokenizer.from_metadata(bpe_metadata(hf, pre))
        return cache[pre]
    return get


@pytest.mark.parametrize("pre", BPE_PRES)
def test_bpe_ids_equal_tokenizers(pre, bpe_pair):
    hf, tok = bpe_pair(pre)
    assert len(hf.get_vocab()) == tok.n_vocab == 1200
    for text in BPE_TEXTS + [training_text()]:
        want = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=False, parse_special=True) == want, text  # HF always matches specials
        hf_text = hf.decode(want, skip_special_tokens=False)
        assert tok.decode(want, special=True) == (_clean_up_spaces(hf_text) if tok.clean_spaces else hf_text)


@pytest.mark.parametrize("pre", BPE_PRES)
def test_bpe_round_trip_and_specials(pre, bpe_pair):
    hf, tok = bpe_pair(pre)
    eot, eos, user = (tok.tokens.index(t) for t in ("<|eot_id|>", "<|endoftext|>", USER_TOKEN))
    assert tok.is_eog(eot) and tok.is_eog(eos) and tok.eot_id == eot
    ids = tok.encode("<|eot_id|>a[[sep]]b", add_bos=False)  # control tokens are text unless parse_special
    assert eot not in ids and user in ids
    assert tok.encode("<|eot_id|>a", add_bos=False, parse_special=True)[0] == eot
    assert tok.encode("x", add_bos=True)[0] == tok.bos_id
    assert tok.add_bos == (pre == "llama-bpe")  # llama.cpp's default for Llama 3 when the file doesn't say
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == (_clean_up_spaces(text) if tok.clean_spaces else text)
        stream = StreamDecoder(tok)
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == text


def test_bpe_pre_tokenizer_digit_groups(bpe_pair):
    words = {pre: bpe_pair(pre)[1]._pre_tokenize("abc 1234567 x") for pre in BPE_PRES}
    assert words["llama-bpe"] == ["abc", " ", "123", "456", "7", " x"]  # \p{N}{1,3}
    assert words["qwen2"] == ["abc", " ", "1", "2", "3", "4", "5", "6", "7", " x"]
    assert words["gpt-2"] == ["abc", " 1234567", " x"]
    assert words["smollm"] == ["abc", " ", "1", "2", "3", "4", "5", "6", "7", " x"]


@pytest.mark.parametrize("pre, whole_words", [("llama-bpe", True), ("gpt-2", False)])
def test_bpe_ignore_merges_for_llama3_only(pre, whole_words):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer, models
    tokens = BYTE_CHARS + ["bc", "abc"]  # "abc" is a token no merge leads to
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [("b", "c")], ignore_merges=whole_words))
    hf.pre_tokenizer = hf_pre_tokenizer(pre)
    tok = Tokenizer("gpt2", tokens, [NORMAL] * len(tokens), merges=["b c"], pre=pre)
    want = [257] if whole_words else [ord("a"), 256]
    assert tok.encode("abc", add_bos=False) == hf.encode("abc").ids == want


def test_bpe_clean_up_spaces_like_llama_cpp(bpe_pair):
    hf, tok = bpe_pair("gpt-2")
    assert tok.clean_spaces
    text = "Hi , there . Really ? Yes ! it 's I 'm we 're they 've don 't I 'd we 'll a ' b"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == "Hi, there. Really? Yes! it's I'm we're they've don 't I 'd we 'll a'b"
    assert tok.decode(tok.encode("a ' ' b x 're", add_bos=False)) == "a'' b x're"  # llama.cpp's quirk, too
    stream = StreamDecoder(tok)
    assert "".join(stream.feed(i) for i in ids) == text  # streaming shows tokens as they are
    _, qwen = bpe_pair("qwen2")
    assert not qwen.clean_spaces and qwen.decode(qwen.encode(text, add_bos=False)) == text


def test_bpe_speed(bpe_pair, eval_text):
    _, tok = bpe_pair("llama-bpe")
    tok._word_cache.clear()  # time the merges, not the word cache
    start = time.perf_counter()
    tok.encode(eval_text)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"encoding the eval text took {seconds:.2f} s"


def test_unsupported_metadata_is_a_clear_error(sp):
    with pytest.raises(QtoolError, match="tokenizer model 'bert'"):
        Tokenizer.from_metadata({**spm_metadata(sp), "tokenizer.ggml.model": "bert"})
    with pytest.raises(QtoolError, match="pre-tokenizer 'falcon'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "falcon",
                                 "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
    with pytest.raises(QtoolError, match="no tokenizer"):
        Tokenizer.from_metadata({"general.architecture": "llama"})
    with pytest.raises(QtoolError, match="outside the vocabulary"):
        Tokenizer.from_metadata(spm_metadata(sp)).decode([512])


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself (reference extra)
# ---------------------------------------------------------------------------------------------------------------

def llama_vocab(path):
    return need_llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)


def gguf_metadata(path) -> dict:
    from qtool.formats.gguf_reader import GGUFFile
    with GGUFFile(path) as g:
        return g.metadata


@pytest.mark.reference
def test_spm_equals_llama_cpp_on_our_gguf(converted, eval_text):
    need_llama_cpp()
    path = converted("stories260K", "F32")
    llm = llama_vocab(path)
    tok = Tokenizer.from_metadata(gguf_metadata(path))
    for text in TEXTS + ["<s>x</s><unk>", eval_text]:
        for special in (False, True):
            assert tok.encode(text, parse_special=special) == llm.tokenize(text.encode(), add_bos=True,
                                                                           special=special), text


@pytest.mark.reference
@pytest.mark.parametrize("pre", ["llama-bpe", "default"])  # the others agreed as well; this keeps the test quick
def test_bpe_equals_llama_cpp_on_a_converted_checkpoint(pre, stories260k, eval_text, tmp_path):
    # stories260K's weights with a trained 512-token byte-level BPE tokenizer.json in place of its SentencePiece
    need_llama_cpp()
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(stories260k / name, folder / name)
    train_byte_level_bpe(pre, [training_text()] + BPE_TEXTS * 3, vocab_size=512).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                              "eos_token": "<|endoftext|>"}))
    qtool_here("convert", folder, "-o", tmp_path / "m.gguf", "--type", "F32", "--quiet", check=True)
    meta = gguf_metadata(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.pre"] == pre
    tok = Tokenizer.from_metadata(meta)
    llm = llama_vocab(tmp_path / "m.gguf")
    for text in BPE_TEXTS + [eval_text]:
        for special in (False, True):
            assert tok.encode(text, parse_special=special) == llm.tokenize(text.encode(), add_bos=True,
                                                                           special=special), text
