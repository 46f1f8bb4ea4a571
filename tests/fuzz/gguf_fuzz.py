"""The long GGUF fuzz run (for `make fuzz`): `python tests/fuzz/gguf_fuzz.py BASE.gguf [N] [SEED]`.

Every semantic and tensor-info mutant of BASE, then N byte mutants (bit flips in the header, truncations, huge
counts), each written to a file and opened by the reader in-process; each one the reader accepts goes through
`inspect --meta --tensors`, and every 10th of those through `run -n 1`. Prints one row per outcome: refused by
the reader (a one-line QtoolError), opened, one-line command errors, tracebacks (by exception and place, with the
first mutant that raised it), hangs (over 30 s) and bad error output. Exit 1 unless the bad outcomes are zero.
"""
from __future__ import annotations

import collections
import itertools
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from fuzz.gguf_mutants import Model, byte_mutants, semantic_mutants, tensor_mutants  # noqa: E402
from fuzz.harness import outcome, run_cli  # noqa: E402

GOOD = ("refused by the reader", "opened", "command ran", "one-line command errors")
RUN_EVERY = 10  # `run` loads the model and compiles nothing new, but costs ~100x `inspect`


def _command(counts, first, label, args) -> None:
    def case() -> str:
        code, _, err = run_cli(*args)
        lines = err.strip().splitlines()
        ok_error = code in (1, 2) and lines and lines[-1].startswith("qtool: error: ")
        return "command ran" if code == 0 else "one-line command errors" if ok_error else "bad error output"
    kind = outcome(case)
    counts[kind] += 1
    first.setdefault(kind, f"{label} ({args[0]})")


def _open(p: Path, QtoolError, GGUFFile) -> str:
    try:
        GGUFFile(p).close()
        return "opened"
    except QtoolError as e:
        return "refused by the reader" if "\n" not in str(e) else "bad error output"


def main(base_path: Path, n: int = 100_000, seed: int = 0) -> int:
    from qtool.errors import QtoolError
    from qtool.formats.gguf_reader import GGUFFile

    base = Model(base_path)
    data = base_path.read_bytes()
    counts: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "fuzz.gguf"
        opened = 0
        cases = (*semantic_mutants(base), *tensor_mutants(base))
        # chained, not unpacked: N byte mutants of a 1 MB file held at once would be N MB
        for label, blob in itertools.chain(cases, byte_mutants(data, n, seed)):
            total += 1
            p.write_bytes(blob)
            kind = outcome(lambda: _open(p, QtoolError, GGUFFile))
            counts[kind] += 1
            first.setdefault(kind, label)
            if kind != "opened":
                continue
            _command(counts, first, label, ["inspect", p, "--meta", "--tensors"])
            if opened % RUN_EVERY == 0:
                _command(counts, first, label, ["run", p, "-p", "Once", "-n", "1", "--temp", "0"])
            opened += 1
    print(f"{'outcome':<56} {'count':>8}  first mutant")
    for kind, c in sorted(counts.items()):
        print(f"{kind:<56} {c:>8}  {first[kind] if kind not in GOOD else ''}")
    bad = sum(c for k, c in counts.items() if k not in GOOD)
    print(f"{total} GGUF cases ({n} byte mutants, seed {seed}): {bad} tracebacks, hangs or bad errors")
    return 1 if bad else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__.splitlines()[0])
    sys.exit(main(Path(args[0]), int(args[1]) if len(args) > 1 else 100_000, int(args[2]) if len(args) > 2 else 0))
