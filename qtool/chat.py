"""Chat prompts: the file's `tokenizer.chat_template` rendered with jinja2 (sandboxed, as Hugging Face renders it),
or a plain "User:/Assistant:" template when the file has none or it cannot be rendered (the caller says so).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from datetime import datetime

# A template is code from the file: bound what one render may cost. No real template comes near these (a long
# conversation renders in milliseconds to a few hundred kB); the context limit then applies to the token count.
RENDER_CPU_SECONDS = 2.0
MAX_PROMPT_CHARS = 1 << 22
MAX_POWER_EXPONENT = 4096  # 10 ** 10 ** 10 runs in C, where no time limit can interrupt it

PLAIN_NOTE = "the file has no chat template; using a plain 'User:/Assistant:' template"


@dataclass
class ChatTemplate:
    source: str | None  # the Jinja text, None for the plain template
    bos_token: str = ""
    eos_token: str = ""
    note: str | None = None  # why the plain template is used

    @classmethod
    def from_metadata(cls, meta: dict, tokenizer) -> "ChatTemplate":
        src = meta.get("tokenizer.chat_template")
        bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
        eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
        if not src:
            return cls(None, bos, eos, PLAIN_NOTE)
        if not isinstance(src, str):  # str() of a number or list would "render" as a template of its repr
            return cls(None, bos, eos, "the file's tokenizer.chat_template is not a string; using a plain template")
        t = cls(str(src), bos, eos)
        try:  # render once now so that a template we cannot render falls back at start, not mid-conversation
            t.render([{"role": "user", "content": "hi"}])
        except Exception as e:  # jinja2 missing, syntax or runtime error in the template
            return cls(None, bos, eos, f"the file's chat template cannot be rendered ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}); using a plain template")
        return t

    @property
    def is_plain(self) -> bool:
        return self.source is None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for the conversation so far (BOS included only if the template writes it)."""
        if self.source is None:
            out = []
            for m in messages:
                role = {"system": "System", "user": "User", "assistant": "Assistant"}.get(m["role"], m["role"])
                out.append(f"{role}: {m['content']}\n")
            if add_generation_prompt:
                out.append("Assistant:")
            return "".join(out)
        pieces, n = [], 0
        with _cpu_limit(RENDER_CPU_SECONDS):
            for piece in self._compiled().generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token, eos_token=self.eos_token):
                n += len(piece)
                if n > MAX_PROMPT_CHARS:
                    raise TemplateLimit(f"the rendered prompt exceeds {MAX_PROMPT_CHARS} characters")
                pieces.append(piece)
        return "".join(pieces)

    def _compiled(self):
        if getattr(self, "_tpl", None) is None:

            def raise_exception(msg):
                raise ValueError(msg)

            env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = _tojson
            self._tpl = env.from_string(self.source)
        return self._tpl


class TemplateLimit(Exception):
    """A render over its time or size bound (reported like any other template error)."""


@contextlib.contextmanager
def _cpu_limit(seconds: float):
    """Raise TemplateLimit after `seconds` of CPU time (SIGVTALRM: SIGALRM stays free for callers); only the main
    thread can take signals, elsewhere the size bounds alone apply."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def over(signum, frame):
        raise TemplateLimit(f"rendering took over {seconds:g} s of CPU time")
    old = signal.signal(signal.SIGVTALRM, over)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def _bounded_binop(operator: str, left, right):
    """`*` and `**` are the operators whose result can outgrow any bound in one C call."""
    if operator == "**" and isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT \
            and isinstance(left, int) and abs(left) > 1:
        raise TemplateLimit(f"the exponent {right} is over {MAX_POWER_EXPONENT}")
    if operator == "*":
        for seq, k in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > MAX_PROMPT_CHARS:
                raise TemplateLimit(f"a repetition of {len(seq)} x {k} exceeds {MAX_PROMPT_CHARS} items")
    return None


def _sandbox_class():
    """jinja2's immutable sandbox with `*` and `**` bounded (jinja2 is imported only when a template is rendered)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            _bounded_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)
    return BoundedSandbox


def _tojson(x, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json
    return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
