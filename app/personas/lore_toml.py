"""The persona file's `[lorebook]` table <-> a card's `character_book` dict.

The dict is what Parley keeps (in `Persona.card`) and exports; the TOML form
is what a person edits. Fields Parley knows are written as plain TOML keys;
anything else a card carried (extensions, secondary keys, ...) travels in
`extra`, a JSON string, so an imported lorebook round-trips exactly.
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import ParleyError
from app.personas.lorebook import MAX_ENTRIES, parse_book, parse_entry

ENTRY_TEXT = ("name", "comment", "content")
ENTRY_BOOL = ("constant", "enabled", "case_sensitive", "use_regex")
ENTRY_INT = ("insertion_order", "priority")
BOOK_TEXT = ("name", "description")
BOOK_INT = ("scan_depth", "token_budget")


def _plain(name: str, value: Any, texts, bools, ints) -> bool:
    """Whether `value` can be written as the plain TOML key `name` (else it goes to `extra`)."""
    if name in texts:
        return isinstance(value, str)
    if name in bools:
        return isinstance(value, bool)
    if name in ints:
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "keys":
        return isinstance(value, list) and all(isinstance(k, str) for k in value)
    if name == "id":
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    return False


def _split(raw: dict, texts, bools, ints, skip=()) -> tuple[dict, dict]:
    plain, extra = {}, {}
    for name, value in raw.items():
        if name in skip:
            continue
        (plain if _plain(name, value, texts, bools, ints) else extra)[name] = value
    return plain, extra


def book_to_toml(book: dict) -> list[str]:
    """Lines of a `[lorebook]` table (and its `[[lorebook.entries]]`) for a character_book dict."""
    from app.personas.tomlfile import toml_value

    plain, extra = _split(book, BOOK_TEXT, (), BOOK_INT, skip=("entries",))
    entries = book.get("entries") if isinstance(book.get("entries"), list) else None
    if entries is None and "entries" in book:
        extra["entries"] = book["entries"]
    lines = ["", "# Lorebook: entries that enter the conversation when a key is mentioned (personas/README.md).", "[lorebook]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in plain.items()]
    if extra:
        lines.append(f"extra = {toml_value(json.dumps(extra, ensure_ascii=False))}")
    for entry in entries or []:
        lines += ["", "[[lorebook.entries]]"]
        if not isinstance(entry, dict):
            lines.append(f"extra = {toml_value(json.dumps({'_entry': entry}, ensure_ascii=False))}")
            continue
        e_plain, e_extra = _split(entry, ENTRY_TEXT, ENTRY_BOOL, ENTRY_INT)
        lines += [f"{k} = {toml_value(v)}" for k, v in e_plain.items()]
        if e_extra:
            lines.append(f"extra = {toml_value(json.dumps(e_extra, ensure_ascii=False))}")
    return lines


def book_from_toml(table: Any, origin: str) -> tuple[dict, list[str]]:
    """The character_book dict of a `[lorebook]` table; returns (book, warnings).

    What a person typed as plain keys is checked strictly (every regex compiled);
    `extra` (what a card carried) is kept as it came, like an imported card.
    """
    if not isinstance(table, dict):
        raise ParleyError(f"{origin}: field 'lorebook' must be a table ([lorebook]).")
    warnings: list[str] = []
    parse_book({k: v for k, v in table.items() if k in BOOK_INT}, origin, strict=True)  # what a person typed
    book = _with_extra(table, origin, "lorebook", set(BOOK_TEXT) | set(BOOK_INT) | {"entries"}, warnings)
    entries = table.get("entries", [])
    if not isinstance(entries, list):
        raise ParleyError(f"{origin}: field 'lorebook.entries' must be a list of tables ([[lorebook.entries]]).")
    if len(entries) > MAX_ENTRIES:
        raise ParleyError(f"{origin}: the lorebook has {len(entries)} entries; at most {MAX_ENTRIES} are allowed.")
    known = set(ENTRY_TEXT) | set(ENTRY_BOOL) | set(ENTRY_INT) | {"keys", "id"}
    book["entries"] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ParleyError(f"{origin}: lorebook entry {i + 1} must be a table ([[lorebook.entries]]).")
        parse_entry({k: v for k, v in entry.items() if k in known}, i, f"{origin}: lorebook entry {i + 1}")
        made = _with_extra(entry, origin, f"lorebook entry {i + 1}", known, warnings)
        book["entries"].append(made.pop("_entry") if set(made) == {"_entry"} else made)
    return book, warnings


def _with_extra(table: dict, origin: str, where: str, known: set[str], warnings: list[str]) -> dict:
    extra = table.get("extra", "")
    if not isinstance(extra, str):
        raise ParleyError(f"{origin}: {where}: field 'extra' must be a JSON string.")
    try:
        merged = json.loads(extra) if extra.strip() else {}
    except ValueError as exc:
        raise ParleyError(f"{origin}: {where}: field 'extra' is not valid JSON ({exc}). Fix or remove it.") from exc
    if not isinstance(merged, dict):
        raise ParleyError(f"{origin}: {where}: field 'extra' must be a JSON object.")
    for key, value in table.items():
        if key in known:
            merged[key] = value
        elif key != "extra":
            warnings.append(f"{origin}: unknown key '{key}' in {where} ignored")
    return merged
