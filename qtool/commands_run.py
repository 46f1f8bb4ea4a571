"""`qtool run` and `qtool perplexity`: the runner's command-line face. Heavy imports stay inside the functions."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from qtool.errors import QtoolError, UsageError
from qtool.formats.constants import KV_CACHE_TYPES

KV_HELP = ", ".join(KV_CACHE_TYPES)

MAX_SEED = 2**64 - 1  # numpy's generators take any non-negative seed; llama.cpp's are uint32, -1 meaning random


def _check_utf8(option: str, text: str) -> None:
    """argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape); they would fail deep in encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{option}: the text is not valid UTF-8") from None


def _check_run_options(max_tokens: int, temp: float, top_k: int, top_p: float, repeat_penalty: float,
                       seed: int | None, ctx: int | None) -> int | None:
    """Usage errors for options the sampler cannot honour, before the model is loaded; returns the seed to use."""
    import math
    if max_tokens < 0:
        raise UsageError(f"--max-tokens {max_tokens}: use 0 or more")
    if not math.isfinite(temp) or temp < 0:
        raise UsageError(f"--temp {temp}: use a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise UsageError(f"--top-k {top_k}: use 0 (off) or more")
    if not (0.0 <= top_p <= 1.0):  # also false for NaN
        raise UsageError(f"--top-p {top_p}: use a number from 0 to 1")
    if not math.isfinite(repeat_penalty) or repeat_penalty <= 0:  # 0 divides by zero, negatives flip logits
        raise UsageError(f"--repeat-penalty {repeat_penalty}: use a finite number > 0 (1 = off)")
    if ctx is not None and ctx < 0:  # 0 is the model's own context, as llama.cpp's -c 0
        raise UsageError(f"--ctx {ctx}: use a context of at least 1 token (0 = the model's)")
    if seed == -1:  # llama.cpp's "random seed"
        return None
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed {seed}: use 0 to {MAX_SEED}, or -1 for a random seed")
    return seed


def _check_logits(model, logits) -> None:
    """NaN or infinite logits come from broken weights; the sampler would draw garbage or fail on them."""
    import numpy as np
    if not np.isfinite(logits).all():
        raise QtoolError(f"{model.path}: the model computed NaN or infinite logits; its weights are broken")


def _generate(model, sampler, prompt_ids: list[int], max_tokens: int, out) -> tuple[list[int], float, float]:
    """Evaluate the prompt, then sample until end-of-generation or max_tokens; stream text to `out`."""
    from qtool.tokenizer import StreamDecoder
    tok = model.tokenizer
    if not prompt_ids:
        raise UsageError("the prompt is empty and the model adds no BOS token: give a prompt with -p")
    t0 = time.perf_counter()
    logits = model.eval(prompt_ids)
    t_prompt = time.perf_counter() - t0
    for t in prompt_ids:
        sampler.accept(t)
    dec = StreamDecoder(tok)
    generated: list[int] = []
    t1 = time.perf_counter()
    try:
        while len(generated) < max_tokens and model.n_past < model.n_ctx:
            _check_logits(model, logits)
            nxt = sampler.sample(logits)
            if tok.is_eog(nxt):
                break
            generated.append(nxt)
            sampler.accept(nxt)
            out(dec.feed(nxt))
            if model.n_past >= model.n_ctx:
                break
            logits = model.eval([nxt])
    finally:
        out(dec.flush())
    return generated, t_prompt, time.perf_counter() - t1


def run(
    path: Path = typer.Argument(..., help="A GGUF file"),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Complete this text and exit (no chat)"),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens"),
    temp: float = typer.Option(0.8, "--temp", help="0 = greedy"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length (capped by the model's)"),
    kv_type: str = typer.Option("f16", "--kv-type", help=f"KV cache type (llama.cpp's -ctk/-ctv): {KV_HELP}"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No statistics"),
    as_json: bool = typer.Option(False, "--json", help="With -p: print one JSON object"),
) -> None:
    """Chat with a GGUF model on the CPU, or complete one prompt with -p."""
    from qtool.model import Model
    from qtool.perplexity import peak_rss_bytes
    from qtool.sampling import Sampler, SamplerOptions

    seed = _check_run_options(max_tokens, temp, top_k, top_p, repeat_penalty, seed, ctx)
    if prompt is not None:
        _check_utf8("--prompt", prompt)
    model = Model(path, n_ctx=ctx, kv_type=kv_type)
    for note in model.notes:
        if not quiet:
            print(f"qtool: warning: {note}", file=sys.stderr)
    _warm_up(model, quiet)
    opts = SamplerOptions(temperature=temp, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty, seed=seed)
    try:
        if prompt is not None:
            ids = model.tokenizer.encode(prompt)
            pieces: list[str] = []
            sink = pieces.append if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            if not as_json:
                sys.stdout.write(prompt)
            gen, tp, tg = _generate(model, Sampler(opts), ids, max_tokens, sink)
            stats = {"prompt_tokens": len(ids), "generated_tokens": len(gen),
                     "prompt_tokens_per_s": len(ids) / tp if tp else 0.0,
                     "decode_tokens_per_s": len(gen) / tg if tg else 0.0, "peak_rss_bytes": peak_rss_bytes()}
            if as_json:
                print(json.dumps({"prompt": prompt, "completion": "".join(pieces), **stats}))
                return
            print()
            if not quiet:
                print(f"[prompt {stats['prompt_tokens_per_s']:.1f} tok/s, decode {stats['decode_tokens_per_s']:.1f} "
                      f"tok/s, KV cache {model.kv_bytes() / 1e6:.1f} MB ({kv_type}), peak RSS "
                      f"{stats['peak_rss_bytes'] / 1e6:.0f} MB]", file=sys.stderr)
            return
        _chat(model, Sampler(opts), max_tokens, quiet)
    finally:
        model.close()


def _chat(model, sampler, max_tokens: int, quiet: bool) -> None:
    """Read a line, answer it with the file's chat template; Ctrl-C stops an answer, a second one (or EOF) exits."""
    from qtool.chat import ChatTemplate
    tpl = ChatTemplate.from_metadata(model.gguf.metadata, model.tokenizer)
    if tpl.note and not quiet:
        print(f"qtool: {tpl.note}", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            return
        if not line.strip():
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # undecodable terminal bytes arrive as lone surrogates
            print("qtool: that line is not valid UTF-8; type it again", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            text = tpl.render(messages)
        except Exception as e:  # the start-up test render passed, but a template may fail on a later turn
            first = str(e).splitlines()[0] if str(e) else ""
            raise QtoolError(f"{model.path}: the chat template failed on turn {len(messages) // 2 + 1} "
                             f"({type(e).__name__}: {first})") from None
        ids = model.tokenizer.encode(text, parse_special=True)
        model.reset(0)
        if len(ids) >= model.n_ctx:
            raise QtoolError(f"the conversation no longer fits the context of {model.n_ctx} tokens")
        pieces: list[str] = []

        def sink(s: str) -> None:
            pieces.append(s)
            sys.stdout.write(s)
            sys.stdout.flush()
        try:
            gen, tp, tg = _generate(model, sampler, ids, max_tokens, sink)
            if not quiet:
                print(f"\n[{len(gen) / tg if tg else 0:.1f} tok/s]", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def perplexity(
    path: Path = typer.Argument(..., help="A GGUF file"),
    text: Path = typer.Option(..., "--text", help="A UTF-8 text file"),
    ctx: int = typer.Option(512, "--ctx", help="Window length; the second half of each window is scored"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="A reference GGUF (e.g. F32) for KL divergence"),
    kv_type: str = typer.Option("f16", "--kv-type", help=f"KV cache type of the measured file: {KV_HELP}"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Perplexity as llama-perplexity measures it (non-overlapping windows, second half scored), and with
    --reference the KL divergence, top-1 agreement and perplexity ratio against another file."""
    from qtool import perplexity as ppl
    from qtool.model import Model

    if ctx < 1:
        raise UsageError(f"--ctx {ctx}: use an even context of at least 8 tokens")
    body = read_text(text)
    model = Model(path, n_ctx=ctx, kv_type=kv_type)
    ref = Model(reference, n_ctx=ctx) if reference else None
    try:
        if quiet or as_json:
            r = ppl.run(model, body, ctx, reference=ref)
        else:
            from rich.console import Console
            from rich.progress import Progress
            with Progress(console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task("windows", total=None)
                r = ppl.run(model, body, ctx, reference=ref,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    finally:
        model.close()
        if ref:
            ref.close()
    d = r.as_dict()
    if as_json:
        print(json.dumps(d))
        return
    if quiet:
        return
    print(f"perplexity {d['perplexity']:.4f} ± {d['perplexity_error']:.4f} over {d['n_tokens']} scored tokens "
          f"({d['n_chunks']} windows of {ctx}, second half of each scored, as llama-perplexity does)")
    if ref is not None:
        print(f"reference perplexity {d['ref_perplexity']:.4f}, ratio {d['ppl_ratio']:.5f}; KL divergence mean "
              f"{d['kl_mean']:.6f} ± {d['kl_mean_error']:.6f}, p99 {d['kl_p99']:.6f}, max {d['kl_max']:.6f}; "
              f"same top-1 token {100 * d['top1_agreement']:.2f}%")
    print(f"{d['tokens_per_s']:.0f} tokens/s, peak RSS {d['peak_rss_bytes'] / 1e6:.0f} MB")


def _warm_up(model, quiet: bool) -> None:
    """Load (or, on a first run, compile) the kernels before anything is timed, saying so when compiling: numba
    then takes seconds per weight type, and a silent first run looks hung."""
    from qtool import kernels
    todo = kernels.uncompiled(model.gguf_types())
    if not todo or quiet:
        model.warm_up()
        return
    what = f"compiling kernels for {', '.join(t.name for t in todo)} (first run only)…"
    if sys.stderr.isatty():
        from rich.console import Console
        with Console(stderr=True).status(what):
            model.warm_up()
    else:
        print(f"qtool: {what}", file=sys.stderr, flush=True)
        model.warm_up()


def read_text(path: Path) -> str:
    """A text file for perplexity or calibration, as UTF-8, or a one-line error."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QtoolError(f"{path}: cannot read as UTF-8 text ({e})") from None
