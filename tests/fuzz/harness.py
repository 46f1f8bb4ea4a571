"""Run the CLI in-process, as `python -m qtool` would (main()'s error handling included), capturing its output:
a subprocess per mutant would spend seconds importing numba each time."""
from __future__ import annotations

import contextlib
import io
import signal
import sys


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
