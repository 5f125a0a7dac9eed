"""Lorebooks (a card's `character_book`): which entries a turn brings into the conversation.

A persona's lorebook lives in `Persona.card["character_book"]`, in the
Character Card V2 shape, whether it came from an imported card or from the
persona file's `[lorebook]` table (see `lore_toml` and personas/README.md),
so a card exported again carries it unchanged.

Why entries enter at the end: an entry inserted at a fixed depth from the end
of the transcript moves every turn, so everything after it would have to be
read again. Parley instead adds a triggered entry once, as a note right
before the user's message that triggered it, and keeps it there in history:
the cached prefix never changes. Constant entries join the preamble.

Everything here is a pure function of its arguments (no files, no model):
`triggered_entries` takes the token counter it should use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import ParleyError

DEFAULT_SCAN_DEPTH = 4  # messages, counting the user's new one
DEFAULT_TOKEN_BUDGET = 512  # tokens of triggered entries a single turn may add
DEFAULT_INSERTION_ORDER = 100
MAX_SCAN_DEPTH = 1000
MAX_ENTRIES = 1000
_SLASHED = re.compile(r"^/(.+)/([imsx]*)$", re.DOTALL)
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass(frozen=True)
class LoreEntry:
    """One entry. `uid` is stable across loads (the card's `id`, else its position) and names it in the catalog."""

    uid: str
    name: str
    keys: tuple[str, ...]
    content: str
    patterns: tuple[re.Pattern, ...] = ()
    constant: bool = False
    enabled: bool = True
    case_sensitive: bool = False
    insertion_order: int = DEFAULT_INSERTION_ORDER
    priority: int = 0
    index: int = 0

    def matches(self, text: str) -> bool:
        """Any key found in `text`: plain keys as substrings, regex keys (`/re/flags`, or `use_regex`) by search."""
        for pattern in self.patterns:
            if pattern.search(text):
                return True
        return False


@dataclass(frozen=True)
class Lorebook:
    entries: tuple[LoreEntry, ...] = ()
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int = DEFAULT_TOKEN_BUDGET

    def constant_entries(self) -> list[LoreEntry]:
        """Entries that are always in the preamble, in insertion order."""
        return sorted((e for e in self.entries if e.enabled and e.constant), key=_order)


def _order(entry: LoreEntry) -> tuple[int, int]:
    return entry.insertion_order, entry.index


def key_pattern(key: str, case_sensitive: bool, use_regex: bool) -> re.Pattern:
    """`/pattern/flags` is a regular expression with its own flags; otherwise a plain (or `use_regex`) key."""
    slashed = _SLASHED.match(key)
    if slashed:
        flags = 0
        for letter in slashed.group(2):
            flags |= _FLAGS[letter]
        return re.compile(slashed.group(1), flags)
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(key if use_regex else re.escape(key), flags)


def triggered_entries(
    book: Lorebook,
    recent: Sequence[str],
    count_tokens: Callable[[str], int],
    present: Collection[str] = (),
) -> list[LoreEntry]:
    """The entries this turn adds, in insertion order.

    `recent` are the visible messages' texts, oldest first (the user's new one
    last); only the last `scan_depth` are scanned. Entries already `present`
    in the visible conversation (by uid), constant and disabled ones never
    trigger. When the triggered entries exceed the token budget, the ones
    with the highest priority (then lowest insertion order) are kept and any
    that would overflow it are left out.
    """
    depth = max(0, book.scan_depth)
    scanned = "\n".join(recent[-depth:]) if depth else ""
    candidates = [
        e for e in book.entries
        if e.enabled and not e.constant and e.uid not in present and e.content.strip() and e.matches(scanned)
    ]
    chosen, used = [], 0
    for entry in sorted(candidates, key=lambda e: (-e.priority, e.insertion_order, e.index)):
        cost = count_tokens(entry.content)
        if used + cost <= book.token_budget:
            chosen.append(entry)
            used += cost
    return sorted(chosen, key=_order)


# -- from the card's character_book dict -------------------------------------


def parse_book(book: Any, origin: str, strict: bool = False) -> Lorebook:
    """A `Lorebook` from a V2/V3 `character_book` dict.

    strict (a persona file): a bad field raises ParleyError naming it.
    Lenient (an imported card, kept as it came): a bad entry is skipped.
    """
    if book is None:
        return Lorebook()
    if not isinstance(book, dict):
        if strict:
            raise ParleyError(f"{origin}: the lorebook must be a table.")
        return Lorebook()
    raw_entries = book.get("entries", [])
    if not isinstance(raw_entries, list):
        if strict:
            raise ParleyError(f"{origin}: field 'lorebook.entries' must be a list of entries ([[lorebook.entries]]).")
        raw_entries = []
    if len(raw_entries) > MAX_ENTRIES:
        if strict:
            raise ParleyError(f"{origin}: the lorebook has {len(raw_entries)} entries; at most {MAX_ENTRIES} are allowed.")
        raw_entries = raw_entries[:MAX_ENTRIES]  # an imported card: the rest is kept for export, not used
    entries = []
    for index, raw in enumerate(raw_entries):
        try:
            entries.append(parse_entry(raw, index, f"{origin}: lorebook entry {index + 1}"))
        except ParleyError:
            if strict:
                raise
    try:
        scan_depth = _int(book, "scan_depth", DEFAULT_SCAN_DEPTH, 0, MAX_SCAN_DEPTH, f"{origin}: lorebook")
        token_budget = _int(book, "token_budget", DEFAULT_TOKEN_BUDGET, 0, 1 << 20, f"{origin}: lorebook")
    except ParleyError:
        if strict:
            raise
        scan_depth, token_budget = DEFAULT_SCAN_DEPTH, DEFAULT_TOKEN_BUDGET
    return Lorebook(tuple(entries), scan_depth, token_budget)


def parse_entry(raw: Any, index: int, where: str) -> LoreEntry:
    if not isinstance(raw, dict):
        raise ParleyError(f"{where} must be a table.")
    keys = raw.get("keys", [])
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ParleyError(f"{where}: field 'keys' must be a list of text, like [\"moon\", \"/lunar?/i\"].")
    content = raw.get("content", "")
    if not isinstance(content, str):
        raise ParleyError(f"{where}: field 'content' must be text.")
    flags = {name: _bool(raw, name, default, where) for name, default in
             (("constant", False), ("enabled", True), ("case_sensitive", False), ("use_regex", False))}
    patterns = []
    for key in (k for k in keys if k.strip()):
        try:
            patterns.append(key_pattern(key, flags["case_sensitive"], flags["use_regex"]))
        except re.error as exc:
            raise ParleyError(f"{where}: key {key!r:.60} is not a valid regular expression ({exc}). Fix or remove it.") from exc
    uid = raw.get("id")
    uid = str(uid) if isinstance(uid, (int, str)) and not isinstance(uid, bool) and str(uid).strip() else f"#{index + 1}"
    name = next((v for v in (raw.get("name"), raw.get("comment")) if isinstance(v, str) and v.strip()), None)
    return LoreEntry(
        uid=uid,
        name=(name or (keys[0] if keys else uid)).strip()[:80],
        keys=tuple(keys),
        content=content,
        patterns=tuple(patterns),
        constant=flags["constant"],
        enabled=flags["enabled"],
        case_sensitive=flags["case_sensitive"],
        insertion_order=_int(raw, "insertion_order", DEFAULT_INSERTION_ORDER, -(1 << 31), 1 << 31, where),
        priority=_int(raw, "priority", 0, -(1 << 31), 1 << 31, where),
        index=index,
    )


def _bool(raw: dict, name: str, default: bool, where: str) -> bool:
    value = raw.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ParleyError(f"{where}: field '{name}' must be true or false, not {value!r:.40}.")
    return value


def _int(raw: dict, name: str, default: int, low: int, high: int, where: str) -> int:
    value = raw.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParleyError(f"{where}: field '{name}' must be a whole number, not {value!r:.40}.")
    if not low <= value <= high:
        raise ParleyError(f"{where}: field '{name}' is {value}; it must be between {low} and {high}.")
    return value


def lorebook_of(persona) -> Lorebook:
    """The persona's lorebook (empty when it has none); never raises on an imported card's odd data."""
    card = getattr(persona, "card", None) or {}
    return parse_book(card.get("character_book"), f"persona {getattr(persona, 'id', '?')}", strict=False)
