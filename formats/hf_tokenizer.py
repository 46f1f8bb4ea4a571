"""A checkpoint's tokenizer as GGUF metadata, the way llama.cpp's converter writes it.

SentencePiece `tokenizer.model` → tokenizer.ggml.model "llama" (tokens, scores, token types);
byte-level BPE `tokenizer.json` → "gpt2" (tokens, merges, types, and the pre-tokenizer name llama.cpp expects).
Special token ids, add_bos/add_sep/add_eos and the chat template are found, and written in the order, as
gguf-py's SpecialVocab does (tokenizer.json's post-processor, tokenizer_config.json, config.json).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError
from qtool.formats.constants import Keys, TokenType, ValueType
from qtool.formats.safetensors import open_regular, read_json

KT = Keys.Tokenizer


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


def _present(path: Path) -> bool:
    """A file there, or a name for one: a broken link or a FIFO is then an error (open_regular), not a silent
    fallback to another tokenizer file."""
    return path.exists() or path.is_symlink()


def _read_json(path: Path) -> dict:
    if not _present(path):
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise QtoolError(f"{path}: not a JSON object")
    return data


MAX_TOKEN_ID = (1 << 24) - 1  # archs.MAX_VOCAB: ids index lists padded to the vocabulary size


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID


def _require(ok: bool, path: Path, field: str, what: str) -> None:
    if not ok:
        raise QtoolError(f"{path}: {field} is not {what}")


def _dicts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _check_tokenizer_json(tj: dict, path: Path) -> None:
    """tokenizer.json's fields the converter reads, checked for structure before any of them is used."""
    model = tj.get("model", {})
    _require(isinstance(model, dict), path, "model", "an object")
    _require(isinstance(model.get("type", ""), str), path, "model.type", "a string")
    vocab = model.get("vocab", {})
    if model.get("type") == "BPE":
        _require(isinstance(vocab, dict) and all(_is_id(i) for i in vocab.values()), path, "model.vocab",
                 f"an object of token → id (0 to {MAX_TOKEN_ID})")
        merges = model.get("merges", [])
        _require(isinstance(merges, list) and all(
            isinstance(m, str) or isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)
            for m in merges), path, "model.merges", 'a list of "a b" strings or [a, b] pairs')
        _require(bool(vocab) or bool(tj.get("added_tokens")), path, "model.vocab", "a non-empty object")
    added = tj.get("added_tokens", [])
    _require(_dicts(added) and all(_is_id(t.get("id")) and isinstance(t.get("content"), str) for t in added),
             path, "added_tokens", "a list of {id, content} objects")
    pre = tj.get("pre_tokenizer") or {}
    _require(isinstance(pre, dict), path, "pre_tokenizer", "an object")
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    _require(_dicts(parts) and all(isinstance(p.get("pattern") or {}, dict)
                                   and isinstance((p.get("pattern") or {}).get("Regex", ""), str) for p in parts),
             path, "pre_tokenizer", "an object (pretokenizers a list of objects, pattern.Regex a string)")
    post = tj.get("post_processor") or {}
    _require(isinstance(post, dict) and _dicts(post.get("processors", [post])), path, "post_processor",
             "an object (processors a list of objects)")
    for proc in post.get("processors", [post]):
        for field in ("cls", "sep"):
            _require(field not in proc or isinstance(proc[field], list) and proc[field], path,
                     f"post_processor.{field}", "a non-empty list")
        for field in ("single", "pair"):
            items = proc.get(field, [])
            _require(_dicts(items) and all(_named(i.get(k, {})) for i in items for k in ("SpecialToken", "Sequence")),
                     path, f"post_processor.{field}", "a list of {SpecialToken|Sequence: {id: string}} objects")
    _check_normalizer(tj.get("normalizer") or {}, path)


def _named(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("id", ""), str)


def _check_normalizer(normalizer: Any, path: Path) -> None:
    # depth is bounded by parse_json, so this recursion is too
    _require(isinstance(normalizer, dict) and _dicts(normalizer.get("normalizers", [])), path, "normalizer",
             "an object (normalizers a list of objects)")
    for n in normalizer.get("normalizers", []):
        _check_normalizer(n, path)


def _check_chat_template(template: Any, path: Path) -> None:
    _require(template is None or isinstance(template, str) or _dicts(template) and all(
        isinstance(c.get("name", ""), str) and isinstance(c.get("template", ""), (str, type(None))) for c in template),
        path, "chat_template", "a string or a list of {name, template} strings")


