"""The hostile chat-template fuzz run (for `make fuzz`): `python tests/fuzz/template_fuzz.py [N]`.

Each template of TEMPLATES is written into a copy of the sample model's GGUF as tokenizer.chat_template and run
through `qtool run`'s chat loop for three turns read from stdin. Fine outcomes: a chat (the template rendered, or
qtool fell back to its plain template with a note) or a one-line error; anything else (a traceback, over 30 s, other
stderr) is counted against it, as in the other fuzzers.
"""
from __future__ import annotations

import collections
import contextlib
import io
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from fuzz.gguf_mutants import V, Model  # noqa: E402
from fuzz.option_fuzz import SAMPLE, report  # noqa: E402
from fuzz.harness import outcome, run_cli  # noqa: E402

ECHO = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
TEMPLATES: list[tuple[str, str | bytes]] = [  # bytes: not valid UTF-8
    ("echo", ECHO),
    ("raises on turn 2", "{% if messages|length > 1 %}{{ raise_exception('no second turn') }}{% endif %}" + ECHO),
    ("undefined on turn 2", "{% if messages|length > 1 %}{{ messages[99].content }}{% endif %}" + ECHO),
    ("divides by zero on turn 2", "{{ 1 // (messages|length - 3) }}" + ECHO),
    ("raises with an empty message", "{{ raise_exception('') }}"),
    ("raises with a multi-line message", "{{ raise_exception('a\nb\nc') }}"),
    ("nested loops, no output", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    ("nested loops on turn 2", "{% for i in range(100000 if messages|length > 1 else 1) %}"
                               "{% for j in range(100000) %}{% endfor %}{% endfor %}" + ECHO),
    ("nested loops with output", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"),
    ("string repetition", "{{ 'x' * 10**9 }}"),
    ("list repetition", "{{ (messages * 10**8)|length }}"),
    ("huge power", "{{ 10 ** 100000000 }}"),
    ("huge power from a variable", "{% set n = 10**8 %}{{ 7 ** n }}"),
    ("output over the size bound", "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"),
    ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("dunder class", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("dunder globals", "{{ raise_exception.__globals__ }}"),
    ("func_globals via attr", "{{ strftime_now|attr('__globals__') }}"),
    ("mro via format", "{{ '{0.__class__}'.format(messages) }}"),
    ("mutating a message", "{% set _ = messages.append(1) %}" + ECHO),
    ("markup in output", "[/][bold]{{ messages[0].content }}[link=file:///etc/passwd]x"),
    ("escape codes in output", "\x1b[31m\x1b]0;title\x07" + ECHO),
    ("syntax error", "{% for m in messages %}"),
    ("unknown filter", "{{ messages|nope }}"),
    ("unknown tag", "{% nope %}"),
    ("invalid UTF-8", b"\xe9\xff" + ECHO.encode()),
    ("NUL bytes", "\0" + ECHO + "\0"),
    ("special tokens everywhere", "<s></s><unk>" * 50 + ECHO),
    ("empty output", "{% if false %}x{% endif %}"),
    ("only whitespace", "   \n\n  "),
    ("strftime_now bad format", "{{ strftime_now('%') }}" + ECHO),
    ("strftime_now not a string", "{{ strftime_now(1) }}" + ECHO),
    ("tojson of a cycle", "{% set d = {} %}{{ d|tojson }}" + ECHO),
    ("tojson bad indent", "{{ messages|tojson(indent='x') }}"),
    ("long prompt over the context", "{% for i in range(5000) %}Once upon a time {% endfor %}"),
    ("loop controls", "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                      "{% endfor %}"),
]


@contextlib.contextmanager
def stdin(text: str):
    old = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = old


def classify(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    notes = all(s.startswith("qtool: ") and "Traceback" not in s for s in lines)
    if code == 0:
        return "chats" if notes else "bad error output"
    ok = code == 1 and lines and lines[-1].startswith("qtool: error: ") and notes
    return "one-line errors" if ok else "bad error output"


def _chat(path: Path) -> str:
    with stdin("hi\nhello again\na third line\n"):
        code, _, err = run_cli("run", str(path), "-n", "3", "--seed", "1", "-q")
    return classify(code, err)


def run_cases(tmp: Path, n: int | None = None, timeout: int = 30):
    counts: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    f32 = tmp / "base.gguf"
    if not f32.exists():
        code, _, err = run_cli("convert", str(SAMPLE), "-o", str(f32), "--type", "F32", "-q")
        assert code == 0, err
    base = Model(f32)
    path = tmp / "t.gguf"

    for label, src in TEMPLATES[:n]:
        m = base.copy()
        m.kv["tokenizer.chat_template"] = (V.STRING, src, None)
        path.write_bytes(m.to_bytes())
        kind = outcome(lambda: _chat(path), timeout)
        counts[kind] += 1
        first.setdefault(kind, label)
        path.unlink()
        left = [p for p in tmp.iterdir() if p.name != "base.gguf"]
        if left:
            counts["files left"] += 1
            first.setdefault("files left", label)
    return counts, first


def main(n: int | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        counts, first = run_cases(Path(tmp), n)
        return report("template fuzz", counts, first)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else None))
