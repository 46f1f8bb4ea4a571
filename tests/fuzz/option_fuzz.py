"""The option fuzz run (for `make fuzz`): `python tests/fuzz/option_fuzz.py [N]`.

Runs the first N bad option lists of tests/fuzz/option_mutants.py (all by default) through the CLI in-process on
the bundled stories260K and prints one row per outcome: one-line errors, accepted (exit 0), tracebacks (by
exception and place), hangs (over 60 s), bad error output (not exit 1/2 with one `qtool: error:` line) and files
left in the output folder. Exit 1 unless the last four are all zero.
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from fuzz.harness import outcome, run_cli  # noqa: E402
from fuzz.option_mutants import option_mutants  # noqa: E402

SAMPLE = TESTS.parent / "examples" / "stories260K"
GOOD = ("one-line errors", "accepted", "chats")


def classify(code: int, err: str) -> str:
    """Usage errors print typer's box on exit 2; ours print `qtool: error:` lines (warnings may precede)."""
    if code == 0:
        return "accepted"
    lines = err.strip().splitlines()
    if code == 2 and lines and "Traceback" not in err:
        return "one-line errors"
    ok = (code == 1 and lines and lines[-1].startswith("qtool: error: ")
          and all(s.startswith("qtool: warning: ") for s in lines[:-1]))
    return "one-line errors" if ok else "bad error output"


def run_cases(tmp: Path, n: int | None = None, timeout: int = 60) -> tuple[collections.Counter, dict[str, str]]:
    counts: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    gguf = tmp / "m.gguf"
    if not gguf.exists():
        code, _, err = run_cli("convert", str(SAMPLE), "-o", str(gguf), "--type", "F32", "-q")
        assert code == 0, err
    text = tmp / "t.txt"
    text.write_text("Once upon a time there was a little girl. " * 20)
    folder, out_dir = tmp / "dir", tmp / "out"
    folder.mkdir(exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    places = {"{SRC}": str(SAMPLE), "{GGUF}": str(gguf), "{TEXT}": str(text), "{OUT}": str(out_dir / "o.gguf"),
              "{DIR}": str(folder)}
    for i, (label, argv) in enumerate(option_mutants()):
        if n is not None and i >= n:
            break
        args = []
        for a in argv:
            for k, v in places.items():
                a = a.replace(k, v)
            args.append(a)
        kind = outcome(lambda: classify(*run_cli(*args)[::2]), timeout)
        counts[kind] += 1
        first.setdefault(kind, label)
        left = [p for d in (out_dir, folder) for p in d.iterdir()
                if not (kind == "accepted" and p.name == "o.gguf")]
        if left:
            counts["files left"] += 1
            first.setdefault("files left", label)
        for d in (out_dir, folder):
            for p in d.iterdir():
                p.unlink()
    return counts, first


def report(name: str, counts: collections.Counter, first: dict[str, str]) -> int:
    print(f"{'outcome':<48} {'cases':>7}  first case")
    for kind, c in sorted(counts.items()):
        print(f"{kind:<48} {c:>7}  {first[kind] if kind != 'one-line errors' else ''}")
    bad = sum(c for k, c in counts.items() if k not in GOOD)
    cases = sum(c for k, c in counts.items() if k != "files left")
    print(f"{name}: {cases} cases: {bad} tracebacks, hangs, bad errors or leftovers")
    return 1 if bad else 0


def main(n: int | None = None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return report("option fuzz", *run_cases(Path(tmp), n))


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else None))
