"""`parley bench [PART ...] [--quick] [--json PATH]`: measure Parley on this machine.

Parts are the keys of `app.bench.PARTS`; without a PART every part runs.
`--quick` alone runs `speed` only (prefill tokens/s at 1K context, decode
tokens/s: a few seconds); with PARTs it runs their reduced forms (ttft/restore
at 1K-2K, save at 1K and 4K, agents with 2 rounds). Put `--json` after the
PARTs (`parley bench quality --json`), since it may take a path. Prints one table
per part; `--json PATH` also writes {part: results} as JSON, `--plot PATH` a
PNG of the cache parts (needs matplotlib: pip install 'parley[bench]').
Cache benchmarks work in a temporary PARLEY_HOME.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.bench import PARTS, get_part, get_table

QUICK = ["speed"]
MODEL_FREE = {"peer", "startup"}  # parts that load the model in their own processes only


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure speed (and more) on this machine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", metavar="PART",
                   help=f"what to measure: {', '.join(sorted(PARTS))}")
    p.add_argument("--quick", action="store_true", help="alone: prefill/decode speed only; with PARTs: their reduced forms")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-", default=None,
                   help="also write the results as JSON to PATH; without PATH (or '-'), print only the JSON on stdout")
    p.add_argument("--plot", metavar="PATH", default=None, help="also draw the cache parts' results as a PNG at PATH")
    p.add_argument("--text", metavar="PATH", default=None, help="quality: measure perplexity on this text file instead of the shipped one")
    p.add_argument("--max-tokens", type=int, default=8192, help="quality with --text: tokens of the text to read (default 8192)")
    p.add_argument("--context", type=int, default=1024, help="prompt length for prefill (default 1024)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size (default 512)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement, median taken (default 3)")
    p.add_argument("--window", type=int, default=None,
                   help="memory: context window in tokens (default: chosen so the conversation overflows once)")
    p.add_argument("--memory-turns", type=int, default=None, help="memory: turns of the conversation (default 200)")
    p.add_argument("--clients", type=int, nargs="+", dest="serve_clients", default=None, metavar="K",
                   help="serve: numbers of simulated clients to run (default 1 4 8)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps, median taken (default 64)")
    p.add_argument("--rounds", type=int, default=None, help="peer, startup: rounds, medians taken (default 5; with --quick 1 for peer, 3 for startup)")
    p.add_argument("--peer-python", metavar="PATH", default=None,
                   help="peer: the Python that has llama-cpp-python (default: this one, if it has it)")
    p.add_argument("--only", dest="peer_only", choices=["prefill"], default=None,
                   help="peer: only these measurements (prefill: the prefill rows, one token generated)")
    p.set_defaults(handler=run)


def _table(part: str, result: dict) -> str:
    own = get_table(part)
    if own is not None:
        return f"== {part} ==\n{own(result)}"
    width = max(len(k) for k in result)
    lines = [f"== {part} =="]
    lines += [f"{k:<{width}}  {v}" for k, v in result.items()]
    return "\n".join(lines)


def run(args) -> int:
    from app.model.loader import load_model

    parts = list(dict.fromkeys(args.parts or (QUICK if args.quick else list(PARTS))))
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"parley bench: unknown part {unknown[0]!r}; choose from {', '.join(sorted(PARTS))}", file=sys.stderr)
        return 2
    lm = None if set(parts) <= MODEL_FREE else load_model(args.model)
    results = {}
    for part in parts:
        results[part] = get_part(part)(lm, args)
        print(_table(part, results[part]), file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    if args.json == "-":
        print(json.dumps(results[parts[0]] if len(parts) == 1 else results))
    elif args.json:
        from app.bench.common import machine

        Path(args.json).write_text(json.dumps({**results, "machine": machine()}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from app.bench.plot import write

        if write(results, args.plot):
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0