def _check_tokenizer_config(tc: dict, path: Path) -> None:
    """tokenizer_config.json's fields the converter reads (the *_token entries are type-checked where read)."""
    _require(tc.get("add_prefix_space") is None or isinstance(tc["add_prefix_space"], bool), path,
             "add_prefix_space", "true or false")
    decoder = tc.get("added_tokens_decoder", {})
    _require(isinstance(decoder, dict) and all(
        isinstance(k, str) and k.isdigit() and _is_id(int(k)) and isinstance(t, dict)
        and isinstance(t.get("content"), str) for k, t in decoder.items()),
        path, "added_tokens_decoder", f"an object of id (0 to {MAX_TOKEN_ID}) → {{content}}")
    _check_chat_template(tc.get("chat_template"), path)


def tokenizer_metadata(folder: Path, config: dict, space_prefix: bool = False, vocab: str = "llama") -> TokenizerMeta:
    """The tokenizer entries in convert_hf_to_gguf.py's order. `space_prefix`: write tokenizer_config.json's
    add_prefix_space as tokenizer.ggml.add_space_prefix first, as llama.cpp's LlamaModel does. `vocab` "phi3":
    a SentencePiece vocabulary's added tokens as Phi3MiniModel.set_vocab writes them."""
    folder = Path(folder)
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    _check_tokenizer_config(tok_cfg, folder / "tokenizer_config.json")
    tok_json = _read_json(folder / "tokenizer.json")
    _check_tokenizer_json(tok_json, folder / "tokenizer.json")
    meta = TokenizerMeta()
    if space_prefix and tok_cfg.get("add_prefix_space") is not None:
        meta.add(KT.ADD_PREFIX, bool(tok_cfg["add_prefix_space"]), ValueType.BOOL)
    if _present(folder / "tokenizer.model"):
        os.close(open_regular(folder / "tokenizer.model"))
        added = _phi3_added(folder, tok_cfg, tok_json) if vocab == "phi3" else None
        tokens = _sentencepiece(folder / "tokenizer.model", config, tok_cfg, meta, added)
        n_vocab: int | None = len(tokens)
    elif tok_json.get("model", {}).get("type") == "BPE":
        _byte_level_bpe(tok_json, config, tok_cfg, meta)
        n_vocab = None  # llama.cpp's BPE path does not bound the special ids
    else:
        raise QtoolError(f"{folder}: no tokenizer.model (SentencePiece) or byte-level BPE tokenizer.json")
    _special_vocab(folder, config, tok_cfg, tok_json, n_vocab, meta)
    return meta


PHI3_ADDED = tuple[int, str, TokenType, bool]  # id, text, type, whether an id beyond the vocabulary is skipped


def _phi3_added(folder: Path, tok_cfg: dict, tok_json: dict) -> list[PHI3_ADDED]:
    """Phi3MiniModel's added tokens in the order it applies them: added_tokens.json's (user-defined; ids beyond
    the vocabulary skipped), then tokenizer_config.json's added_tokens_decoder and tokenizer.json's added_tokens
    (control if special, else user-defined; an id beyond the vocabulary fails its converter). Each replaces the
    piece, scored -1000."""
    path = folder / "added_tokens.json"
    extra = _read_json(path)
    _require(all(_is_id(v) for v in extra.values()), path, "the file", f"an object of token → id (0 to {MAX_TOKEN_ID})")
    kind = lambda tok: TokenType.CONTROL if tok.get("special") else TokenType.USER_DEFINED  # noqa: E731
    return ([(i, text, TokenType.USER_DEFINED, True) for text, i in extra.items()]
            + [(int(k), t["content"], kind(t), False) for k, t in tok_cfg.get("added_tokens_decoder", {}).items()]
            + [(t["id"], t["content"], kind(t), False) for t in tok_json.get("added_tokens", [])])


