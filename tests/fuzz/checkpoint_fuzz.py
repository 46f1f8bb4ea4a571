"""The long checkpoint fuzz run (for `make fuzz`): `python tests/fuzz/checkpoint_fuzz.py [N] [SEED] [FOLDER]`.

Runs N mutants of FOLDER (default the bundled stories260K) through `qtool convert` in-process and prints one row
per outcome: converted, one-line errors, tracebacks (by exception and place, with the first mutant that raised
it), hangs (over 30 s, by SIGALRM: a FIFO opened blocking) and temporary files left. Exit 1 unless the last three
are all zero.
"""
from __future__ import annotations

import collections
import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from fuzz.checkpoint_mutants import checkpoint_mutants  # noqa: E402
from fuzz.harness import outcome, run_cli  # noqa: E402


def _convert(folder: Path, out: Path) -> str:
    code, _, err = run_cli("convert", str(folder), "-o", str(out), "--type", "F32", "-q")
    lines = err.strip().splitlines()
    ok_error = code in (1, 2) and len(lines) == 1 and lines[0].startswith("qtool: error: ")
    return "converted" if code == 0 else "one-line errors" if ok_error else "bad error output"


def main(n: int = 1000, seed: int = 0, base: Path = TESTS.parent / "examples" / "stories260K") -> int:
    counts: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out" / "m.gguf"
        out.parent.mkdir()
        for label, mutate in checkpoint_mutants(base, n, seed):
            folder = Path(tmp) / "m"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(f"{folder}.outside", ignore_errors=True)
            shutil.copytree(base, folder)
            mutate(folder)
            kind = outcome(lambda: _convert(folder, out))
            counts[kind] += 1
            first.setdefault(kind, label)
            if kind == "converted" and out.exists():
                out.unlink()
            left = list(out.parent.iterdir())
            if left:
                counts["temporary files left"] += 1
                first.setdefault("temporary files left", label)
                for p in left:
                    p.unlink()
    print(f"{'outcome':<48} {'cases':>7}  first mutant")
    for kind, c in sorted(counts.items()):
        print(f"{kind:<48} {c:>7}  {first[kind] if kind not in ('converted', 'one-line errors') else ''}")
    bad = sum(c for k, c in counts.items() if k not in ("converted", "one-line errors"))
    print(f"{n} cases, seed {seed}: {bad} tracebacks, hangs, bad errors or leftovers")
    return 1 if bad else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(int(args[0]) if args else 1000, int(args[1]) if len(args) > 1 else 0,
                  *([Path(args[2])] if len(args) > 2 else [])))
