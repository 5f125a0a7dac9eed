"""Your persona: the name and description that fill {{user}} and the "about the user" block of the preamble.

One global profile (`$PARLEY_HOME/user.toml`, written by `parley user`) and, per persona, an optional
`[user]` table in its file that overrides it. The profile is part of the rendered preamble only where a
persona uses it ({{user}} in its text, or a description), so changing it drops only those preambles'
caches: the preamble hash is taken over the rendered messages.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from app.errors import ParleyError

DEFAULT_USER_NAME = "User"
MAX_DESCRIPTION_BYTES = 16 * 1024
USER_KEYS = {"name", "description"}


@dataclass(frozen=True)
class UserProfile:
    name: str = ""
    description: str = ""


def check_profile(table: object, origin: str) -> UserProfile:
    """A `UserProfile` from a TOML table; ParleyError names the file and field."""
    if not isinstance(table, dict):
        raise ParleyError(f"{origin}: field 'user' must be a table ([user]).")
    values = {}
    for key in USER_KEYS:
        value = table.get(key, "")
        if not isinstance(value, str):
            raise ParleyError(f"{origin}: field 'user.{key}' must be text. Put it in quotes.")
        values[key] = value.strip()
    if "\n" in values["name"] or len(values["name"]) > 100:
        raise ParleyError(f"{origin}: field 'user.name' must be one line of at most 100 characters.")
    if len(values["description"].encode("utf-8", "surrogatepass")) > MAX_DESCRIPTION_BYTES:
        raise ParleyError(f"{origin}: field 'user.description' is over {MAX_DESCRIPTION_BYTES // 1024} KB. Shorten it.")
    return UserProfile(values["name"], values["description"])


def read_profile(path: Path) -> UserProfile:
    """The global profile file (a missing file is the default profile)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return UserProfile()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParleyError(f"{path}: cannot be read ({exc}). Fix or remove it.") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ParleyError(f"{path}: not valid TOML: {exc}. Fix the file or remove it.") from exc
    return check_profile(doc, str(path))


def profile_toml(profile: UserProfile) -> str:
    from app.personas.tomlfile import toml_string

    return (f"# Your persona in Parley ({{{{user}}}} in persona texts). `parley user` edits it.\n"
            f"name = {toml_string(profile.name)}\ndescription = {toml_string(profile.description)}\n")


def effective_user(persona) -> UserProfile:
    """The persona's own [user] values where set, else the global profile's, else "User"."""
    own = getattr(persona, "user", None) or UserProfile()
    shared = getattr(persona, "global_user", None) or UserProfile()
    return UserProfile(own.name or shared.name or DEFAULT_USER_NAME, own.description or shared.description)
