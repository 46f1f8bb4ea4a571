"""Command line: `qtool convert | inspect` (and run/perplexity as they land).

Heavy modules (numpy, numba kernels) are imported inside commands so `qtool --help` stays instant.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

try:  # typer ≥ 0.26 vendors click; older releases use the click package
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from qtool.errors import QtoolError, UsageError
from qtool.formats.constants import FILE_TYPES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face LLM checkpoints into GGUF files llama.cpp runs, and inspect them.")


# control characters in an error (a file-derived name with a newline or an ESC sequence) shown as escapes, so the
# error stays one line and cannot restyle the terminal
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if c != 0x09}


def _err(msg: str) -> None:
    print(f"qtool: error: {msg.translate(_CONTROL)}", file=sys.stderr)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _default_output(model_name: str, type_name: str) -> Path:
    return Path(f"{model_name}.{type_name}.gguf")


@app.command()
def convert(
    src: str = typer.Argument(..., help="Checkpoint folder (config.json + safetensors) or Hugging Face repo id"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file [default: <model>.<TYPE>.gguf]"),
    type_name: str = typer.Option("Q8_0", "--type", "-t", help=" ".join(FILE_TYPES)),
    pure: bool = typer.Option(False, "--pure", help="No mixture: every quantizable tensor gets the type's base type"),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type for output.weight"),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help="Type for token_embd.weight"),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE for matching tensors (repeatable)"),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Keep output.weight unquantized"),
    allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                          help="Allow requantizing tensors that are already quantized"),
    imatrix: Optional[str] = typer.Option(None, "--imatrix",
                                          help="Importance matrix (llama-imatrix or qtool imatrix, .gguf or .dat)"),
    include_weights: list[str] = typer.Option([], "--include-weights",
                                              help="Use the importance matrix only for tensors matching (repeatable)"),
    exclude_weights: list[str] = typer.Option([], "--exclude-weights",
                                              help="Do not use the importance matrix for tensors matching (repeatable)"),
    calibrate: Optional[str] = typer.Option(None, "--calibrate",
                                            help="Compute the importance matrix from this text first ('default': "
                                                 "the text qtool ships); never the evaluation text"),
    calibrate_ctx: int = typer.Option(512, "--calibrate-ctx", help="Calibration chunk length (llama-imatrix -c)"),
    calibrate_chunks: Optional[int] = typer.Option(None, "--calibrate-chunks", help="At most this many chunks"),
    save_imatrix: Optional[Path] = typer.Option(None, "--save-imatrix", help="Also write the computed matrix here"),
    method: str = typer.Option("auto", "--method",
                               help="auto: llama-quantize's quantizers (importance-weighted with --imatrix or "
                                    "--calibrate); gptq: error-compensating (GPTQ), needs --calibrate"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors"),
) -> None:
    """Convert a checkpoint (or requantize a GGUF file) to one GGUF file, with llama-quantize's recipes."""
    from qtool import convert as conv
    from qtool import recipes

    t0 = time.perf_counter()
    for option, path in (("-o", output), ("--save-imatrix", save_imatrix)):
        _check_output(option, path)
    if imatrix and calibrate:
        raise UsageError("--imatrix and --calibrate: give one (a file, or a text to compute it from)")
    if save_imatrix and not calibrate:
        raise UsageError("--save-imatrix needs --calibrate")
    if (include_weights or exclude_weights) and not (imatrix or calibrate):
        raise UsageError("--include-weights and --exclude-weights need --imatrix or --calibrate")
    if calibrate_ctx < 1 or (calibrate_chunks is not None and calibrate_chunks < 1):
        raise UsageError("--calibrate-ctx and --calibrate-chunks must be at least 1")
    gptq = _check_method(method, imatrix, calibrate, save_imatrix)
    imatrix_data = None
    if imatrix or calibrate:
        from qtool import importance
    if imatrix:
        imatrix_data = importance.read(imatrix)
    elif calibrate and not gptq:
        imatrix_data, imatrix = _calibrate(src, calibrate, calibrate_ctx, calibrate_chunks, save_imatrix, quiet)
    opts = recipes.RecipeOptions(
        pure=pure, leave_output_tensor=leave_output_tensor, has_imatrix=imatrix_data is not None or gptq,
        output_tensor_type=recipes.parse_ggml_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=recipes.parse_ggml_type(token_embedding_type) if token_embedding_type else None,
        tensor_types=tuple(recipes.parse_tensor_type(spec) for spec in tensor_type))
    plan = conv.plan(src, type_name, opts, allow_requantize=allow_requantize)
    try:
        if imatrix_data is not None:
            importance.apply(plan, imatrix_data, imatrix, include_weights, exclude_weights)
        if gptq:
            _gptq(plan, src, calibrate, calibrate_ctx, calibrate_chunks, quiet)
        out = output or _default_output(plan.model_name, plan.type_name)
        src_path = Path(src)
        if src_path.exists() and out.exists() and any(out.resolve() == p.resolve() for p in
                                                         ([src_path] if src_path.is_file() else src_path.iterdir())):
            raise QtoolError(f"{out}: refusing to overwrite an input file")
        _check_output("-o", out)  # the default name is known only now
        for w in plan.warnings + _remove_stale(out):
            if not quiet:
                print(f"qtool: warning: {w}", file=sys.stderr)
        show_progress = not quiet and sys.stderr.isatty()
        total = sum(_job_bytes(j) for j in plan.jobs)
        if show_progress:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)
            with Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
                task = bar.add_task("converting", total=total)
                size = conv.write(plan, out, lambda job, n: bar.update(task, advance=_job_bytes(job),
                                                                        description=job.name))
        else:
            size = conv.write(plan, out)
        if not quiet:
            secs = time.perf_counter() - t0
            bpw = 8 * size / max(plan.n_params, 1)
            fallbacks = sum(1 for j in plan.jobs if j.note)
            extra = f", {fallbacks} tensors fell back" if fallbacks else ""
            print(f"wrote {out}: {_human(size)}, {plan.n_params:,} parameters, {bpw:.2f} bits/weight, "
                  f"{plan.type_name}{extra}, {secs:.1f} s")
    finally:
        plan.close()


