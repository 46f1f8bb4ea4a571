"""A checkpoint's general.* naming and sampling metadata, derived as llama.cpp's converter (gguf-py's Metadata)
derives it: sampling defaults from generation_config.json; name, organization, basename, finetune, version and
size label from config.json's `_name_or_path` and the folder's name ("SmolLM2-135M-Instruct" → basename "SmolLM2",
size label "135M", finetune "Instruct").

Not ported (yet): the model card (README.md front matter: license, tags, languages, datasets, base models) and
metadata override files.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError
from qtool.formats.constants import Keys, ValueType
from qtool.formats.safetensors import read_json

G = Keys.General
S, I32, F32 = ValueType.STRING, ValueType.INT32, ValueType.FLOAT32

# generation_config.json field → key, in the order gguf-py writes them
SAMPLING: tuple[tuple[str, tuple[str, ...], ValueType], ...] = (
    (G.SAMPLING_SEQUENCE, ("sequence",), S),
    (G.SAMPLING_TOP_K, ("top_k",), I32),
    (G.SAMPLING_TOP_P, ("top_p",), F32),
    (G.SAMPLING_MIN_P, ("min_p",), F32),
    (G.SAMPLING_XTC_PROBABILITY, ("xtc_probability",), F32),
    (G.SAMPLING_XTC_THRESHOLD, ("xtc_threshold",), F32),
    (G.SAMPLING_TEMP, ("temperature",), F32),
    (G.SAMPLING_PENALTY_LAST_N, ("penalty_last_n",), I32),
    (G.SAMPLING_PENALTY_REPEAT, ("penalty_repeat", "repetition_penalty"), F32),
    (G.SAMPLING_MIROSTAT, ("mirostat",), I32),
    (G.SAMPLING_MIROSTAT_TAU, ("mirostat_tau",), F32),
    (G.SAMPLING_MIROSTAT_ETA, ("mirostat_eta",), F32),
)
NAME_FIELDS = ("name", "version", "organization", "finetune", "basename", "size_label")  # as written
NAME_KEYS = {"name": G.NAME, "version": G.VERSION, "organization": G.ORGANIZATION, "finetune": G.FINETUNE,
             "basename": G.BASENAME, "size_label": G.SIZE_LABEL}


def size_label(n_params: int) -> str:
    """llama.cpp's general.size_label: 260K, 5.0M, 7B (at least two significant digits)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n_params > scale:
            break
    else:
        scale, suffix = 1e3, "K"
    scaled = n_params / scale
    decimals = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{suffix}"


def id_to_title(string: str) -> str:
    """"tiny-llama-v2" → "Tiny Llama v2": lowercase words capitalized unless versions or numbers."""
    return " ".join(w.title() if w.islower() and not re.match(r"^(v\d+(?:\.\d+)*|\d.*)$", w) else w
                    for w in string.strip().replace("-", " ").split())


