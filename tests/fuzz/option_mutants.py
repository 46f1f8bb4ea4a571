"""Bad command-line options for every command, as argument lists with placeholders the fuzzer fills in: {SRC} the
checkpoint folder, {GGUF} a converted model, {TEXT} a text file, {OUT} a fresh output path, {DIR} an existing folder.
Each must be a usage error (exit 2) or a one-line error (exit 1) before any output exists."""
from __future__ import annotations

from typing import Iterator

BAD_UTF8 = "caf\udce9"  # how Python hands over argv bytes that are not UTF-8 (surrogateescape)
HUGE = str(2**70)

RUN = ("run", "{GGUF}", "-n", "2", "-q")
BAD_RUN = [
    ("--seed", "-2"), ("--seed", HUGE), ("--seed", "x"), ("--ctx", "-5"), ("--ctx", HUGE),
    ("--temp", "nan"), ("--temp", "inf"), ("--temp", "-1"), ("--repeat-penalty", "0"), ("--repeat-penalty", "-1"),
    ("--repeat-penalty", "nan"), ("--top-p", "2"), ("--top-p", "-0.1"), ("--top-p", "nan"), ("--top-k", "-1"),
    ("--top-k", HUGE), ("-n", "-1"), ("-n", HUGE), ("--kv-type", "q9"), ("--kv-type", ""), ("-p", BAD_UTF8),
]


def option_mutants() -> Iterator[tuple[str, tuple[str, ...]]]:
    """(label, argv) pairs, in a fixed order (the short CI run takes a prefix of every command's list)."""
    for opt, val in BAD_RUN:
        yield f"run {opt} {val[:12]!r}", (*RUN, "-p", "Once", opt, val)
    for ctx in ("-5", "0", "1", HUGE, "x"):
        yield f"perplexity --ctx {ctx}", ("perplexity", "{GGUF}", "--text", "{TEXT}", "--ctx", ctx, "-q")
    yield "perplexity --text a folder", ("perplexity", "{GGUF}", "--text", "{DIR}", "-q")
    yield "perplexity --text missing", ("perplexity", "{GGUF}", "--text", "{DIR}/none.txt", "-q")
    yield "perplexity --reference a folder", ("perplexity", "{GGUF}", "--text", "{TEXT}", "--reference", "{DIR}", "-q")
    for ctx in ("-5", "0", HUGE):
        yield f"imatrix --ctx {ctx}", ("imatrix", "{GGUF}", "--text", "{TEXT}", "--ctx", ctx, "-o", "{OUT}", "-q")
    for chunks in ("-1", "0", HUGE):
        yield f"imatrix --chunks {chunks}", ("imatrix", "{GGUF}", "--text", "{TEXT}", "--chunks", chunks,
                                            "-o", "{OUT}", "-q")
    yield "imatrix -o a folder", ("imatrix", "{GGUF}", "--text", "{TEXT}", "-o", "{DIR}", "-q")
    yield "imatrix -o ''", ("imatrix", "{GGUF}", "--text", "{TEXT}", "-o", "", "-q")
    for out in ("{DIR}", "", "{DIR}/missing/m.gguf", "{SRC}"):
        yield f"convert -o {out!r}", ("convert", "{SRC}", "-o", out, "--type", "F32", "-q")
    for typ in ("Q9_9", "", "f32 ", BAD_UTF8):
        yield f"convert --type {typ!r}", ("convert", "{SRC}", "-o", "{OUT}", "--type", typ, "-q")
    for tt in ("[=Q8_0", "x", "=F32", "a=Q9"):
        yield f"convert --tensor-type {tt!r}", ("convert", "{SRC}", "-o", "{OUT}", "--tensor-type", tt, "-q")
    for c in ("-1", "0", HUGE):
        yield f"convert --calibrate-ctx {c}", ("convert", "{SRC}", "-o", "{OUT}", "--calibrate", "{TEXT}",
                                              "--calibrate-ctx", c, "-q")
    yield "convert --imatrix a folder", ("convert", "{SRC}", "-o", "{OUT}", "--imatrix", "{DIR}", "-q")
    yield "convert --save-imatrix without --calibrate", ("convert", "{SRC}", "-o", "{OUT}", "--save-imatrix",
                                                          "{DIR}/i.gguf", "-q")
    yield "convert source ''", ("convert", "", "-o", "{OUT}", "-q")
    yield "convert source bad UTF-8", ("convert", BAD_UTF8, "-o", "{OUT}", "-q")
    for src in ("{DIR}", "", BAD_UTF8, "{TEXT}"):
        yield f"inspect {src!r}", ("inspect", src)
    yield "unknown option", ("inspect", "{GGUF}", "--nope")
    yield "unknown command", ("nope",)
