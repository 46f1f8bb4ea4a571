"""The runner's tokenizer, built from a GGUF file's tokenizer metadata alone, tokenizing as llama.cpp does.

Two vocabulary kinds, as llama.cpp's `src/llama-vocab.cpp` implements them:

- "llama" (SentencePiece BPE): spaces become "▁", one "▁" is prepended to each text fragment that starts the
  input or follows a special token, then adjacent symbols merge by highest token score (ties: leftmost) and any
  symbol left out of the vocabulary falls back to `<0xXX>` byte tokens.
- "gpt2" (byte-level BPE): the text is split by the pre-tokenizer's regexes, each word's UTF-8 bytes are mapped to
  GPT-2's printable characters, and adjacent symbols merge by lowest merge rank (ties: leftmost).

Special tokens (control, user-defined, unknown) are cut out of the text before either algorithm runs; control and
unknown ones only when `parse_special` is set, user-defined ones always.
"""
from __future__ import annotations

import codecs
import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qtool.errors import QtoolError
from qtool.formats.constants import Keys, TokenType

KT = Keys.Tokenizer
# the values of tokenizer.ggml.token_type, by their short names
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (TokenType.NORMAL, TokenType.UNKNOWN, TokenType.CONTROL,
                                                        TokenType.USER_DEFINED, TokenType.UNUSED, TokenType.BYTE)

SPACE = "\u2581"  # "▁", SentencePiece's visible space

# Token texts llama.cpp treats as end-of-generation whatever their declared type (llama_vocab::impl::load)
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>", "</s>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
})
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "<end_of_utterance>")

# Pre-tokenizer regexes by tokenizer.ggml.pre. Each list is applied in turn, every regex splitting the pieces the
# previous one left; text between matches stays a piece of its own, as in llama.cpp's unicode_regex_split.
# The contraction group is llama.cpp's case-explicit form of HF's "(?i:'s|'t|...)": the two differ only on
# characters such as "ſ" that case-fold to an ASCII letter.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
           r"|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
    "gpt-2": (_GPT2,),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
# tokenizer.ggml.pre name → (regex family, ignore_merges, add_bos default, clean_spaces), as llama.cpp sets them
_PRE_TYPES: dict[str, tuple[str, bool, bool, bool]] = {
    "default": ("default", False, False, True),
    "llama-bpe": ("llama3", True, True, True), "llama3": ("llama3", True, True, True),
    "llama-v3": ("llama3", True, True, True),
    "qwen2": ("qwen2", False, False, False),
    "smollm": ("smollm", False, False, False), "starcoder": ("smollm", False, False, True),
    "gpt-2": ("gpt-2", False, False, True), "mpt": ("gpt-2", False, False, True),
    "olmo": ("gpt-2", False, False, True),
}


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte → character table: printable Latin-1 bytes stand for themselves, the rest map from U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_CHARS = _gpt2_byte_chars()
_CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}


def _get_id(meta: Mapping[str, Any], key: str, n_vocab: int, default: int | None) -> int | None:
    value = meta.get(key)
    if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
        # llama.cpp refuses a key of the wrong type ("key has wrong type"); int(nan) or int("") would trace
        raise QtoolError(f"metadata {key} is {_kind(value)}, expected a token id")
    if value is None or not 0 <= int(value) < n_vocab:  # llama.cpp ignores an out-of-range id and keeps the default
        return default if default is not None and 0 <= default < n_vocab else None
    return int(value)


