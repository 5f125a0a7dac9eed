"""The messages that open every conversation with a persona, and their hash.

The preamble is the prefix every cache of a persona starts with, so its hash
decides which caches survive an edit: change only the colour or the sampling
and the hash (and the caches) stay; change the prompt and they go.
`post_history_instructions` are not part of it: the engine adds them after
the history, where they do not disturb the cached prefix.
"""

from __future__ import annotations

import hashlib
import json
import re

from app.personas.lorebook import lorebook_of
from app.personas.model import Persona
from app.personas.user import effective_user

_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
_START = re.compile(r"^\s*<START>\s*$", re.IGNORECASE | re.MULTILINE)


def fill(text: str, persona: Persona) -> str:
    """Replace the card macros {{char}}/<BOT> and {{user}}/<USER> (your persona's name, `personas.user`)."""
    text = _CHAR.sub(lambda _: persona.name, text)
    name = effective_user(persona).name
    return _USER.sub(lambda _: name, text)


def default_system_prompt(persona: Persona) -> str:
    return f"You are {persona.name}. Stay in character and keep replies short."


def system_message(persona: Persona) -> str:
    """System prompt (or the default), then description, personality, scenario and example dialogue."""
    head = persona.system_prompt.strip()
    head = head.replace("{{original}}", default_system_prompt(persona)) if head else default_system_prompt(persona)
    parts = [head]
    if persona.description.strip():
        parts.append(persona.description.strip())
    if persona.personality.strip():
        parts.append(f"{persona.name}'s personality: {persona.personality.strip()}")
    if persona.scenario.strip():
        parts.append(f"Scenario: {persona.scenario.strip()}")
    examples = _START.sub("", persona.examples).strip()
    if examples:
        examples = re.sub(r"\n{3,}", "\n\n", examples)
        parts.append(f"Example dialogue:\n{examples}")
    parts += [e.content.strip() for e in lorebook_of(persona).constant_entries() if e.content.strip()]
    user = effective_user(persona)
    if user.description:
        parts.append(f"About {user.name}, who you are talking to: {user.description}")
    return fill("\n\n".join(parts), persona)


def preamble_messages(persona: Persona) -> list[dict[str, str]]:
    """Chat messages that begin every conversation: the system message, then the first greeting."""
    messages = [{"role": "system", "content": system_message(persona)}]
    if persona.greetings and persona.greetings[0].strip():
        messages.append({"role": "assistant", "content": fill(persona.greetings[0].strip(), persona)})
    return messages


def preamble_hash(persona: Persona) -> str:
    """sha256 of exactly the preamble messages (roles and text), hex."""
    blob = json.dumps(preamble_messages(persona), ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def post_history(persona: Persona) -> str:
    """Instructions the engine appends after the history (empty when none)."""
    return fill(persona.post_history_instructions.strip(), persona)
