"""`qtool run` and `qtool perplexity`: the runner's command-line face. Heavy imports stay inside the functions."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from qtool.errors import QtoolError


def _generate(model, sampler, prompt_ids: list[int], max_tokens: int, out) -> tuple[list[int], float, float]:
    """Evaluate the prompt, then sample until end-of-generation or max_tokens; stream text to `out`."""
    from qtool.tokenizer import StreamDecoder
    tok = model.tokenizer
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
    kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16 or q8_0"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No statistics"),
    as_json: bool = typer.Option(False, "--json", help="With -p: print one JSON object"),
) -> None:
    """Chat with a GGUF model on the CPU, or complete one prompt with -p."""
    from qtool.model import Model
    from qtool.perplexity import peak_rss_bytes
    from qtool.sampling import Sampler, SamplerOptions

    model = Model(path, n_ctx=ctx, kv_type=kv_type)
    model.warm_up()  # so that the prompt's tokens/s is not the kernels' loading time
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
        messages.append({"role": "user", "content": line})
        text = tpl.render(messages)
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
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Perplexity as llama-perplexity measures it (non-overlapping windows, second half scored), and with
    --reference the KL divergence, top-1 agreement and perplexity ratio against another file."""
    from qtool import perplexity as ppl
    from qtool.model import Model

    try:
        body = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QtoolError(f"{text}: cannot read as UTF-8 text ({e})") from None
    model = Model(path, n_ctx=ctx)
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
