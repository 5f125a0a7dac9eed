"""Persona files: TOML in, TOML out (a small writer of our own, so no extra dependency).

The format is documented in `personas/README.md`. Reading is strict about types
and sizes (see `model.build_persona`) and lenient about unknown keys, which are
reported but do not stop the persona from loading.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from app.errors import ParleyError
from app.personas.lore_toml import book_from_toml, book_to_toml
from app.personas.model import (
    DEFAULT_COLOR,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Persona,
    build_persona,
)

MAX_FILE_BYTES = 2 * 1024 * 1024
TOP_KEYS = {
    "id",
    "name",
    "description",
    "color",
    "tags",
    "greetings",
    "system_prompt",
    "personality",
    "scenario",
    "examples",
    "post_history_instructions",
    "creator_notes",
    "sampling",
    "card",
    "lorebook",
    "user",
}
SAMPLING_KEYS = {"temperature", "top_p", "max_tokens"}
CARD_KEYS = {"extensions", "data"}


def parse_persona_toml(data: bytes, origin: str, default_id: str | None = None, source: Path | None = None):
    """Parse one persona file's bytes. Returns (persona, warnings); raises ParleyError naming file and field."""
    if len(data) > MAX_FILE_BYTES:
        raise ParleyError(
            f"{origin}: field '{_biggest_key(data)}' makes the file {len(data) // (1024 * 1024)} MB; a persona file "
            f"may be at most {MAX_FILE_BYTES // (1024 * 1024)} MB and each field 64 KB. Shorten it."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParleyError(f"{origin}: the file is not UTF-8 text (byte {exc.start}). Save it as UTF-8.") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ParleyError(f"{origin}: not valid TOML: {exc}. Fix the file or remove it.") from exc
    except RecursionError:
        # tomllib recurses once per nested array or inline table: a few thousand brackets exhaust the stack
        raise ParleyError(f"{origin}: arrays or tables nested too deeply to read; it was skipped. "
                          "Fix the file or remove it.") from None
    warnings = [f"{origin}: unknown key '{k}' ignored" for k in doc if k not in TOP_KEYS]
    fields = {k: v for k, v in doc.items() if k in TOP_KEYS - {"sampling", "card", "lorebook"}}
    if "lorebook" in doc:
        fields["lorebook"], lore_warnings = book_from_toml(doc["lorebook"], origin)
        warnings += lore_warnings
    fields.setdefault("id", default_id)
    for table, allowed in (("sampling", SAMPLING_KEYS), ("card", CARD_KEYS)):
        section = doc.get(table, {})
        if not isinstance(section, dict):
            raise ParleyError(f"{origin}: field '{table}' must be a table ([{table}]).")
        warnings += [f"{origin}: unknown key '{table}.{k}' ignored" for k in section if k not in allowed]
        for key in allowed & section.keys():
            fields["card" if (table, key) == ("card", "data") else key] = section[key]
    try:
        return build_persona(fields, origin, source=source), warnings
    except RecursionError:  # card data holding JSON nested thousands deep
        raise ParleyError(f"{origin}: card data nested too deeply to read; it was skipped. "
                          "Fix the file or remove it.") from None


def _biggest_key(data: bytes) -> str:
    """Which key's value takes the most room: good enough to point at the culprit without parsing 100 MB."""
    starts = [(m.start(), m.group(1).decode("ascii")) for m in re.finditer(rb"(?m)^[ \t]*([A-Za-z0-9_-]+)[ \t]*=", data)]
    if not starts:
        return "?"
    spans = [(end - start, key) for (start, key), (end, _) in zip(starts, starts[1:] + [(len(data), "")])]
    return max(spans)[1]


# -- writing -------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string (multi-line when the text has newlines) that reads back exactly."""

    def esc(ch: str, multiline: bool) -> str:
        if ch == "\n":
            return "\n" if multiline else "\\n"
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"\\u{ord(ch):04X}"
        return ch

    if "\n" in value:
        return '"""\n' + "".join(esc(c, True) for c in value) + '"""'
    return '"' + "".join(esc(c, False) for c in value) + '"'


def toml_value(value: Any) -> str:
    """One value written as TOML (persona files and lorebook files share this writer)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        items = [toml_value(v) for v in value]
        if any("\n" in i for i in items) or sum(len(i) for i in items) > 60:
            return "[\n" + "".join(f"    {i},\n" for i in items) + "]"
        return "[" + ", ".join(items) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_persona_toml(persona: Persona) -> str:
    """The persona as a human-editable TOML file (empty optional fields left out)."""
    lines = ["# A Parley persona. Format: personas/README.md in the Parley repository.", ""]
    lines.append(f"id = {toml_value(persona.id)}")
    lines.append(f"name = {toml_value(persona.name)}")
    lines.append(f"description = {toml_value(persona.description)}")
    lines.append(f"color = {toml_value(persona.color or DEFAULT_COLOR)}")
    if persona.tags:
        lines.append(f"tags = {toml_value(list(persona.tags))}")
    lines.append(f"greetings = {toml_value(list(persona.greetings))}")
    lines.append(f"system_prompt = {toml_value(persona.system_prompt)}")
    for key in ("personality", "scenario", "examples", "post_history_instructions", "creator_notes"):
        if getattr(persona, key):
            lines.append(f"{key} = {toml_value(getattr(persona, key))}")
    if persona.user is not None:
        lines += ["", "# Who you are in this persona's chats (overrides your global persona, `parley user`).", "[user]"]
        lines.append(f"name = {toml_value(persona.user.name)}")
        lines.append(f"description = {toml_value(persona.user.description)}")
    lines += ["", "[sampling]"]
    lines.append(f"temperature = {toml_value(float(persona.temperature))}")
    lines.append(f"top_p = {toml_value(float(persona.top_p))}")
    lines.append(f"max_tokens = {toml_value(int(persona.max_tokens))}")
    book = persona.card.get("character_book")
    card = {k: v for k, v in persona.card.items() if k != "character_book" or not isinstance(book, dict)}
    if persona.extensions or card:
        lines += ["", "# Character-card data kept for export (JSON).", "[card]"]
        if persona.extensions:
            lines.append(f"extensions = {toml_value(json.dumps(persona.extensions, ensure_ascii=False))}")
        if card:
            lines.append(f"data = {toml_value(json.dumps(card, ensure_ascii=False))}")
    if isinstance(book, dict):
        lines += book_to_toml(book)
    return "\n".join(lines) + "\n"


__all__ = ["parse_persona_toml", "dump_persona_toml", "toml_string", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "DEFAULT_MAX_TOKENS"]