def _check_output(option: str, path: Optional[Path]) -> None:
    """A directory (or "", which arrives as ".") as an output is a usage error before any work is done."""
    from qtool.formats.gguf_writer import output_problem
    problem = output_problem(path) if path is not None else None
    if problem:
        raise UsageError(f"{option} {problem}")


def _remove_stale(out: Path) -> list[str]:
    """Temporary files a killed run left beside the output, removed, as warnings to print."""
    from qtool.formats.gguf_writer import remove_stale_partials
    return [f"removed {p}, a temporary file left by an interrupted run"
            for p in remove_stale_partials(out.parent if str(out.parent) else Path("."))]


def _check_method(method: str, imatrix: Optional[str], calibrate: Optional[str], save: Optional[Path]) -> bool:
    """True for --method gptq, after refusing what it cannot take."""
    if method.lower() not in ("auto", "gptq"):
        raise UsageError(f"--method {method}: not a method (auto, gptq)")
    if method.lower() != "gptq":
        return False
    if imatrix:
        raise UsageError("--method gptq needs each layer's inputs (--calibrate TEXT), not an importance matrix file")
    if not calibrate:
        raise UsageError("--method gptq needs --calibrate TEXT (the calibration text, never the evaluation text)")
    if save:
        raise UsageError("--save-imatrix is for --calibrate without --method gptq")
    return True


