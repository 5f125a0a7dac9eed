"""`parley models [--json]`, `parley models add PATH_OR_REPO`, `parley models remove NAME`.

The list shows every model Parley knows (name, architecture, size on disk,
quantization, where from); `--model NAME` takes any name it prints. `add`
converts a GGUF file once, registers an mlx-lm folder, or fetches a Hugging
Face repo (where a network exists). `remove` deletes what Parley made (a
converted GGUF) and only forgets a folder that was registered.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, add or remove models")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    add = sub.add_parser("add", help="convert a GGUF file, or register an mlx-lm folder or Hugging Face repo")
    add.add_argument("source", help="a .gguf file, an mlx-lm folder, or a Hugging Face repo id")
    remove = sub.add_parser("remove", help="remove a model Parley converted, or forget a registered folder")
    remove.add_argument("name", help="a name that `parley models` lists")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from app.model import registry

    if args.models_command == "add":
        info = _add(args.source)
        print(f"added {info.name} ({info.architecture}, {info.quantization}, {_size(info.size_bytes)})")
        return 0
    if args.models_command == "remove":
        info = registry.remove(args.name)
        print(f"{'removed' if info.owned else 'forgot'} {info.name}" + ("" if info.owned else f" (left {info.folder} as it is)"))
        return 0
    models = registry.known_models()
    if args.json:
        print(json.dumps([{"name": m.name, "architecture": m.architecture, "size_bytes": m.size_bytes,
                           "quantization": m.quantization, "source": m.source, "folder": str(m.folder)}
                          for m in models], indent=2))
        return 0
    if not models:
        print("No models yet. The embedded model is prepared on first start; add one with `parley models add`.")
        return 0
    rows = [[m.name, m.architecture, _size(m.size_bytes), m.quantization, m.source] for m in models]
    widths = [max(len(r[i]) for r in rows + [_HEADERS]) for i in range(len(_HEADERS))]
    for r in [_HEADERS] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


_HEADERS = ["NAME", "ARCHITECTURE", "SIZE", "QUANTIZATION", "SOURCE"]


def _add(source: str):
    from pathlib import Path

    from app.model import registry
    from app.model.arch import check_architecture
    from app.model.loader import read_config, resolve_model_folder

    folder = resolve_model_folder(source, progress=_progress)
    print(file=sys.stderr)
    check_architecture(read_config(folder), str(folder))
    from app import paths

    if folder.resolve().parent == paths.models_dir().resolve():
        return registry.describe(folder, folder.name, owned=True)
    return registry.add_folder(Path(folder))


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(1, total)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:40]:<40}", end="", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
