"""The `Persona` record and the checks every source (TOML file, character card) goes through.

Both persona files and imported cards are turned into a plain dict of fields
and handed to `build_persona`, so a bad value is reported the same way
whichever door it came in by: the file, the field, and what to do.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ParleyError

MAX_FIELD_BYTES = 64 * 1024  # any one text field (lists: all items together)
MAX_EXTENSIONS_BYTES = 256 * 1024  # card `extensions`, as JSON
MAX_CARD_EXTRA_BYTES = 1024 * 1024  # other card data kept for export (lorebooks), as JSON
MAX_GREETINGS = 64
MAX_TAGS = 64
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
COLOR_PATTERN = re.compile(r"^#[0-9a-fA-F]{6}$")

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_TOKENS = 512
DEFAULT_COLOR = "#5b8def"

TEXT_FIELDS = (
    "name",
    "description",
    "system_prompt",
    "personality",
    "scenario",
    "examples",
    "post_history_instructions",
    "creator_notes",
)


@dataclass(frozen=True)
class Persona:
    """One persona. Text may use the card macros {{char}} and {{user}}; they are filled in the preamble.

    `creator_notes` are for people and never reach a prompt. `extensions` and
    `card` (other character-card data, such as a lorebook) are kept as they
    came so an exported card loses nothing.
    """

    id: str
    name: str
    description: str = ""
    system_prompt: str = ""
    greetings: tuple[str, ...] = ()
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_tokens: int = DEFAULT_MAX_TOKENS
    color: str = DEFAULT_COLOR
    examples: str = ""
    personality: str = ""
    scenario: str = ""
    post_history_instructions: str = ""
    creator_notes: str = ""
    tags: tuple[str, ...] = ()
    extensions: dict[str, Any] = field(default_factory=dict, hash=False)
    card: dict[str, Any] = field(default_factory=dict, hash=False)
    source: Path | None = field(default=None, compare=False)
    user: Any = None  # this persona's own [user] overrides (a personas.user.UserProfile), written to its file
    global_user: Any = field(default=None, compare=False)  # the global profile, set by the loader, never written

    @property
    def greeting(self) -> str | None:
        return self.greetings[0] if self.greetings else None

    def preamble_messages(self) -> list[dict[str, str]]:
        """See `app.personas.preamble.preamble_messages`."""
        from app.personas.preamble import preamble_messages

        return preamble_messages(self)

    def preamble_hash(self) -> str:
        """See `app.personas.preamble.preamble_hash`."""
        from app.personas.preamble import preamble_hash

        return preamble_hash(self)


def _where(origin: str, name: str) -> str:
    return f"{origin}: field '{name}'"


def _size(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def text_field(fields: dict, name: str, origin: str, default: str = "") -> str:
    """Field `name` as text within its size limit, or a ParleyError naming `origin` and the field (persona files, cards)."""
    value = fields.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, str):
        raise ParleyError(f"{_where(origin, name)} must be text, not {type(value).__name__}. Put it in quotes.")
    if _size(value) > MAX_FIELD_BYTES:
        raise ParleyError(
            f"{_where(origin, name)} is {_size(value) // 1024} KB; the limit is {MAX_FIELD_BYTES // 1024} KB. Shorten it."
        )
    _check_encodable(value, origin, name)
    return value


def _check_encodable(value: str, origin: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParleyError(f"{_where(origin, name)} contains text that is not valid Unicode. Remove it.") from exc


def text_list_field(fields: dict, name: str, origin: str, limit: int) -> tuple[str, ...]:
    """Field `name` as at most `limit` texts, or a ParleyError naming `origin` and the field (persona files, cards)."""
    value = fields.get(name, ())
    if value is None:
        value = ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ParleyError(f"{_where(origin, name)} must be a list of text, like [\"one\", \"two\"].")
    if len(value) > limit:
        raise ParleyError(f"{_where(origin, name)} has {len(value)} entries; at most {limit} are allowed.")
    if sum(_size(v) for v in value) > MAX_FIELD_BYTES:
        raise ParleyError(f"{_where(origin, name)} is over {MAX_FIELD_BYTES // 1024} KB in all. Shorten it.")
    for v in value:
        _check_encodable(v, origin, name)
    return tuple(value)


def _number(fields: dict, name: str, origin: str, default: float, low: float, high: float, integer: bool = False):
    value = fields.get(name, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "a whole number" if integer else "a number"
        raise ParleyError(f"{_where(origin, name)} must be {what}, not {value!r:.40}.")
    if not (low <= value <= high):  # also rejects nan
        raise ParleyError(f"{_where(origin, name)} is {value!r}; it must be between {low} and {high}.")
    return int(value) if integer else float(value)


def json_dict_field(fields: dict, name: str, origin: str, limit: int) -> dict:
    """Field `name` as a JSON object of at most `limit` bytes, or a ParleyError naming `origin` and the field."""
    value = fields.get(name, {})
    if value is None:
        value = {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise ParleyError(f"{_where(origin, name)} is not valid JSON ({exc}). Fix or remove it.") from exc
    if not isinstance(value, dict):
        raise ParleyError(f"{_where(origin, name)} must be a table (a JSON object).")
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ParleyError(f"{_where(origin, name)} cannot be stored as JSON ({exc}).") from exc
    if size > limit:
        raise ParleyError(f"{_where(origin, name)} is {size // 1024} KB; the limit is {limit // 1024} KB.")
    return value


def build_persona(fields: dict[str, Any], origin: str, source: Path | None = None) -> Persona:
    """Check every field and build a `Persona`; `origin` names the file in messages."""
    persona_id = fields.get("id")
    if not isinstance(persona_id, str) or not ID_PATTERN.match(persona_id):
        raise ParleyError(
            f"{_where(origin, 'id')} must be lower-case letters, digits, '-' or '_' (at most 64), "
            f"not {persona_id!r:.70}."
        )
    name = text_field(fields, "name", origin).strip()
    if not name:
        raise ParleyError(f"{_where(origin, 'name')} is missing or empty. Add a line like name = \"Ada\".")
    if "\n" in name or len(name) > 200:
        raise ParleyError(f"{_where(origin, 'name')} must be one line of at most 200 characters.")
    color = fields.get("color", DEFAULT_COLOR) or DEFAULT_COLOR
    if not isinstance(color, str) or not COLOR_PATTERN.match(color):
        raise ParleyError(f"{_where(origin, 'color')} must look like \"#1a2b3c\", not {color!r:.40}.")
    texts = {n: text_field(fields, n, origin) for n in TEXT_FIELDS if n != "name"}
    card = json_dict_field(fields, "card", origin, MAX_CARD_EXTRA_BYTES)
    if fields.get("lorebook") is not None:  # the persona file's [lorebook] (checked by lore_toml) wins
        card = json_dict_field({"card": {**card, "character_book": fields["lorebook"]}}, "card", origin, MAX_CARD_EXTRA_BYTES)
    return Persona(
        id=persona_id,
        name=name,
        greetings=text_list_field(fields, "greetings", origin, MAX_GREETINGS),
        tags=text_list_field(fields, "tags", origin, MAX_TAGS),
        temperature=_number(fields, "temperature", origin, DEFAULT_TEMPERATURE, 0.0, 5.0),
        top_p=_number(fields, "top_p", origin, DEFAULT_TOP_P, 0.0, 1.0),
        max_tokens=_number(fields, "max_tokens", origin, DEFAULT_MAX_TOKENS, 1, 65536, integer=True),
        color=color.lower(),
        extensions=json_dict_field(fields, "extensions", origin, MAX_EXTENSIONS_BYTES),
        card=card,
        user=_user(fields, origin),
        source=source,
        **texts,
    )


def _user(fields: dict, origin: str):
    from app.personas.user import UserProfile, check_profile

    table = fields.get("user")
    if table is None or isinstance(table, UserProfile):  # an edited persona keeps its own
        return table
    profile = check_profile(table, origin)
    return profile if (profile.name or profile.description) else None


def slugify(name: str) -> str:
    """A persona id from a display name: 'Captain Mara Vell' -> 'captain-mara-vell'."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:40].strip("-")
    return slug or "persona"


def unique_id(name: str, taken: set[str] | frozenset[str]) -> str:
    """`slugify(name)`, with -2, -3, ... added until it clashes with nothing in `taken`."""
    base = slugify(name)
    candidate, n = base, 2
    while candidate in taken:
        candidate = f"{base}-{n}"
        n += 1
    return candidate