def _sentencepiece(path: Path, config: dict, tok_cfg: dict, meta: TokenizerMeta,
                   phi3_added: list[PHI3_ADDED] | None = None) -> list[str]:
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
    if phi3_added is not None:
        for i, text, kind, skip in phi3_added:
            if i >= n_vocab and skip:
                continue
            if i >= n_vocab:
                raise QtoolError(f"{path.parent}: added token {text!r} has id {i}, beyond the vocabulary of "
                                 f"{n_vocab} (llama.cpp's phi3 converter fails on it)")
            tokens[i], scores[i], types[i] = text, -1000.0, kind
    for key, tok in tok_cfg.get("added_tokens_decoder", {}).items() if phi3_added is None else ():
        i = int(key)
        if i >= n_vocab or i < n_sp and tokens[i] == tok["content"]:
            continue
        tokens[i] = tok["content"]
        scores[i] = -1000.0
        types[i] = TokenType.CONTROL if tok.get("special") else TokenType.USER_DEFINED
    meta.add(KT.MODEL, "llama", ValueType.STRING)
    meta.add(KT.PRE, "default", ValueType.STRING)
    meta.add(KT.LIST, tokens, ValueType.ARRAY, ValueType.STRING)
    meta.add(KT.SCORES, scores, ValueType.ARRAY, ValueType.FLOAT32)
    meta.add(KT.TOKEN_TYPE, types, ValueType.ARRAY, ValueType.INT32)
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
    # pairs (tokenizers >= 0.20) joined by a space, a space inside a part written as U+0120 as gguf-py does
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
              for m in model.get("merges", [])]
    meta.add(KT.MODEL, "gpt2", ValueType.STRING)
    meta.add(KT.PRE, _pre_tokenizer_name(tok_json, meta), ValueType.STRING)
    meta.add(KT.LIST, tokens, ValueType.ARRAY, ValueType.STRING)
    meta.add(KT.TOKEN_TYPE, types, ValueType.ARRAY, ValueType.INT32)
    meta.add(KT.MERGES, merges, ValueType.ARRAY, ValueType.STRING)
    return tokens


# gguf-py's SpecialVocab: which special-token roles it looks for, and the key each id is written under (roles
# without a key, like cls, are read and dropped, as gguf-py does)
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
SPECIAL_ID_KEYS = {"bos": KT.BOS_ID, "eos": KT.EOS_ID, "unk": KT.UNK_ID, "sep": KT.SEP_ID, "pad": KT.PAD_ID,
                   "mask": KT.MASK_ID, "eot": KT.EOT_ID, "eom": KT.EOM_ID}
ADD_TOKEN_KEYS = {"bos": KT.ADD_BOS, "eos": KT.ADD_EOS, "sep": KT.ADD_SEP}


def _special_id(typ: str, tid: Any, n_vocab: int | None, ids: dict[str, int]) -> None:
    if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and (n_vocab is None or tid < n_vocab):
        ids.setdefault(typ, tid)  # the first source that names a role wins


def _post_processor_flags(tok_json: dict, tok_cfg: dict | None, types: list[str], add: dict[str, bool]) -> None:
    """gguf-py's crude reading of tokenizers' post-processor: which of bos/eos/sep a sequence gets. It also
    rewrites tok_cfg's bos/eos/cls/sep/eot/eom names as gguf-py does, which later decides their ids."""
    cfg = tok_cfg or {}
    bos, cls, eos, sep = cfg.get("bos_token"), cfg.get("cls_token"), cfg.get("eos_token"), cfg.get("sep_token")
    if not bos and cls and tok_cfg:
        tok_cfg["bos_token"] = bos = cls
    if not eos and sep and tok_cfg:
        tok_cfg["eos_token"] = eos = sep
    post = tok_json.get("post_processor")
    if not post:
        return
    for proc in post.get("processors", [post]):
        kind = proc.get("type")
        if kind == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
            if not cls and tok_cfg:
                tok_cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
            if not sep and tok_cfg:
                tok_cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
        elif kind == "TemplateProcessing":
            single, pair = proc.get("single", []), proc.get("pair", [])
            first = last = None
            if len(single) > 1:
                if first := single[0].get("SpecialToken", {}).get("id"):
                    if not tok_cfg:
                        bos = first
                    elif first not in (bos, cls):
                        if not bos:
                            tok_cfg["bos_token"] = bos = first
                        if not cls:
                            tok_cfg["cls_token"] = cls = first
                    add["bos"] = first in (bos, cls)
                if last := single[-1].get("SpecialToken", {}).get("id"):
                    if not tok_cfg:
                        eos = last
                    elif last != eos:
                        for extra in ("eot", "eom"):
                            if extra not in types:
                                types.append(extra)
                                tok_cfg[f"{extra}_token"] = eos
                                break
                        tok_cfg["eos_token"] = eos = last
                    add["eos"] = last == eos
            if pair:
                start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                pair = pair[start:stop]
                if pair and pair[0].get("Sequence", {}).get("id") == "A" and pair[-1].get("Sequence", {}).get(
                        "id") == "B" and (middle := pair[1:-1]):
                    add_sep = False
                    entry = middle[0].get("SpecialToken", {}).get("id")
                    if entry and entry in (sep, eos) and not last:
                        add_sep = True
                    if len(middle) == 2:
                        entry = middle[1].get("SpecialToken", {}).get("id")
                        if entry and entry in (sep, eos):
                            add_sep = True
                    add["sep"] = add_sep
                    if add_sep and not sep and tok_cfg:
                        tok_cfg["sep_token"] = eos


