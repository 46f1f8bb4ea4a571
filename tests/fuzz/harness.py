"""Run the CLI in-process, as `python -m qtool` would (main()'s error handling included), capturing its output:
a subprocess per mutant would spend seconds importing numba each time."""
from __future__ import annotations

import contextlib
import io
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def run_cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `qtool *args`; a traceback escaping main() propagates to the caller."""
    from qtool import cli
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = sys.argv
    sys.argv = ["qtool", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for s, h in handlers.items():  # main() ignores SIGINT when done; the test session must stay interruptible
            signal.signal(s, h)
    return code, out.getvalue(), err.getvalue()


class Hang(BaseException):
    """Raised by the alarm. Not an Exception: the code under test may catch those (the chat template's fallback
    does), which would hide the hang."""


def _hang(signum, frame):
    raise Hang


def outcome(case: Callable[[], str], timeout: int = 30) -> str:
    """What case() did: its own classification of the result, "hangs" past timeout seconds, or the traceback a
    user would see, named by exception and innermost place."""
    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(timeout)
    try:
        return case()
    except Hang:
        return "hangs"
    except BaseException as e:  # noqa: BLE001 - any escape is a traceback a user would see
        where = traceback.extract_tb(e.__traceback__)[-1]
        return f"traceback {type(e).__name__} {Path(where.filename).name}:{where.lineno}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
