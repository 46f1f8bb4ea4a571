"""Terminal rendering of inspect reports (rich tables); the data comes from qtool.inspect."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# C0/C1 control characters (ESC sequences could restyle or rewrite the user's terminal) shown as escapes
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if c not in (0x09, 0x0a)}


def safe(value: object) -> str:
    """A file-derived value as markup that prints exactly as text: a name like "[/]" is not rich markup."""
    return escape(str(value).translate(_CONTROL))


def cell(value: object) -> Text:
    """A table cell of untrusted text: a Text object is never parsed as markup."""
    return Text(str(value).translate(_CONTROL))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def print_gguf(r: dict, show_tensors: bool = False, show_meta: bool = False) -> None:
    con = Console()
    con.print(f"[bold]{safe(r['file'])}[/]  GGUF v{r['gguf_version']}, {_mb(r['file_bytes'])}")
    facts = [("architecture", r["architecture"]), ("name", r["name"]), ("file type", r["file_type"]),
             ("context", r["context_length"]), ("embedding", r["embedding_length"]), ("blocks", r["block_count"]),
             ("vocab", r["vocab_size"]), ("alignment", r["alignment"]), ("tensors", r["tensor_count"]),
             ("parameters", f"{r['parameters']:,}"), ("bits/weight", f"{r['bits_per_weight']:.3f}"),
             ("types", ", ".join(f"{k}×{v}" for k, v in r["types"].items()))]
    if r["expert_count"]:  # mixture of experts: a token multiplies only the experts its router picks
        facts += [("experts", f"{r['expert_count']} per layer, {r['expert_used_count']} used per token"),
                  ("per token", f"{_mb(r['bytes_per_token'])} read, {r['active_parameters']:,} parameters")]
    for k, v in facts:
        con.print(f"  {k:<13} {safe(v)}")
    t = Table(title="per layer", show_footer=True)
    t.add_column("layer", footer="total")
    t.add_column("tensors", justify="right", footer=str(r["tensor_count"]))
    t.add_column("types")
    t.add_column("parameters", justify="right", footer=f"{r['parameters']:,}")
    t.add_column("bytes", justify="right", footer=_mb(r["tensor_bytes"]))
    t.add_column("bits/weight", justify="right", footer=f"{r['bits_per_weight']:.3f}")
    if r["expert_count"]:
        t.add_column("experts", justify="right")
    for row in r["layers"]:
        t.add_row(cell(row["layer"]), str(row["tensors"]), ", ".join(row["types"]), f"{row['parameters']:,}",
                  _mb(row["bytes"]), f"{row['bits_per_weight']:.3f}",
                  *([str(row["experts"] or "")] if r["expert_count"] else []))
    con.print(t)
    if show_tensors:
        t = Table(title="tensors")
        for c in ("name", "shape", "type", "bytes", "bits/weight", "offset"):
            t.add_column(c, justify="left" if c in ("name", "type") else "right")
        for x in r["tensors"]:
            t.add_row(cell(x["name"]), "×".join(map(str, x["shape"])), x["type"], f"{x['nbytes']:,}",
                      f"{x['bits_per_weight']:.3f}", str(x["offset"]))
        con.print(t)
    if show_meta:
        t = Table(title="metadata")
        t.add_column("key")
        t.add_column("type")
        t.add_column("value", overflow="fold")
        for k, m in r["metadata"].items():
            t.add_row(cell(k), m["type"], cell(m["value"]))
        con.print(t)


def print_checkpoint(r: dict) -> None:
    con = Console()
    con.print(f"[bold]{safe(r['source'])}[/]  {safe(r['model'])}, {r['parameters']:,} parameters")
    t = Table(title="parameters per layer")
    t.add_column("layer")
    t.add_column("tensors", justify="right")
    t.add_column("parameters", justify="right")
    for row in r["layers"]:
        t.add_row(cell(row["layer"]), str(row["tensors"]), f"{row['parameters']:,}")
    con.print(t)
    t = Table(title="GGUF file size by --type")
    for c in ("type", "file size", "bits/weight", "fallback tensors"):
        t.add_column(c, justify="left" if c == "type" else "right")
    for s in r["sizes"]:
        t.add_row(s["type"] + (" *" if s["needs_imatrix"] else ""), _mb(s["file_bytes"]),
                  f"{s['bits_per_weight']:.2f}", str(s["fallbacks"]))
    con.print(t)
    if any(s["needs_imatrix"] for s in r["sizes"]):
        con.print("* needs an importance matrix (--imatrix or --calibrate), as llama-quantize does")


def print_imatrix(r: dict) -> None:
    con = Console()
    if not con.is_terminal:  # logs and pipes: wide enough for the statistics table in one line per tensor
        con = Console(width=120)
    con.print(Text(f"{r['file']}".translate(_CONTROL), style="bold") + Text(f"  importance matrix ({r['format']})"))
    size = r["chunk_size"] if r["chunk_size"] is not None else "not recorded (legacy .dat)"
    for k, v in (("entries", r["entries"]), ("chunks", r["chunk_count"]), ("chunk size", size),
                 ("datasets", ", ".join(r["datasets"]) or "-")):
        con.print(Text(f"  {k:<13} {str(v).translate(_CONTROL)}"))
    t = Table(title=Text("per tensor: importance E[x²] = in_sum2 / count"), box=box.SIMPLE_HEAD)
    for c in ("tensor", "count", "Σ", "min", "max", "μ", "σ", "N", "H norm", "ZD", "CosSim"):
        t.add_column(c, justify="left" if c == "tensor" else "right", no_wrap=True)
    for x in r["tensors"]:
        cos = "-" if x["cos_prev"] is None else f"{x['cos_prev']:.4f}"
        t.add_row(cell(x["name"]), f"{x['count']:.0f}", f"{x['sum']:.4g}", f"{x['min']:.4g}", f"{x['max']:.4g}",
                  f"{x['mean']:.4g}", f"{x['std']:.4g}", str(x["elements"]), f"{x['entropy_pct']:.2f}%",
                  f"{x['zd_pct']:.2f}%", cos)
    con.print(t)