def _chat_template(folder: Path) -> Any:
    """chat_template.jinja (where transformers >= 4.43 saves it; named extras beside it) or chat_template.json."""
    def read(path: Path) -> str:
        try:
            with os.fdopen(open_regular(path), "rb") as fh:  # a FIFO here would block a plain open forever
                return fh.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QtoolError(f"{path}: cannot read as UTF-8 text ({e})") from None

    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template: Any = read(jinja)
        extras = sorted((folder / "additional_chat_templates").glob("*.jinja"))
        if extras:
            template = [{"name": "default", "template": template}] + [
                {"name": p.stem, "template": read(p)} for p in extras]
        return template
    if (folder / "chat_template.json").exists():
        template = _read_json(folder / "chat_template.json").get("chat_template")
        _check_chat_template(template, folder / "chat_template.json")
        return template
    return None


def _special_vocab(folder: Path, config: dict, tok_cfg: dict, tok_json: dict, n_vocab: int | None,
                   meta: TokenizerMeta) -> None:
    """Special token ids, add_{bos,sep,eos}_token and the chat template, found and ordered as gguf-py's
    SpecialVocab finds them: the post-processor, then tokenizer_config.json (ids of its named tokens among
    tokenizer.json's added tokens), then config.json's *_token_id."""
    tok_cfg = json.loads(json.dumps(tok_cfg)) if tok_cfg else None  # rewritten below, as gguf-py does
    types = list(SPECIAL_TYPES)
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    if tok_json:
        _post_processor_flags(tok_json, tok_cfg, types, add)
    template = None
    if tok_cfg:
        template = tok_cfg.get("chat_template", _chat_template(folder))
        added = tok_json.get("added_tokens", []) if tok_json else []
        for typ in types:
            flag = tok_cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                add.setdefault(typ, flag)  # the post-processor wins on a mismatch
            entry = tok_cfg.get(f"{typ}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(text, str):
                _special_id(typ, next((t.get("id") for t in added if t.get("content") == text), None), n_vocab, ids)
    for typ in types:
        tid = config.get(f"{typ}_token_id")
        if tid is None and config.get("text_config"):  # an object when given (archs.check_config); null is none
            tid = config["text_config"].get(f"{typ}_token_id")
        _special_id(typ, tid, n_vocab, ids)
    for typ, tid in ids.items():
        if typ in SPECIAL_ID_KEYS:
            meta.add(SPECIAL_ID_KEYS[typ], tid, ValueType.UINT32)
    for typ, value in add.items():
        if typ in ADD_TOKEN_KEYS:
            meta.add(ADD_TOKEN_KEYS[typ], value, ValueType.BOOL)
    _add_chat_template(template, meta)
    flags: dict[str, bool] = {}
    _normalizer_flags((tok_json or {}).get("normalizer") or {}, flags)
    for key in (KT.NORMALIZER_LOWERCASE, KT.NORMALIZER_STRIP_ACCENTS):
        if key in flags:
            meta.add(key, flags[key], ValueType.BOOL)


def _normalizer_flags(normalizer: dict, flags: dict[str, bool]) -> None:
    kind = normalizer.get("type")
    if kind == "Lowercase":
        flags[KT.NORMALIZER_LOWERCASE] = True
    elif kind == "StripAccents":
        flags[KT.NORMALIZER_STRIP_ACCENTS] = True
    elif kind == "BertNormalizer":
        for flag, key in (("lowercase", KT.NORMALIZER_LOWERCASE), ("strip_accents", KT.NORMALIZER_STRIP_ACCENTS)):
            if flag in normalizer:
                flags[key] = bool(normalizer[flag])
    elif kind == "Sequence":
        for n in normalizer.get("normalizers", []):
            _normalizer_flags(n, flags)


def _add_chat_template(template: Any, meta: TokenizerMeta) -> None:
    """gguf-py's add_chat_template: a list of named templates becomes one key per name plus the list of names
    (sorted here: gguf-py iterates a set, so its order varies from run to run) and the default one."""
    if isinstance(template, list):
        named, default = {}, None
        for choice in template:
            name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
            if name and choice.get("template") is not None:
                if name == "default":
                    default = choice["template"]
                else:
                    named[name] = choice["template"]
        for name, text in named.items():
            if text:
                meta.add(KT.CHAT_TEMPLATE_N.format(name=name), text, ValueType.STRING)
        if named:
            meta.add(KT.CHAT_TEMPLATES, sorted(named), ValueType.ARRAY, ValueType.STRING)
        template = default
    if isinstance(template, str) and template:  # gguf-py writes no empty strings
        meta.add(KT.CHAT_TEMPLATE, template, ValueType.STRING)
