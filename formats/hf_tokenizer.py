"""A checkpoint's tokenizer as GGUF metadata, the way llama.cpp's converter writes it.

SentencePiece `tokenizer.model` → tokenizer.ggml.model "llama" (tokens, scores, token types);
byte-level BPE `tokenizer.json` → "gpt2" (tokens, merges, types, and the pre-tokenizer name llama.cpp expects).
Special token ids, add_bos/add_eos and the chat template come from the tokenizer and model configs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError
from qtool.formats.constants import ValueType


class TokenType:  # llama.cpp's llama_token_type
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# byte-level BPE pre-tokenizer split patterns of known model families → llama.cpp's pre-tokenizer name
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class TokenizerMeta:
    entries: list[tuple[str, Any, ValueType, ValueType | None]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, vtype: ValueType, elem: ValueType | None = None) -> None:
        self.entries.append((key, value, vtype, elem))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtoolError(f"{path}: not valid JSON: {e}") from None


def tokenizer_metadata(folder: Path, config: dict) -> TokenizerMeta:
    folder = Path(folder)
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    jinja = folder / "chat_template.jinja"  # where transformers >= 4.43 saves the template
    if not tok_cfg.get("chat_template") and jinja.is_file():
        try:
            tok_cfg = {**tok_cfg, "chat_template": jinja.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
            raise QtoolError(f"{jinja}: cannot read as UTF-8 text ({e})") from None
    tok_json = _read_json(folder / "tokenizer.json")
    meta = TokenizerMeta()
    if (folder / "tokenizer.model").is_file():
        tokens = _sentencepiece(folder / "tokenizer.model", config, tok_cfg, meta)
    elif tok_json.get("model", {}).get("type") == "BPE":
        tokens = _byte_level_bpe(tok_json, config, tok_cfg, meta)
    else:
        raise QtoolError(f"{folder}: no tokenizer.model (SentencePiece) or byte-level BPE tokenizer.json")
    _special_tokens(tokens, config, tok_cfg, tok_json, meta)
    return meta


def _sentencepiece(path: Path, config: dict, tok_cfg: dict, meta: TokenizerMeta) -> list[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise QtoolError(f"{path}: not a SentencePiece model ({e})") from None
    n_sp = sp.vocab_size()
    n_vocab = int(config.get("vocab_size") or n_sp)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [TokenType.UNUSED] * n_vocab
    for i in range(min(n_sp, n_vocab)):
        tokens[i] = sp.id_to_piece(i)
        scores[i] = sp.get_score(i)
        types[i] = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                    else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                    else TokenType.NORMAL)
    for key, tok in tok_cfg.get("added_tokens_decoder", {}).items():
        i = int(key)
        if i >= n_vocab or i < n_sp and tokens[i] == tok["content"]:
            continue
        tokens[i] = tok["content"]
        scores[i] = -1000.0
        types[i] = TokenType.CONTROL if tok.get("special") else TokenType.USER_DEFINED
    meta.add("tokenizer.ggml.model", "llama", ValueType.STRING)
    meta.add("tokenizer.ggml.pre", "default", ValueType.STRING)
    meta.add("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)
    meta.add("tokenizer.ggml.scores", scores, ValueType.ARRAY, ValueType.FLOAT32)
    meta.add("tokenizer.ggml.token_type", types, ValueType.ARRAY, ValueType.INT32)
    if sp.unk_id() >= 0:
        meta.add("tokenizer.ggml.unknown_token_id", sp.unk_id(), ValueType.UINT32)
    return tokens


def _pre_tokenizer_name(tok_json: dict, meta: TokenizerMeta) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    for p in parts:
        pattern = (p.get("pattern") or {}).get("Regex")
        if p.get("type") == "Split" and pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    meta.warnings.append("unrecognised BPE pre-tokenizer; wrote tokenizer.ggml.pre = 'default', so llama.cpp "
                         "may split text differently from the original tokenizer")
    return "default"


def _byte_level_bpe(tok_json: dict, config: dict, tok_cfg: dict, meta: TokenizerMeta) -> list[str]:
    model = tok_json["model"]
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    n_vocab = int(config.get("vocab_size") or (max(vocab.values()) + 1))
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta.add("tokenizer.ggml.model", "gpt2", ValueType.STRING)
    meta.add("tokenizer.ggml.pre", _pre_tokenizer_name(tok_json, meta), ValueType.STRING)
    meta.add("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)
    meta.add("tokenizer.ggml.token_type", types, ValueType.ARRAY, ValueType.INT32)
    meta.add("tokenizer.ggml.merges", merges, ValueType.ARRAY, ValueType.STRING)
    return tokens


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value


def _bos_in_post_processor(tok_json: dict, bos: str | None) -> bool | None:
    post = tok_json.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            return bool(single) and "SpecialToken" in single[0] and single[0]["SpecialToken"]["id"] == bos
    return None


def _special_tokens(tokens: list[str], config: dict, tok_cfg: dict, tok_json: dict, meta: TokenizerMeta) -> None:
    index = {t: i for i, t in enumerate(tokens)}
    n = len(tokens)
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        text = _token_text(tok_cfg.get(f"{role}_token"))
        tid = index.get(text) if text is not None else None
        if tid is None:
            cfg_id = config.get(f"{role}_token_id")
            if isinstance(cfg_id, list):  # several eos ids (Llama 3.1): llama.cpp takes the first
                cfg_id = cfg_id[0] if cfg_id else None
            tid = cfg_id if isinstance(cfg_id, int) and 0 <= cfg_id < n else None
        if tid is not None:
            meta.add(f"tokenizer.ggml.{key}", int(tid), ValueType.UINT32)
    if not any(k == "tokenizer.ggml.unknown_token_id" for k, *_ in meta.entries):
        unk = index.get(_token_text(tok_cfg.get("unk_token")))
        if unk is not None:
            meta.add("tokenizer.ggml.unknown_token_id", unk, ValueType.UINT32)
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = _bos_in_post_processor(tok_json, _token_text(tok_cfg.get("bos_token")))
    if add_bos is not None:
        meta.add("tokenizer.ggml.add_bos_token", bool(add_bos), ValueType.BOOL)
    if tok_cfg.get("add_eos_token") is not None:
        meta.add("tokenizer.ggml.add_eos_token", bool(tok_cfg["add_eos_token"]), ValueType.BOOL)
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp keeps the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        meta.add("tokenizer.chat_template", template, ValueType.STRING)
