"""`parley bench quality`: perplexity of each KV storage scheme against an exact cache.

The text (default: the shipped `texts/jargon-file-4.4.7.txt`, public domain) is
tokenized without special tokens and read through `app.kvstore.quality.perplexity`
in 128-token chunks, sealing every 256-token block with the scheme exactly as the
live cache does. Contexts: the first 2,048 and 8,192 tokens of the shipped text;
with `--text PATH`, the first `--max-tokens` (default 8,192) tokens of that file.

Reference: "exact" is the cache as the model computes it (float32 on the CPU, no
rounding at all). "f16" is a storage scheme like the others (a float16 cast); it
is not lossless (e.g. 30.7854 against 30.7867 at 2K), so it is reported under its
own name and the exact cache under "exact".

`parley bench quality --text PATH --json` (`--json` without a path, or `--json -`)
prints exactly one JSON object on stdout, `{"tokens": int, "ppl": {"exact": ...,
"f16": ..., "q8": ..., "k8v4": ..., "q4": ...}}`; the table then goes to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TEXT = Path(__file__).parent / "texts" / "jargon-file-4.4.7.txt"
CONTEXTS = (2048, 8192)
SCHEME_ORDER = ("f16", "q8", "k8v4", "q4")


def measure(lm, tokens: list[int], schemes=SCHEME_ORDER, chunk: int = 128, log=None) -> dict:
    """{"tokens": n, "ppl": {"exact": p, scheme: p, ...}} for `tokens`."""
    from app.kvstore.quality import perplexity

    ppl = {}
    for name in ("exact", *schemes):
        t0 = time.perf_counter()
        ppl[name] = round(perplexity(lm, tokens, None if name == "exact" else name, chunk=chunk), 4)
        if log:
            print(f"  {len(tokens)} tokens  {name:<6} ppl {ppl[name]:.4f}  ({time.perf_counter() - t0:.0f}s)", file=log, flush=True)
    return {"tokens": len(tokens), "ppl": ppl}


def table(results: list[dict]) -> str:
    from app.kvstore.schemes import get_scheme

    lines = [f"{'context':>7}  {'scheme':<6}  {'bits/elem':>9}  {'ppl':>8}  {'delta':>7}"]
    for r in results:
        base = r["ppl"]["exact"]
        for name, p in r["ppl"].items():
            bits = 32.0 if name == "exact" else get_scheme(name).bits_per_element
            lines.append(f"{r['tokens']:>7}  {name:<6}  {bits:>9.3f}  {p:>8.4f}  {100 * (p / base - 1):>+6.2f}%")
    return "\n".join(lines)


def run(lm, args) -> dict:
    """The `quality` part of `parley bench` (see module docstring)."""
    from app.errors import ParleyError

    text_path = getattr(args, "text", None)
    json_stdout = getattr(args, "json", None) == "-"
    out = sys.stderr if json_stdout else sys.stdout
    path = Path(text_path) if text_path else TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParleyError(f"Cannot read the text {path}: {exc}") from exc
    tokens = lm.tokenizer.encode(text)
    if text_path:
        contexts = [min(len(tokens), getattr(args, "max_tokens", None) or 8192)]
    else:
        contexts = list(CONTEXTS)
    if min(contexts) < 2:
        raise ParleyError(f"{path} is too short to measure perplexity (at least 2 tokens needed).")
    results = []
    for n in contexts:
        print(f"quality: {path.name}, {n} tokens (of {len(tokens)})", file=out, flush=True)
        results.append(measure(lm, tokens[:n], log=out))
    print(table(results), file=out, flush=True)
    if text_path:
        return results[0]
    from app.kvstore.schemes import get_scheme

    return {
        "text": path.name,
        "bits_per_element": {s: get_scheme(s).bits_per_element for s in SCHEME_ORDER},
        **{f"ppl_{r['tokens']}": r["ppl"] for r in results},
        **{f"delta_pct_{r['tokens']}": {k: round(100 * (v / r["ppl"]["exact"] - 1), 3) for k, v in r["ppl"].items()}
           for r in results},
    }
