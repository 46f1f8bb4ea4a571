"""Issue 15: short deterministic runs of the option and chat-template fuzzers (tests/fuzz/option_fuzz.py,
template_fuzz.py; the full lists run in `make fuzz`): every case a chat, an accepted option, or a one-line error;
no traceback, hang or leftover file."""
from __future__ import annotations

import pytest

from fuzz import option_fuzz, template_fuzz
from qtool import chat


def bad(counts) -> dict:
    return {k: c for k, c in counts.items() if k not in option_fuzz.GOOD}


def test_option_fuzz_short(tmp_path):
    counts, first = option_fuzz.run_cases(tmp_path, n=None, timeout=30)
    assert not bad(counts), {k: first[k] for k in bad(counts)}
    assert counts["one-line errors"] >= 50  # nearly every case is nonsense that must be refused


def test_template_fuzz_short(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_CPU_SECONDS", 0.25)  # the runaway loops then cost a quarter second each
    counts, first = template_fuzz.run_cases(tmp_path, n=None, timeout=20)
    assert not bad(counts), {k: first[k] for k in bad(counts)}
    assert counts["one-line errors"] >= 4 and counts["chats"] >= 20


@pytest.mark.parametrize("src, why", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "CPU time"),
    ("{{ 'x' * 10**9 }}", "repetition"),
    ("{{ 10 ** 100000000 }}", "exponent"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "characters"),
])
def test_runaway_template_is_bounded_at_start(monkeypatch, src, why):
    monkeypatch.setattr(chat, "RENDER_CPU_SECONDS", 0.25)

    class Tok:
        tokens, bos_id, eos_id = ["<s>", "</s>"], 0, 1
    t = chat.ChatTemplate.from_metadata({"tokenizer.chat_template": src}, Tok())
    assert t.is_plain and "TemplateLimit" in t.note and why in t.note
