"""`qtool imatrix`: the importance matrix of a GGUF model on a calibration text, as llama-imatrix computes it.

Light module: numpy, numba and the runner are imported inside the command so `qtool --help` stays instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from qtool.errors import QtoolError, UsageError


def imatrix(
    path: Path = typer.Argument(..., help="A GGUF model (F32/F16 for llama.cpp's figures)"),
    text: Path = typer.Option(..., "--text", help="The calibration text (UTF-8); not the evaluation text"),
    output: Path = typer.Option(Path("imatrix.gguf"), "-o", "--output", help="Output imatrix file (GGUF format)"),
    ctx: int = typer.Option(512, "--ctx", help="Chunk length in tokens (llama-imatrix -c)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Evaluate at most this many chunks"),
    process_output: bool = typer.Option(False, "--process-output", help="Also collect output.weight"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Collect the importance matrix (per weight column Σx², Σx and token counts) into a file llama-quantize
    and `qtool convert --imatrix` read."""
    from qtool.cli import _check_output, _remove_stale  # cli is loaded: it registers this command
    _check_output("-o", output)
    if ctx < 1:
        raise UsageError(f"--ctx {ctx}: the chunk length must be at least 1 token")
    if chunks is not None and chunks < 1:
        raise UsageError(f"--chunks {chunks}: evaluate at least one chunk")
    if output.exists() and path.exists() and output.resolve() == path.resolve():
        raise QtoolError(f"{output}: refusing to overwrite the model")
    from qtool.commands_run import read_text
    body = read_text(text)

    from qtool import imatrix as im
    from qtool.formats.imatrix import write_imatrix
    from qtool.model import Model

    model = Model(path, n_ctx=ctx)
    try:
        if quiet or as_json or not sys.stderr.isatty():  # a bar is for people: logs and pipes get the summary
            r = im.collect(model, body, ctx, str(text), chunks, process_output)
        else:
            from rich.console import Console
            from rich.progress import Progress, TextColumn
            with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[rate]}"),
                          console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task("chunks", total=None, rate="")
                r = im.collect(model, body, ctx, str(text), chunks, process_output,
                               progress=lambda done, total, tps: bar.update(task, completed=done, total=total,
                                                                             rate=f"{tps:.0f} tokens/s"))
    finally:
        model.close()
    for w in _remove_stale(output):
        if not quiet:
            print(f"qtool: warning: {w}", file=sys.stderr)
    size = write_imatrix(output, r.data)
    d = {"output": str(output), "bytes": size, **r.as_dict()}
    if as_json:
        print(json.dumps(d))
        return
    if not quiet:
        print(f"wrote {output}: {d['entries']} entries from {d['chunks']} chunks of {ctx} tokens "
              f"({d['tokens']} tokens, {d['tokens_per_s']:.0f} tokens/s, {d['seconds']:.1f} s)")