def _gptq(plan, src: str, text_arg: str, n_ctx: int, max_chunks: Optional[int], quiet: bool) -> None:
    """Quantize the plan's layer tensors by GPTQ (qtool/gptq.py), a progress bar per layer on a terminal."""
    from qtool import calibrate as cal
    from qtool import gptq
    text, dataset = cal.calibration_text(text_arg)
    if not quiet and sys.stderr.isatty():
        from rich.progress import Progress
        with Progress(transient=True) as bar:
            task = bar.add_task("gptq, layer by layer", total=None)
            r = gptq.apply(plan, src, text, dataset, n_ctx, max_chunks,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        r = gptq.apply(plan, src, text, dataset, n_ctx, max_chunks)
    if not quiet:
        print(f"qtool: gptq on {r['chunks']} chunks of {n_ctx} tokens of {dataset}: {r['gptq']} tensors, "
              f"{r['imatrix']} by the imatrix quantizer, {r['seconds']:.1f} s", file=sys.stderr)


def _calibrate(src: str, text_arg: str, n_ctx: int, max_chunks: int | None, save: Path | None, quiet: bool):
    """The importance matrix of `src` on the calibration text (qtool/calibrate.py), and the name the file's
    quantize.imatrix.file records: the saved file, or the text it came from."""
    from qtool import calibrate as cal
    from qtool.formats.imatrix import write_imatrix
    text, dataset = cal.calibration_text(text_arg)
    if save is not None and Path(src).exists() and save.exists() and save.resolve() == Path(src).resolve():
        raise QtoolError(f"{save}: refusing to overwrite the model")
    if not quiet and sys.stderr.isatty():
        from rich.progress import Progress
        with Progress(transient=True) as bar:
            task = bar.add_task("calibrating", total=None)
            r = cal.importance_matrix(src, text, dataset, n_ctx, max_chunks,
                                      lambda done, total: bar.update(task, completed=done, total=total))
    else:
        r = cal.importance_matrix(src, text, dataset, n_ctx, max_chunks)
    if not quiet:
        print(f"qtool: importance matrix from {r.n_chunks} chunks of {n_ctx} tokens of {dataset} "
              f"({r.tokens_per_s:.0f} tokens/s)", file=sys.stderr)
    if save is not None:
        write_imatrix(save, r.data)
    return r.data, str(save) if save is not None else dataset


def _job_bytes(job) -> int:
    from qtool.formats.constants import tensor_nbytes
    import math
    return tensor_nbytes(job.ggml_type, math.prod(job.shape))


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A .gguf file, or a checkpoint folder / repo id"),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor"),
    meta: bool = typer.Option(False, "--meta", help="Show all metadata (long arrays abbreviated)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Show a GGUF file's metadata and per-layer sizes, or a checkpoint's size at each --type."""
    from qtool import inspect as insp
    from qtool import report

    p = Path(path)
    if p.is_file() and insp.is_imatrix(p):  # an importance matrix has no layers to size: its own report
        data = insp.imatrix_report(p)
        if as_json:
            print(json.dumps(data, indent=1))
        else:
            report.print_imatrix(data)
        return
    if p.is_file():
        data = insp.gguf_report(p, full_meta=meta and as_json)
        if not as_json:
            report.print_gguf(data, show_tensors=tensors, show_meta=meta)
    else:
        data = insp.checkpoint_report(path)
        if not as_json:
            report.print_checkpoint(data)
    if as_json:
        if p.is_file() and not tensors:
            data.pop("tensors")
        if p.is_file() and not meta:
            data.pop("metadata")
        print(json.dumps(data, indent=1, default=str))


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into exit code 130 without a word
            raise KeyboardInterrupt
    except click_exc.ClickException as e:
        e.show()
        code = e.exit_code
    except UsageError as e:
        _err(str(e))
        code = 2
    except QtoolError as e:
        _err(str(e))
        code = 1
    except (KeyboardInterrupt, typer.Abort):
        _err("interrupted; no output was written")
        code = 130
    except BrokenPipeError:
        code = 1
    except OSError as e:
        _err(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        code = 1
    # the outcome is decided: a Ctrl-C now would only kill the interpreter's shutdown (exit by signal, no message)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)


from qtool.commands_run import perplexity, run  # noqa: E402  (light module: heavy imports are inside)

app.command()(run)
app.command()(perplexity)

from qtool.commands_imatrix import imatrix  # noqa: E402

app.command()(imatrix)
