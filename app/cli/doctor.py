"""`parley doctor [--json]`: what Parley runs on (kernels and their variant, CPU instruction sets, BLAS,
MLX device, versions), to include in a bug report or to explain a speed figure (app/diagnostics.py)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="show the compute setup: C kernels, CPU, BLAS, MLX, versions")
    parser.add_argument("--json", action="store_true", help="print it as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from app.diagnostics import active_setup, report

    info = active_setup()
    print(json.dumps(info, indent=2) if args.json else report(info))
    return 0
