"""`parley import PATH`: turn a character card (V2/V3 JSON, PNG or CHARX) into a persona file.

Prints only the new persona's id on stdout, so scripts can capture it.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="import a character card (JSON, PNG or CHARX) as a persona")
    parser.add_argument("path", help="the card file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from app.personas.cards import import_card

    persona = import_card(args.path)
    print(f"Imported {persona.name!r} into {persona.source}", file=sys.stderr)
    print(persona.id)
    return 0
