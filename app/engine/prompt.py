"""What the model reads for a reply: the persona's preamble, then the transcript.

Token-exact reuse needs the same conversation to render to the same tokens
turn after turn, so the context window is handled with a *sticky* start: when
the conversation outgrows the window, the oldest turns after the preamble are
dropped down to half the window at once, and that start is kept for later
turns. The cache then keeps reusing everything from the start on, instead of
re-prefilling a sliding window every turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.engine.token_render import encode_messages
from app.errors import ParleyError


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]
    ids: list[int]
    preamble_ids: list[int]
    start: int  # index into the transcript of the first message the model sees
    dropped: int  # how many messages left the model's view this time


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def transcript_messages(path) -> list[dict]:
    """One dict per catalog message; `id` lets the engine attach a reply's stored token ids (the template ignores
    it); a message that brought lorebook entries carries them as `lore`."""
    from app.engine.lore import lore_items, lore_note

    out = []
    for m in path:
        if m.role in ("user", "assistant", "system"):
            note = lore_note(lore_items(m.meta))
            out.append({"role": m.role, "content": m.content, "id": m.id, **({"lore": note} if note else {})})
    return out


def with_notes(messages: list[dict]) -> list[dict]:
    """What the chat template gets: each stored lore note as a system message right after its message."""
    out = []
    for m in messages:
        out.append({k: v for k, v in m.items() if k != "lore"})
        if m.get("lore"):
            out.append({"role": "system", "content": m["lore"]})
    return out


NOTES_HEADER = "Notes on the earlier part of this conversation, which is no longer shown:"


def notes_messages(notes: str) -> list[dict]:
    """The conversation's notes (app.engine.notes) as the model reads them, right after the preamble."""
    return [{"role": "system", "content": f"{NOTES_HEADER}\n{notes.strip()}"}] if notes.strip() else []


def build_prompt(tokenizer, preamble: list[dict], transcript: list[dict], window: int, reserve: int,
                 start: int = 0, post_history: str = "", notes: str = "") -> Prompt:
    """Render preamble (+ notes) + transcript[start:], moving `start` forward if it would not fit the window."""
    preamble_ids = tokenizer.encode_chat(preamble, add_generation_prompt=False) if preamble else []

    def render(first: int) -> tuple[list[dict], list[int]]:
        messages = preamble + notes_messages(notes) + with_notes(transcript[first:])
        if post_history:
            messages = messages + [{"role": "system", "content": post_history}]
        return messages, encode_messages(tokenizer, messages)

    messages, ids = render(start)
    if len(ids) + reserve <= window:
        return Prompt(messages, ids, preamble_ids, start, 0)
    if len(preamble_ids) + reserve >= window:
        raise ParleyError("The persona's preamble alone fills the model's context window: shorten its system prompt or examples.")
    target = window // 2
    first = start
    last_user = max((i for i, m in enumerate(transcript) if m["role"] == "user"), default=len(transcript) - 1)
    while first < last_user and len(ids) + reserve > target:
        first += 1
        while first < last_user and transcript[first]["role"] != "user":
            first += 1  # always start at a user turn
        messages, ids = render(first)
    if len(ids) + reserve > window:
        raise ParleyError(
            f"The message is too long for the model's context window ({len(ids) + reserve} tokens with the reply, "
            f"the window holds {window}). Send a shorter message or lower max tokens."
        )
    return Prompt(messages, ids, preamble_ids, first, first - start)