def model_id_components(model_id: str, total_params: int) -> dict[str, str | None]:
    """gguf-py's Metadata.get_model_id_components: "org/Name-7B-Instruct-v1.1" split into its parts."""
    if " " in model_id:  # a sentence, not an id
        return {"name": id_to_title(model_id)}
    org, full = model_id.split("/", 1) if "/" in model_id else (None, model_id)
    org = None if not org or org[0] == "." else org  # "./model", "../model"
    parts = [p for p in full.split("-") if p]
    kinds: list[set[str]] = [set() for _ in parts]
    for i, part in enumerate(parts):
        if re.fullmatch(r"(v|iter)?\d+([.]\d+)*", part, re.IGNORECASE):
            kinds[i].add("version")
        elif re.fullmatch(r"i?q\d(_\w)*|b?fp?(16|32)", part, re.IGNORECASE):
            kinds[i].add("type")
            parts[i] = part.upper()
        elif i > 0 and re.fullmatch(r"(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)", part,
                                    re.IGNORECASE):
            part = part.replace("_", ".")
            if part[-1].isdecimal():  # bloom-7b1
                part = part[:-2] + "." + part[-1] + part[-2]
            if len(part) > 1 and part[-2].isdecimal() and part[-1] in "kmbt":
                part = part[:-1] + part[-1].upper()
            if total_params != 0:
                try:
                    label = float(part[:-1]) * pow(1000, " KMBT".find(part[-1]))
                    if (total_params < 0 and label < abs(total_params) // 8) or (
                            total_params > 0 and abs(label - total_params) > 7 * total_params // 8):
                        kinds[i].add("finetune")  # likely a context length
                        part = part[:-1] + part[-1].lower()
                except ValueError:
                    pass
            if not kinds[i]:
                kinds[i].add("size_label")
            parts[i] = part
        elif i > 0 and re.fullmatch(r"chat|instruct|vision|lora", part, re.IGNORECASE):
            kinds[i].add("type" if total_params < 0 and part.lower() == "lora" else "finetune")
    if any(c.isdecimal() for n, t in zip(parts, kinds) if "size_label" in t for c in n):
        for n, t in zip(parts, kinds):
            if "size_label" in t and all(c.isalpha() for c in n):
                t.remove("size_label")
    at_start = True
    for part, t in zip(parts, kinds):
        if at_start and ((not t and part[0].isalpha()) or "version" in t):
            t.add("basename")
        else:
            at_start = False
            if not t:
                t.add("finetune")
    for t in reversed(kinds):  # a trailing version is not part of the basename
        if "basename" in t and len(t) > 1:
            t.remove("basename")
        else:
            break
    basename = "-".join(n for n, t in zip(parts, kinds) if "basename" in t) or None
    size_label = "-".join(dict.fromkeys(n for n, t in zip(parts, kinds) if "size_label" in t)) or None
    finetune = "-".join(n for n, t in zip(parts, kinds) if "finetune" in t) or None
    version = "-".join(n for n, t in zip(parts, kinds) if "version" in t and "basename" not in t) or None
    if size_label is None and finetune is None and version is None:
        basename = None  # too ambiguous
    return {"name": id_to_title(full), "organization": id_to_title(org) if org else None, "basename": basename,
            "finetune": finetune, "version": version, "size_label": size_label}


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:  # bounded in size and depth, and only a regular file: a FIFO named so would block a plain read
        data = read_json(path, 16 << 20)
    except QtoolError:
        return {}  # gguf-py ignores an unreadable generation config too
    return data if isinstance(data, dict) else {}


def general_metadata(folder: Path, config: dict, model_id: str, total_params: int
                     ) -> list[tuple[str, Any, ValueType, None]]:
    """The general.* entries after general.type, in gguf-py's order. `model_id` is the folder's name (or the hub
    repo's); the size label is computed from `total_params` when the names give none."""
    out: list[tuple[str, Any, ValueType, None]] = []
    gen = _read_json(Path(folder) / "generation_config.json")
    for key, fields, vtype in SAMPLING:
        value = next((gen[f] for f in fields if gen.get(f) is not None), None)
        if value is None or vtype == S and not value:
            continue
        try:
            value = str(value) if vtype == S else int(value) if vtype == I32 else float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise QtoolError(f"{folder}/generation_config.json: {fields[0]} {value!r} is not a number") from None
        # the GGUF value is an int32 or a float32: out of range or NaN is nonsense, not a sampling default
        in_range = (-2**31 <= value < 2**31 if vtype == I32
                    else vtype == S or math.isfinite(value) and abs(value) < 3.4e38)
        if not in_range:
            raise QtoolError(f"{folder}/generation_config.json: {fields[0]} {value!r} is out of range")
        out.append((key, value, vtype, None))
    found: dict[str, str | None] = dict.fromkeys(NAME_FIELDS)
    ids = []
    name_or_path = config.get("_name_or_path")
    if isinstance(name_or_path, str) and name_or_path.count("/") <= 1:  # a repo id, not a local path
        ids.append(name_or_path)
    ids.append(model_id)
    for mid in ids:
        for field, value in model_id_components(mid, total_params).items():
            if found[field] is None:
                found[field] = value
    found["size_label"] = found["size_label"] or size_label(total_params)
    for field in NAME_FIELDS:
        if found[field]:
            out.append((NAME_KEYS[field], found[field], S, None))
    return out


def model_card_warning(folder: Path) -> str | None:
    """A note when README.md has a front matter, whose license, tags, languages, datasets and base models llama.cpp
    writes as general.* keys and qtool does not yet."""
    card = Path(folder) / "README.md"
    try:
        with card.open(encoding="utf-8") as f:
            first = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None
    if first != "---":
        return None
    return ("README.md has model card metadata (license, tags, ...); llama.cpp's converter writes it as general.* "
            "keys, qtool does not yet")
