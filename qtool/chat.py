"""Chat prompts: the file's `tokenizer.chat_template` rendered with jinja2 (sandboxed, as Hugging Face renders it),
or a plain "User:/Assistant:" template when the file has none or it cannot be rendered (the caller says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

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
        return self._compiled().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=self.bos_token, eos_token=self.eos_token)

    def _compiled(self):
        if getattr(self, "_tpl", None) is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = _tojson
            self._tpl = env.from_string(self.source)
        return self._tpl


def _tojson(x, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json
    return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