def _kind(v: Any) -> str:
    """How a wrong metadata value is named in an error: its type, and the value when short."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return f"an array of {len(v)}"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:40] + '...'}"


def _numbers(meta: Mapping[str, Any], key: str, n_vocab: int, kinds: str) -> Any:
    """A per-token numeric array (scores, token types): absent, or exactly one finite number per token."""
    value = meta.get(key)
    if value is None:
        return None
    arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise QtoolError(f"metadata {key} is {_kind(value)}, expected an array of numbers")
    if len(arr) != n_vocab:
        raise QtoolError(f"metadata {key} has {len(arr)} entries for a vocabulary of {n_vocab} tokens")
    return value


class Tokenizer:
    """Encode and decode text with a GGUF file's vocabulary (`from_metadata`), as llama.cpp does."""

    def __init__(self, model: str, tokens: Sequence[str], types: Sequence[int] | None = None,
                 scores: Sequence[float] | None = None, merges: Sequence[str] | None = None, pre: str = "default",
                 *, bos_id: int | None = None,
                 eos_id: int | None = None, unk_id: int | None = None, pad_id: int | None = None,
                 eot_id: int | None = None, eom_id: int | None = None, add_bos: bool | None = None,
                 add_eos: bool = False, add_space_prefix: bool | None = None) -> None:
        if model not in ("llama", "gpt2"):
            raise QtoolError(f"tokenizer model {model!r} is not supported (only 'llama' and 'gpt2')")
        self.model = model
        self.pre = pre
        # llama.cpp renames empty tokens so that every text maps back to one id
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.types = list(types) if types is not None else [NORMAL] * len(self.tokens)
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * len(self.tokens)
        self._ids = {t: i for i, t in enumerate(self.tokens)}  # a repeated text maps to its last id, as in llama.cpp
        self.n_vocab = len(self.tokens)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_eos = add_eos

        if model == "llama":
            self.add_bos = True if add_bos is None else add_bos
            self.add_space_prefix = True if add_space_prefix is None else add_space_prefix
            self.clean_spaces = False
            self._byte_ids = [self._spm_byte_token(b) for b in range(256)]
        else:
            if pre not in _PRE_TYPES:
                raise QtoolError(f"byte-level BPE pre-tokenizer '{pre}' is not supported "
                                 f"(supported: {', '.join(sorted(_PRE_TYPES))})")
            family, self._ignore_merges, default_bos, self.clean_spaces = _PRE_TYPES[pre]
            self.add_bos = default_bos if add_bos is None else add_bos
            self.add_space_prefix = False if add_space_prefix is None else add_space_prefix
            # keyed by the "left right" string itself: byte-level symbols never hold a raw space (it is "Ġ"), so
            # the key is unambiguous, and a Llama 3 sized list loads in a blink; the first of duplicates wins
            merges = list(merges or ())
            self._ranks: dict[str, int] = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
            self._pre_regexes = _compile(_PRE_REGEXES[family])
            self._word_cache: dict[str, list[int]] = {}

        self._find_end_of_generation(eot_id, eom_id)
        self._special = sorted((i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)),
                               key=lambda i: (-len(self.tokens[i]), i))  # longest first, as llama.cpp matches them
        self._pieces: list[bytes | None] = [None] * self.n_vocab  # filled on first use: vocabularies are big

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values ("tokenizer.ggml.*"), with llama.cpp's defaults for missing keys."""
        model = meta.get(KT.MODEL)
        tokens = meta.get(KT.LIST)
        if model is None or tokens is None:
            raise QtoolError("the file has no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens are needed)")
        # each key is checked for type and length here, where it is read: a wrong one would otherwise surface as
        # an IndexError or TypeError deep in encoding
        if not isinstance(model, str):
            raise QtoolError(f"metadata {KT.MODEL} is {_kind(model)}, expected a string")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, (str, bytes)) for t in tokens):
            raise QtoolError(f"metadata {KT.LIST} is {_kind(tokens)}, expected a non-empty array of strings")
        tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in tokens]
        n = len(tokens)
        types = _numbers(meta, KT.TOKEN_TYPE, n, "iu")
        scores = _numbers(meta, KT.SCORES, n, "iuf")
        merges = meta.get(KT.MERGES)
        if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
            raise QtoolError(f"metadata {KT.MERGES} is {_kind(merges)}, expected an array of strings")
        pre = meta.get(KT.PRE)
        if pre is not None and not isinstance(pre, str):
            raise QtoolError(f"metadata {KT.PRE} is {_kind(pre)}, expected a string")
        if model == "gpt2" and merges is None:
            raise QtoolError("byte-level BPE tokenizer without tokenizer.ggml.merges")
        # llama.cpp's default special ids when the file names none: SPM <unk>=0 <s>=1 </s>=2; GPT-2 BPE 11 for both
        bos_default, eos_default, unk_default = (1, 2, 0) if model == "llama" else (11, 11, None)

        def flag(key: str) -> bool | None:
            value = meta.get(key)
            if value is not None and not isinstance(value, (bool, int, np.bool_, np.integer)):  # bool([True]) would be a silent yes
                raise QtoolError(f"metadata {key} is {_kind(value)}, expected a bool")
            return None if value is None else bool(value)

        return cls(str(model), tokens, [int(t) for t in types] if types is not None else None,
                   scores, merges, str(pre or "default"),
                   bos_id=_get_id(meta, KT.BOS_ID, n, bos_default),
                   eos_id=_get_id(meta, KT.EOS_ID, n, eos_default),
                   unk_id=_get_id(meta, KT.UNK_ID, n, unk_default),
                   pad_id=_get_id(meta, KT.PAD_ID, n, None),
                   eot_id=_get_id(meta, KT.EOT_ID, n, None),
                   eom_id=_get_id(meta, KT.EOM_ID, n, None),
                   add_bos=flag(KT.ADD_BOS), add_eos=bool(flag(KT.ADD_EOS)),
                   add_space_prefix=flag(KT.ADD_PREFIX))

    # -- special tokens --------------------------------------------------------------------------------------------

    def _find_end_of_generation(self, eot_id: int | None, eom_id: int | None) -> None:
        # like llama.cpp: EOS, EOT and EOM end generation, and so does any token whose text says so (<|eot_id|>,
        # <|im_end|> ...), which also makes it a control token even when the file called it something else
        if eot_id is None:
            eot_id = next((self._ids[t] for t in _EOT_TEXTS if t in self._ids), None)
        self.eot_id = eot_id
        if eom_id is None:
            eom_id = self._ids.get("<|eom_id|>")
        self.eog_ids = {self._ids[t] for t in _EOG_TEXTS if t in self._ids}
        for i in self.eog_ids:
            self.types[i] = CONTROL
        self.eog_ids |= {i for i in (self.eos_id, eot_id, eom_id) if i is not None}

    def is_eog(self, token_id: int) -> bool:
        """Does this token end generation (EOS, EOT, <|im_end|> ...)?"""
        return token_id in self.eog_ids

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of the text: a list of text fragments and token ids, in order."""
        fragments: list[str | int] = [text] if text else []
        for tid in self._special:
            if not parse_special and self.types[tid] != USER_DEFINED:
                continue
            special = self.tokens[tid]
            out: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or special not in frag:
                    out.append(frag)
                    continue
                parts = frag.split(special)
                for k, part in enumerate(parts):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    # -- encoding --------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS/EOS are added as the file says unless `add_bos`/`add_eos` are given."""
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise QtoolError("the tokenizer has no BOS token to add")
            out.append(self.bos_id)
        after_special = True  # llama.cpp prefixes the first fragment with a space even without a BOS
        for frag in self._split_special(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                after_special = True
            elif self.model == "llama":
                if self.add_space_prefix and after_special:
                    frag = " " + frag
                out += self._spm(frag.replace(" ", SPACE))
                after_special = False
            else:
                for word in self._pre_tokenize(frag):
                    out += self._bpe_word(word)
        if add_eos:
            if self.eos_id is None:
                raise QtoolError("the tokenizer has no EOS token to add")
            out.append(self.eos_id)
        return out

    def _spm_byte_token(self, b: int) -> int | None:
        tid = self._ids.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:  # vocabularies without byte tokens may hold the character itself
            tid = self._ids.get(chr(b))
        return self.unk_id if tid is None else tid

    def _spm(self, text: str) -> list[int]:
        """SentencePiece BPE on one fragment: symbols start as single characters; symbol i starts at text[i]."""
        n = len(text)
        if n == 0:
            return []
        ids, scores = self._ids, self.scores
        length = [1] * n  # 0 once merged into the symbol on its left
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        # heap of (-score, left, right, merged length): highest score first, then leftmost, as llama.cpp orders it
        heap = []
        for i in range(n - 1):
            tid = ids.get(text[i:i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                size = length[left] + length[right]
                tid = ids.get(text[left:left + size])
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], left, right, size))

        while heap:
            _, left, right, size = heapq.heappop(heap)
            # stale: one side has been merged elsewhere since this pair was queued (symbols only ever grow)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue
            length[left], length[right] = size, 0
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prev[nxt[left]] = left
            push(prev[left], left)
            push(left, nxt[left])

        out: list[int] = []
        i = 0
        while i != -1:
            piece = text[i:i + length[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:  # only single characters can be missing: merges always make vocabulary pieces
                out += [t for t in (self._byte_ids[b] for b in piece.encode("utf-8")) if t is not None]
            i = nxt[i]
        return out

    def _pre_tokenize(self, text: str) -> list[str]:
        pieces = [text]
        for regex in self._pre_regexes:
            split: list[str] = []
            for piece in pieces:
                pos = 0
                for m in regex.finditer(piece):
                    start, end = m.span()
                    if start > pos:
                        split.append(piece[pos:start])
                    if end > start:
                        split.append(piece[start:end])
                    pos = end
                if pos < len(piece):
                    split.append(piece[pos:])
            pieces = split
        return pieces

    def _bpe_word(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        chars = "".join([BYTE_CHARS[b] for b in word.encode("utf-8")])
        ids = self._bpe(chars)
        if len(self._word_cache) >= 100_000:  # words repeat a lot, but don't grow without bound on huge inputs
            self._word_cache.clear()
        self._word_cache[word] = ids
        return ids

    def _bpe(self, chars: str) -> list[int]:
        """Byte-level BPE on one pre-tokenized word (already in GPT-2 characters)."""
        vocab, ranks = self._ids, self._ranks
        if self._ignore_merges and chars in vocab:  # Llama 3 takes a whole word that is a token as it is
            return [vocab[chars]]
        syms = list(chars)  # "" once merged into the symbol on its left
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap = []  # (rank, left, right, merged text): lowest rank first, then leftmost
        for i in range(n - 1):
            rank = ranks.get(f"{syms[i]} {syms[i + 1]}")
            if rank is not None:
                heap.append((rank, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(heap)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                rank = ranks.get(f"{syms[left]} {syms[right]}")
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # stale when either side changed since the pair was queued (symbols only grow, so text tells)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                continue
            syms[left], syms[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prev[nxt[left]] = left
            push(prev[left], left)
            push(left, nxt[left])

        out: list[int] = []
        for sym in syms:
            if not sym:
                continue
            tid = vocab.get(sym)
            if tid is not None:
                out.append(tid)
            else:  # a merge result missing from the vocabulary: its characters, skipping unknown ones like llama.cpp
                out += [vocab[c] for c in sym if c in vocab]
        return out

    # -- decoding --------------------------------------------------------------------------------------------------

    def _piece(self, tid: int) -> bytes:
        text, kind = self.tokens[tid], self.types[tid]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")  # shown as written (control/unknown only when asked for)
        if kind == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        if kind != NORMAL:  # unused and undefined tokens print nothing, as in llama.cpp
            return b""
        if self.model == "llama":
            return text.replace(SPACE, " ").encode("utf-8")
        # a character outside GPT-2's byte table cannot come from byte-level BPE; keep it as UTF-8 rather than drop it
        return b"".join(bytes([_CHAR_BYTES[c]]) if c in _CHAR_BYTES else c.encode("utf-8") for c in text)

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The raw bytes one token stands for (possibly part of a UTF-8 character); control tokens are empty
        unless `special`."""
        if not 0 <= token_id < self.n_vocab:
            raise QtoolError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")
        if not special and self.types[token_id] in (CONTROL, UNKNOWN):
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of `ids`. The space the encoder put in front of the text is removed again (as sentencepiece does,
        BOS or not), and byte-level BPE models that ask for it get llama.cpp's clean-up of spaces before
        punctuation."""
        data = bytearray()
        strip = self.add_space_prefix
        for tid in ids:
            piece = self.token_bytes(tid, special)
            if self.types[tid] in (CONTROL, UNKNOWN):
                data += piece
                continue
            if strip and piece:
                piece = piece[1:] if piece.startswith(b" ") else piece
                strip = False
            data += piece
        text = data.decode("utf-8", "replace")
        return _clean_up_spaces(text) if self.clean_spaces else text


class StreamDecoder:
    """Turns token ids into text as they are generated: emits only complete UTF-8 characters, holding back the
    bytes of a character split across tokens until the rest arrives (invalid bytes become U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.special))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _compile(patterns: Iterable[str]) -> list[Any]:
    try:
        import regex  # the stdlib re has no \p{L}/\p{N}
    except ImportError:
        raise QtoolError("byte-level BPE tokenizers need the 'regex' package (pip install regex)") from None
    return [regex.compile(p) for p in patterns]


def _clean_up_spaces(text: str) -> str:
    """llama.cpp's detokenizer clean-up (clean_up_tokenization_spaces), pass by pass and quirks included."""
    t = list(text)
    # " ?", " !", " .", " ," lose the space
    t = [c for i, c in enumerate(t) if not (c == " " and i + 1 < len(t) and t[i + 1] in "?!.,")]
    # " ' " becomes "'"
    out: list[str] = t[:1]
    i = 1
    while i < len(t):
        if t[i] == "'" and i + 1 < len(t) and t[i - 1] == " " and t[i + 1] == " ":
            out[-1] = "'"
            t[i + 1] = "\0"  # llama.cpp blanks the space after, so it can't be the space before a next " ' "
            i += 2
            continue
        out.append(t[i])
        i += 1
    t = out
    # " 's", " 'm", " 're", " 've" lose the space (" 't", " 'd", " 'll" keep it)
    out = t[:1]
    for i in range(1, len(t)):
        if t[i] == "'" and t[i - 1] == " " and i + 1 < len(t):
            nxt2 = "".join(t[i + 1:i + 3])
            if t[i + 1] in "sm" or (i + 2 < len(t) and nxt2 in ("re", "ve")):
                out.pop()
        out.append(t[i])
    return "".join(out)
