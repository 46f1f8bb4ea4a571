"""`qtool run` as a user drives it: seeded sampling, the interactive chat loop on a terminal, the quantized KV cache,
and a chat template rendered from the file."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, qtool
from qtool import perplexity
from qtool.model import Model


def complete(path, *args) -> str:
    proc = qtool("run", path, "-p", "Once upon a time", "-n", "40", "--json", *args, check=True)
    return json.loads(proc.stdout)["completion"]


def test_the_same_seed_gives_the_same_text(converted):
    path = converted("stories260K", "Q8_0")
    a = complete(path, "--temp", "1.0", "--seed", "7")
    assert a == complete(path, "--temp", "1.0", "--seed", "7")
    assert a != complete(path, "--temp", "1.0", "--seed", "8")
    assert len(a) > 40


def _default_sigint() -> None:
    # a suite started as a shell's background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the child gets the default disposition a terminal user's process has
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """The CLI on a pseudo-terminal, as a person at a keyboard runs it."""

    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "qtool", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, start_new_session=True,
                                     preexec_fn=_default_sigint)
        os.close(slave)
        self.seen = ""
        self.cursor = 0

    def read_until(self, text: str, timeout: float = 120) -> str:
        """Wait for `text` after what earlier calls matched (as pexpect does); returns all output so far."""
        end = time.monotonic() + timeout
        while text not in self.seen[self.cursor:]:
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{text!r} never appeared; the terminal shows:\n{self.seen}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    pass
        self.cursor = self.seen.index(text, self.cursor) + len(text)
        return self.seen

    def read_more(self, timeout: float = 10) -> None:
        if select.select([self.master], [], [], timeout)[0]:
            self.seen += os.read(self.master, 4096).decode("utf-8", "replace")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal sends to the foreground group

    def wait_for_keyboard(self, timeout: float = 60) -> None:
        """Wait until the program is blocked reading the terminal, as it is when a person presses a key. (A SIGINT
        that lands between printing the prompt and entering read() stays pending in CPython until a key comes;
        no person is that fast, but a test is.)"""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                call = open(f"/proc/{self.proc.pid}/syscall").read().split()
            except OSError:
                time.sleep(1.0)  # no /proc: give it a human moment
                return
            if call and call[0] in ("0", "63") and call[1] == "0x0":  # read(0, ...) on x86-64 / arm64
                return
            time.sleep(0.05)
        raise AssertionError("the program never waited for the keyboard")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_chat_answers_and_exits_on_eof(converted):
    t = Terminal("run", str(converted("stories260K", "Q8_0")), "-n", "30", "--temp", "0")
    t.read_until("plain 'User:/Assistant:' template")  # these models have no chat template
    t.read_until("> ")
    t.type("Tell me a story about a cat.\n")
    shown = t.read_until("tok/s]")
    answer = shown.split("Tell me a story about a cat.", 1)[1].split("[", 1)[0]
    assert len(answer.strip()) > 10
    t.read_until("> ", timeout=30)
    t.type("\x04")  # Ctrl-D: end of input
    assert t.close() == 0


def test_ctrl_c_stops_an_answer_and_a_second_one_exits(converted):
    t = Terminal("run", str(converted("stories3M", "F32")), "-n", "100000", "--ctx", "256", "--temp", "0.8",
                 "--seed", "1")
    t.read_until("> ")
    t.type("Once upon a time\n")
    t.read_until("Once upon a time\r\n")
    n = len(t.seen)
    while len(t.seen) < n + 20:  # the answer is streaming (about a second of it at most): stop it
        t.read_more()
    t.interrupt()
    t.read_until("[stopped]")
    t.read_until("> ")
    t.wait_for_keyboard()
    t.interrupt()
    assert t.close() == 0


def test_chat_template_from_the_checkpoint_is_rendered(stories260k, tmp_path):
    """A template in tokenizer_config.json reaches the GGUF and the chat prompt."""
    import shutil
    src = tmp_path / "model"
    shutil.copytree(stories260k, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}<<{{ m['role'] | upper }}>> {{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<<ASSISTANT>>{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    qtool("convert", src, "-o", out, "--type", "Q8_0", "--quiet", check=True)
    from qtool.chat import ChatTemplate
    m = Model(out, n_ctx=64)
    try:
        tpl = ChatTemplate.from_metadata(m.gguf.metadata, m.tokenizer)
        assert not tpl.is_plain
        assert tpl.render([{"role": "user", "content": "hi"}]) == "<s><<USER>> hi\n<<ASSISTANT>>"
    finally:
        m.close()
    t = Terminal("run", str(out), "-n", "5", "--temp", "0")
    t.read_until("> ")
    assert "plain" not in t.seen
    t.type("hi\n")
    t.read_until("tok/s]")
    t.type("\x04")
    assert t.close() == 0


def test_q8_0_kv_cache_keeps_perplexity_and_halves_its_memory(converted, eval_text):
    results, sizes = {}, {}
    for kv in ("f16", "q8_0"):
        m = Model(converted("stories3M", "F32"), n_ctx=256, kv_type=kv)
        try:
            results[kv] = perplexity.run(m, eval_text[:8000], 256).perplexity
            sizes[kv] = m.kv_bytes()
        finally:
            m.close()
    assert results["q8_0"] == pytest.approx(results["f16"], rel=5e-3)
    assert sizes["q8_0"] < 0.6 * sizes["f16"]
    proc = qtool("run", converted("stories3M", "F32"), "-p", "Once", "-n", "5", "--kv-type", "q8_0", check=True)
    assert "(q8_0)" in proc.stderr
    proc = qtool("run", converted("stories260K", "Q8_0"), "-p", "Once", "--kv-type", "q8_0")  # heads of 8
    assert proc.returncode == 1 and "multiples of 32" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_template_jinja_file_reaches_the_gguf(stories260k, tmp_path):
    """transformers >= 4.43 saves the template as chat_template.jinja beside tokenizer_config.json."""
    import shutil

    from qtool.formats.gguf_reader import GGUFFile
    src = tmp_path / "model"
    shutil.copytree(stories260k, src)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (src / "chat_template.jinja").write_text(template)
    out = tmp_path / "m.gguf"
    qtool("convert", src, "-o", out, "--type", "F32", "--quiet", check=True)
    with GGUFFile(out) as g:
        assert g.get("tokenizer.chat_template") == template
