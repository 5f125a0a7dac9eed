"""Render a chat with some messages given as exact token ids (the ids the model generated).

The chat template works on text, so each message that carries `token_ids`
is rendered as a private-use sentinel, the rendered text is cut at the
sentinels, the pieces are encoded on their own, and the stored ids go back in
their place. The template's own markers around a reply (end of turn, next
role) start with special tokens, so encoding the pieces apart gives the same
ids the whole text would; the pieces before a reply end exactly where the
prompt of that reply ended, so they encode as that prompt did.
"""

from __future__ import annotations

import re

_SENTINEL = "\ue000{}\ue001"
_SPLIT = re.compile("\ue000(\\d+)\ue001")


def encode_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """`tokenizer.encode_chat`, except that a message with `token_ids` contributes exactly those ids."""
    stored = [m.get("token_ids") for m in messages]
    if not any(stored):
        return tokenizer.encode_chat(messages, add_generation_prompt)
    rendered = [dict(m, content=_SENTINEL.format(i)) if ids else m for i, (m, ids) in enumerate(zip(messages, stored))]
    text = tokenizer.render(rendered, add_generation_prompt)
    pieces = _SPLIT.split(text)
    if len(pieces) != 2 * sum(1 for ids in stored if ids) + 1:  # the template dropped or repeated a message
        return tokenizer.encode_chat(messages, add_generation_prompt)
    ids: list[int] = []
    for n, piece in enumerate(pieces):
        if n % 2:
            ids.extend(stored[int(piece)])
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def attach_token_ids(transcript: list[dict], token_ids: dict[int, list[int]]) -> list[dict]:
    """The transcript with each assistant message's stored ids (found by its `id`) under `token_ids`."""
    out = []
    for m in transcript:
        ids = token_ids.get(m.get("id")) if m.get("role") == "assistant" else None
        out.append(dict(m, token_ids=ids) if ids else m)
    return out
