"""Terminal rendering of inspect reports (rich tables); the data comes from qtool.inspect."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def print_gguf(r: dict, show_tensors: bool = False, show_meta: bool = False) -> None:
    con = Console()
    con.print(f"[bold]{r['file']}[/]  GGUF v{r['gguf_version']}, {_mb(r['file_bytes'])}")
    facts = [("architecture", r["architecture"]), ("name", r["name"]), ("file type", r["file_type"]),
             ("context", r["context_length"]), ("embedding", r["embedding_length"]), ("blocks", r["block_count"]),
             ("vocab", r["vocab_size"]), ("alignment", r["alignment"]), ("tensors", r["tensor_count"]),
             ("parameters", f"{r['parameters']:,}"), ("bits/weight", f"{r['bits_per_weight']:.3f}"),
             ("types", ", ".join(f"{k}×{v}" for k, v in r["types"].items()))]
    for k, v in facts:
        con.print(f"  {k:<13} {v}")
    t = Table(title="per layer", show_footer=True)
    t.add_column("layer", footer="total")
    t.add_column("tensors", justify="right", footer=str(r["tensor_count"]))
    t.add_column("types")
    t.add_column("parameters", justify="right", footer=f"{r['parameters']:,}")
    t.add_column("bytes", justify="right", footer=_mb(r["tensor_bytes"]))
    t.add_column("bits/weight", justify="right", footer=f"{r['bits_per_weight']:.3f}")
    for row in r["layers"]:
        t.add_row(row["layer"], str(row["tensors"]), ", ".join(row["types"]), f"{row['parameters']:,}",
                  _mb(row["bytes"]), f"{row['bits_per_weight']:.3f}")
    con.print(t)
    if show_tensors:
        t = Table(title="tensors")
        for c in ("name", "shape", "type", "bytes", "bits/weight", "offset"):
            t.add_column(c, justify="left" if c in ("name", "type") else "right")
        for x in r["tensors"]:
            t.add_row(x["name"], "×".join(map(str, x["shape"])), x["type"], f"{x['nbytes']:,}",
                      f"{x['bits_per_weight']:.3f}", str(x["offset"]))
        con.print(t)
    if show_meta:
        t = Table(title="metadata")
        t.add_column("key")
        t.add_column("type")
        t.add_column("value", overflow="fold")
        for k, m in r["metadata"].items():
            t.add_row(k, m["type"], str(m["value"]))
        con.print(t)


def print_checkpoint(r: dict) -> None:
    con = Console()
    con.print(f"[bold]{r['source']}[/]  {r['model']}, {r['parameters']:,} parameters")
    t = Table(title="parameters per layer")
    t.add_column("layer")
    t.add_column("tensors", justify="right")
    t.add_column("parameters", justify="right")
    for row in r["layers"]:
        t.add_row(row["layer"], str(row["tensors"]), f"{row['parameters']:,}")
    con.print(t)
    t = Table(title="GGUF file size by --type")
    for c in ("type", "file size", "bits/weight", "fallback tensors"):
        t.add_column(c, justify="left" if c == "type" else "right")
    for s in r["sizes"]:
        t.add_row(s["type"], _mb(s["file_bytes"]), f"{s['bits_per_weight']:.2f}", str(s["fallbacks"]))
    con.print(t)
