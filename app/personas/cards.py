"""Character Card V2/V3 import (JSON, PNG, CHARX) and V2 export (JSON, PNG).

Mapping card -> persona: name, description, personality, scenario;
first_mes + alternate_greetings -> greetings; mes_example -> examples;
system_prompt (replaces the default system prompt when non-empty);
post_history_instructions; creator_notes (kept, never prompted); tags;
`extensions` kept exactly (Parley's own sampling and colour travel in
`extensions.parley` and are taken out again on import); any other card data
(creator, character_book, ...) is kept in `Persona.card` for export.
The format is sniffed from the bytes, not the file name.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from app.errors import ParleyError
from app.personas import model
from app.personas.charx import card_json_from_charx
from app.personas.model import Persona, build_persona, slugify
from app.personas.png import SIGNATURE, solid_png, text_chunks

MAX_CARD_FILE_BYTES = 256 * 1024 * 1024
SPECS = {"chara_card_v2", "chara_card_v3"}
TEXT = ("description", "personality", "scenario", "first_mes", "mes_example", "creator_notes", "system_prompt",
        "post_history_instructions")
MAPPED = set(TEXT) | {"name", "alternate_greetings", "tags", "extensions"}
V2_EXTRAS = ("creator", "character_version", "character_book")
PALETTE = ["#5b8def", "#d9822b", "#8e7cc3", "#2e9e6b", "#17a2b8", "#e0457b", "#b5651d", "#c0392b", "#f1c40f",
           "#16a085", "#9b59b6", "#e67e22"]


# -- reading ---------------------------------------------------------------------


def read_card(data: bytes, origin: str) -> Persona:
    """A persona from card bytes (JSON, PNG or CHARX); its id is the slug of its name (not yet unique)."""
    if len(data) > MAX_CARD_FILE_BYTES:
        raise ParleyError(f"{origin}: the file is {len(data) >> 20} MB; a card may be at most {MAX_CARD_FILE_BYTES >> 20} MB.")
    if data.startswith(SIGNATURE):
        blob = _png_card_json(data, origin)
    elif data.startswith(b"PK"):
        blob = card_json_from_charx(data, origin)
    else:
        blob = data
    return card_to_persona(_parse_json(blob, origin), origin)


def _png_card_json(data: bytes, origin: str) -> bytes:
    texts = text_chunks(data, origin)
    keyword = "ccv3" if "ccv3" in texts else "chara" if "chara" in texts else None
    if keyword is None:
        raise ParleyError(f"{origin}: this PNG has no character card (no 'chara' or 'ccv3' text chunk).")
    value = "".join(texts[keyword].split())
    value += "=" * (-len(value) % 4)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParleyError(f"{origin}: PNG text chunk '{keyword}' is not valid base64 ({exc}).") from exc


def _parse_json(blob: bytes, origin: str) -> Any:
    try:
        return json.loads(blob.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ParleyError(f"{origin}: the card is not UTF-8 JSON (byte {exc.start}).") from exc
    except (ValueError, RecursionError) as exc:
        raise ParleyError(f"{origin}: the card is not valid JSON: {str(exc)[:200]}.") from exc


def card_to_persona(card: Any, origin: str) -> Persona:
    """Map a decoded card (V2, V3, or a bare V1 object) to a Persona; ParleyError names the card field."""
    if not isinstance(card, dict):
        raise ParleyError(f"{origin}: a card must be a JSON object, not {type(card).__name__}.")
    spec = card.get("spec")
    if spec is None and "name" in card:  # V1: the fields at the top level
        data = card
    elif spec in SPECS:
        data = card.get("data")
        if not isinstance(data, dict):
            raise ParleyError(f"{origin}: field 'data' must be an object holding the character.")
    else:
        raise ParleyError(f"{origin}: field 'spec' is {spec!r:.60}; expected 'chara_card_v2' or 'chara_card_v3'.")

    texts = {key: model.text_field(data, key, origin) for key in TEXT}
    name = model.text_field(data, "name", origin).strip()
    if not name:
        raise ParleyError(f"{origin}: field 'name' is missing or empty; a card needs a character name.")
    alternates = model.text_list_field(data, "alternate_greetings", origin, model.MAX_GREETINGS - 1)
    tags = model.text_list_field(data, "tags", origin, model.MAX_TAGS)
    extensions = dict(model.json_dict_field(data, "extensions", origin, model.MAX_EXTENSIONS_BYTES))
    ours = extensions.pop("parley", None)
    ours = ours if isinstance(ours, dict) else {}
    extras = {k: v for k, v in data.items() if k not in MAPPED and v not in ("", None, [], {})}
    model.json_dict_field({"card": extras}, "card", origin, model.MAX_CARD_EXTRA_BYTES)

    greetings = [g for g in (texts["first_mes"], *alternates) if g.strip()]
    fields = {
        "id": slugify(name),
        "name": name[:200].splitlines()[0] if name.splitlines() else name,
        "description": texts["description"],
        "personality": texts["personality"],
        "scenario": texts["scenario"],
        "greetings": greetings,
        "examples": texts["mes_example"],
        "system_prompt": texts["system_prompt"],
        "post_history_instructions": texts["post_history_instructions"],
        "creator_notes": texts["creator_notes"],
        "tags": list(tags),
        "extensions": extensions,
        "card": extras,
        "color": _color(ours.get("color"), name),
    }
    for key in ("temperature", "top_p", "max_tokens"):
        if key in ours:
            fields[key] = ours[key]
    try:
        return build_persona(fields, origin)
    except ParleyError:
        if not ours:
            raise
        for key in ("temperature", "top_p", "max_tokens"):  # a bad Parley extension is not worth refusing a card for
            fields.pop(key, None)
        return build_persona(fields, origin)


def _color(value: Any, name: str) -> str:
    if isinstance(value, str) and model.COLOR_PATTERN.match(value):
        return value.lower()
    return PALETTE[hashlib.sha256(name.encode("utf-8", "replace")).digest()[0] % len(PALETTE)]


def import_card(path: Path | str, directory: Path | str | None = None) -> Persona:
    """Read a card file, give it a fresh id and save it as a persona file (default: the user folder)."""
    from app.personas.loader import default_dirs, new_persona_id, save_persona, shipped_personas_dir

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CARD_FILE_BYTES:
            raise ParleyError(f"{path}: the file is {size >> 20} MB; a card may be at most {MAX_CARD_FILE_BYTES >> 20} MB.")
        data = path.read_bytes()
    except OSError as exc:
        raise ParleyError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    persona = read_card(data, str(path))
    dirs = default_dirs() if directory is None else [shipped_personas_dir(), Path(directory)]
    persona = dataclasses.replace(persona, id=new_persona_id(persona.name, dirs))
    saved = save_persona(persona, dirs[-1])
    return dataclasses.replace(persona, source=saved)


# -- writing ---------------------------------------------------------------------


def persona_to_card(persona: Persona) -> dict[str, Any]:
    """A Character Card V2 object for the persona."""
    extensions = dict(persona.extensions)
    extensions["parley"] = {
        "color": persona.color,
        "temperature": persona.temperature,
        "top_p": persona.top_p,
        "max_tokens": persona.max_tokens,
    }
    data: dict[str, Any] = {
        "name": persona.name,
        "description": persona.description,
        "personality": persona.personality,
        "scenario": persona.scenario,
        "first_mes": persona.greetings[0] if persona.greetings else "",
        "mes_example": persona.examples,
        "creator_notes": persona.creator_notes,
        "system_prompt": persona.system_prompt,
        "post_history_instructions": persona.post_history_instructions,
        "alternate_greetings": list(persona.greetings[1:]),
        "tags": list(persona.tags),
        "creator": persona.card.get("creator", "") if isinstance(persona.card.get("creator"), str) else "",
        "character_version": persona.card.get("character_version", "")
        if isinstance(persona.card.get("character_version"), str)
        else "",
        "extensions": extensions,
    }
    if isinstance(persona.card.get("character_book"), dict):
        data["character_book"] = persona.card["character_book"]
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def card_png(persona: Persona) -> bytes:
    """A 64x64 square in the persona's colour carrying the V2 card in a `chara` tEXt chunk."""
    blob = json.dumps(persona_to_card(persona), ensure_ascii=False).encode("utf-8")
    return solid_png(persona.color, texts={"chara": base64.b64encode(blob).decode("ascii")})


def export_card(persona: Persona, path: Path | str) -> Path:
    """Write the persona as a V2 card: `.json` or `.png`, chosen by the file name."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        payload = (json.dumps(persona_to_card(persona), ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    elif suffix == ".png":
        payload = card_png(persona)
    else:
        raise ParleyError(f"{path}: cannot tell the card format from '{path.suffix}'; use a name ending in .json or .png.")
    try:
        path.write_bytes(payload)
    except OSError as exc:
        raise ParleyError(f"{path}: cannot be written ({exc.strerror or exc}).") from exc
    return path
