"""Notes that outlive dropped turns.

When a conversation outgrows the context window its oldest turns leave the
model's view (app.engine.prompt). Before they go, the model writes a few
sentences about them: the prompt for that is the cached view itself (preamble,
notes so far, the turns about to leave) plus one instruction, so only the
instruction is prefilled, never the transcript. The notes are kept in the
catalog (app.catalog.notes), shown right after the preamble in the new view,
and extended at each later drop. Runs on the engine thread, reports progress
(`NotesProgressed`), and stops between any two tokens when cancelled.
"""

from __future__ import annotations

import time

from app.catalog.notes import conversation_notes, set_conversation_notes
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.prompt import build_prompt, common_prefix, notes_messages, with_notes
from app.engine.token_render import encode_messages

NOTES_MAX_TOKENS = 96
NOTES_MIN_TOKENS = 16


def notes_sampling(max_tokens: int) -> cmd.Sampling:
    """Mildly random (greedy small models loop on one token), with a fixed seed: the same view gives the same notes."""
    return cmd.Sampling(temperature=0.5, top_p=0.9, max_tokens=max_tokens, seed=0)
INSTRUCTION = (
    "(Out of character.) The oldest part of our conversation is about to be hidden from you. In at most three "
    "short sentences, note the facts from it worth remembering: names, places, events, promises. Write only the notes."
)


def prompt_with_notes(session, turn, preamble: list[dict], transcript: list[dict], start: int, post_history: str):
    """The turn's prompt; when turns must leave the view, the notes are extended first. None: cancelled."""
    lm = session.lm
    notes = conversation_notes(session.catalog, turn.conversation_id, turn.speaker)

    room = notes_room(lm)
    reserve = max(turn.sampling.max_tokens, room if room <= lm.context_window // 4 else 0)

    def build(first: int, text: str):
        return build_prompt(lm.tokenizer, preamble, transcript, lm.context_window, reserve=reserve,
                            start=first, post_history=post_history, notes=text)

    prompt = build(start, notes)
    if prompt.start == start:
        return prompt
    written = write_notes(session, turn, preamble + notes_messages(notes) + with_notes(transcript[start:prompt.start]))
    if written is None:
        return None
    if written:
        notes = f"{notes.strip()}\n{written}".strip()
        set_conversation_notes(session.catalog, turn.conversation_id, notes, turn.speaker)
    return build(prompt.start, notes)


def notes_room(lm) -> int:
    """Tokens a view keeps free so the notes step fits after it (instruction + notes), when the window allows."""
    return len(lm.tokenizer.encode(INSTRUCTION)) + NOTES_MAX_TOKENS + 16


def write_notes(session, turn, leaving: list[dict]) -> str | None:
    """Notes about `leaving` (the cached view up to the turns that stay), from the conversation's own cache.

    Returns the new notes ('' when they could not fit), or None when cancelled.
    """
    from app.engine.generation import decode, prefill
    from app.catalog.caches import preamble_key
    from app.personas import preamble_hash

    started = time.perf_counter()
    lm, cid = session.lm, turn.conversation_id
    ids = encode_messages(lm.tokenizer, leaving + [{"role": "user", "content": INSTRUCTION}])
    max_new = min(NOTES_MAX_TOKENS, lm.context_window - len(ids))
    if max_new < NOTES_MIN_TOKENS:
        return ""  # a window too small to keep room for notes (see notes_room): the turns leave without them
    cache, _ = session.cache_for(turn, preamble_key(turn.persona.id, preamble_hash(turn.persona)))
    reused = min(common_prefix(cache.tokens, ids), len(ids) - 1)
    reused = cache.trim_to(reused)
    todo = ids[reused:]
    total = len(todo) + max_new
    logits = None
    for step in prefill(lm.model, cache, todo):
        session.emit(ev.NotesProgressed(cid, step.done, total))
        logits = step.logits
        if step.logits is None and session.cancelled():
            return None
    stream = lm.tokenizer.stream()
    generated = 0
    for token in decode(lm.model, cache, logits, notes_sampling(max_new), lm.tokenizer.eos_ids):
        stream.push(token)
        generated += 1
        session.emit(ev.NotesProgressed(cid, len(todo) + generated, total))
        if session.cancelled():
            return None
    session.manager.mark_dirty(turn.key)
    text = " ".join(stream.text.split())
    session.emit(ev.NotesWritten(cid, text, reused, len(todo), generated, (time.perf_counter() - started) * 1000))
    return text
