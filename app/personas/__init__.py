"""Personas: TOML files in, `Persona` records and preamble messages out. No MLX, no UI, no SQL.

Format of a persona file: see `personas/README.md`. Character cards (V2/V3,
JSON/PNG/CHARX) are in `cards.py`.
"""

from app.personas.loader import (
    LoadResult,
    default_dirs,
    load_persona_file,
    load_personas,
    new_persona_id,
    save_persona,
    shipped_personas_dir,
)
from app.personas.model import Persona, build_persona, slugify, unique_id
from app.personas.preamble import post_history, preamble_hash, preamble_messages, system_message
from app.personas.tomlfile import dump_persona_toml, parse_persona_toml

__all__ = [
    "LoadResult",
    "Persona",
    "build_persona",
    "default_dirs",
    "dump_persona_toml",
    "load_persona_file",
    "load_personas",
    "new_persona_id",
    "parse_persona_toml",
    "post_history",
    "preamble_hash",
    "preamble_messages",
    "save_persona",
    "shipped_personas_dir",
    "slugify",
    "system_message",
    "unique_id",
]
