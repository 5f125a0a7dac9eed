"""`parley export PERSONA PATH`: write a persona as a Character Card V2 (.json or .png)."""

from __future__ import annotations

import argparse

from app.errors import ParleyError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a persona as a character card (.json or .png)")
    parser.add_argument("persona", help="the persona's id (see `parley personas`)")
    parser.add_argument("path", help="where to write it; the suffix picks the format")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from app.personas import load_personas
    from app.personas.cards import export_card

    personas = load_personas().personas
    persona = personas.get(args.persona)
    if persona is None:
        known = ", ".join(sorted(personas)) or "none"
        raise ParleyError(f"No persona with id {args.persona!r}. Known ids: {known}.")
    print(export_card(persona, args.path))
    return 0
