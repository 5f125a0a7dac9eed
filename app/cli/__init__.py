"""The `parley` command line (and `python -m app`).

`parley` alone opens the app. Subcommands live one per module in this
package; each module defines `register(subparsers)` which adds its parser
and sets `handler=run` where `run(args) -> int`. Global options come first:
`parley --model PATH --kv-scheme q4 --budget-mb 512 chat assistant "Hi"`.
Users script against this: keep names and outputs stable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from app import fastblas

SUBCOMMANDS = ["chat", "personas", "import_card", "export", "cache", "bench", "scene", "user", "notes", "serve", "models", "doctor"]
COMMAND_MODULES = {"import": "import_card"}  # command words whose module is named otherwise


def budget_mb(text: str) -> float:
    """argparse type: a finite number of megabytes, 0 or more (0 keeps only the conversation on screen)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of megabytes, 0 or more, not {text!r}")
    return value


def command_named(argv: list[str]) -> str | None:
    """The subcommand module `argv` asks for (`chat` for `parley --model M chat ...`), found without building the
    parser; None when help is asked for before it, none is named, or the word is not one (then `build_parser`
    builds them all, as argparse's help and error messages need). Every global option takes a value."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-h", "--help", "--"):
            return None
        if word.startswith("-"):
            i += 1 if "=" in word else 2
            continue
        if word in COMMAND_MODULES:
            return COMMAND_MODULES[word]
        return word if word in SUBCOMMANDS and word not in COMMAND_MODULES.values() else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only` (a module of SUBCOMMANDS) just that subcommand: a `parley chat`
    start then imports no other command's module."""
    parser = argparse.ArgumentParser(prog="parley", description="Chat with many persistent personas on a local MLX model.")
    parser.add_argument("--model", default=None, help="a name from `parley models`, a .gguf file, a local mlx-lm folder or a Hugging Face repo id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--kv-scheme", default="q4", help="how caches are stored: q4 (default), k8v4, q8, f16")
    parser.add_argument("--budget-mb", type=budget_mb, default=512.0, help="RAM for conversation caches, in MB (default 512)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS if only is None else [only]:
        try:
            module = importlib.import_module(f"app.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"app.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    fastblas.preload()  # before anything imports mlx
    from app.model import light_mlx_lm

    light_mlx_lm.install()  # before anything imports mlx_lm: spares importing transformers
    from app.errors import ParleyError

    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_named(words)).parse_args(words)
    args.exiting = argv is None and getattr(args, "exit_promptly", False)  # `exit_now` follows the command
    try:
        if args.command is None:
            from app.ui.app import run_app

            return run_app(args)
        code = args.handler(args)
    except ParleyError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        return 130
    write_startup_trace(started)
    if args.exiting:
        exit_now(code)
    return code


def write_startup_trace(started: float) -> None:
    """`parley bench startup`'s view inside the process it launched (only when PARLEY_STARTUP_TRACE names a file):
    when `main` began (epoch seconds), when the command was done, and how many fp32 weight copies were built."""
    path = os.environ.get("PARLEY_STARTUP_TRACE")
    if not path:
        return
    linear = sys.modules.get("app.model.cpu_linear")
    trace = {"main_at": started, "done_at": time.time(), "fp32_layers": linear.EXPANDED["layers"] if linear else 0}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(trace))
    except OSError as exc:  # the bench says the trace is missing; the command itself succeeded
        print(f"parley: warning: cannot write the start-up trace {path}: {exc}", file=sys.stderr)


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (about 0.2-0.5 s of freeing MLX arrays and modules).

    Only for commands that have saved and closed everything when they return
    (`parley chat`), and only when `main` runs as the process's command line.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)
