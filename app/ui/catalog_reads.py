"""Catalog reads for the UI, done on Textual thread workers and never on the UI thread.

A busy catalog (another process writing, a long transaction, a slow disk) must not stall typing or drawing,
so every SQLite read the UI needs happens here, in a function that only computes: a worker thread calls it
and posts the result as a message named as a past-tense fact (`app.ui.messages.TranscriptLoaded`, ...); the
handler on the UI thread applies it. Results can arrive late and out of order, so each component numbers the
reads it asks for (`LatestOnly`) and applies only the newest.

Workers use the app's `Catalog`: its connection is opened with `check_same_thread=False` and every call holds
the catalog's lock, so sharing it across threads is safe (WAL lets the engine's writes go on meanwhile).
Workers never touch MLX: that is the engine thread's alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from app.catalog.records import Conversation, Message
from app.errors import ParleyError

# What a read on a worker may meet and say in words instead of failing the app: SQLite refusing (locked past the
# busy timeout, the catalog closed as the app quits) or the catalog's own clear errors.
READ_ERRORS = (sqlite3.Error, ParleyError)


class LatestOnly:
    """Numbers the reads one component asks for, so a late answer to an older read is never applied."""

    def __init__(self) -> None:
        self.asked = 0
        self.applied = 0

    def ask(self) -> int:
        self.asked += 1
        return self.asked

    def is_newest(self, number: int) -> bool:
        return number == self.asked

    def done(self, number: int) -> None:
        self.applied = max(self.applied, number)

    @property
    def pending(self) -> bool:
        """A read was asked for whose answer (or a newer one) has not been applied yet."""
        return self.applied < self.asked


# -- transcripts --------------------------------------------------------------------


@dataclass(frozen=True)
class MessageDetails:
    """What a message's view shows besides its text: which alternative it is, and its lorebook entries."""

    alternatives: tuple[int, int] = (1, 1)
    lore: tuple[dict, ...] = ()


@dataclass(frozen=True)
class TranscriptRead:
    """A conversation as the catalog has it: its row, the user and assistant messages from the root to the current
    leaf, and the details of those messages that the tab does not already show."""

    conversation_id: int
    conversation: Conversation | None
    messages: tuple[Message, ...]
    details: dict[int, MessageDetails] = field(default_factory=dict)
    problem: str = ""  # the read failed: what to tell the user (nothing else is set then)


def alternative_position(catalog, message: Message) -> tuple[int, int]:
    """(which, of how many) alternatives this message is among its siblings of the same role."""
    ids = [m.id for m in catalog.alternatives(message.id)]
    return (ids.index(message.id) + 1 if message.id in ids else 1, max(1, len(ids)))


def read_transcript(catalog, conversation_id: int, shown: dict[int, str],
                    details_of: Callable[[Any, Message], MessageDetails]) -> TranscriptRead:
    """The transcript of one conversation. `shown`: message id -> text of the views whose details are known
    already (only the others get `details_of`, the tab's own read of alternatives and lore)."""
    try:
        conversation = catalog.get_conversation(conversation_id)
        messages = tuple(m for m in catalog.current_path(conversation_id) if m.role in ("user", "assistant"))
        details = {m.id: details_of(catalog, m) for m in messages if shown.get(m.id) != m.content}
    except READ_ERRORS as exc:
        return TranscriptRead(conversation_id, None, (), problem=f"The transcript could not be read ({exc}).")
    return TranscriptRead(conversation_id, conversation, messages, details)


# -- lists for the dialogs and the palette --------------------------------------------------


@dataclass(frozen=True)
class ListedConversation:
    """One row of a conversations or scenes list: the conversation and how many messages it has."""

    conversation: Conversation
    messages: int


def list_conversations(catalog, persona_id: str | None, kind: str) -> list[ListedConversation]:
    """Newest first, with each one's message count (the dialogs show it)."""
    return [ListedConversation(c, catalog.message_count(c.id))
            for c in catalog.list_conversations(persona_id=persona_id, kind=kind)]


def list_scenes(catalog) -> list[Conversation]:
    return catalog.list_conversations(kind="scene")


def post_list(node, persona_id: str | None, kind: str, number: int) -> None:
    """On a worker thread: read a dialog's list and post it to `node` (`ConversationsListed`), a failure in words."""
    from app.ui.messages import ConversationsListed

    try:
        rows = list_conversations(node.app.catalog, persona_id, kind)
    except READ_ERRORS as exc:
        node.post_message(ConversationsListed([], number, problem=f"The list could not be read ({exc})."))
        return
    node.post_message(ConversationsListed(rows, number))


# -- a read whose answer a flow waits for ----------------------------------------------------


async def off_ui_thread(node, read: Callable, *args):
    """Run `read(app.catalog, *args)` on a Textual thread worker and wait for its answer without blocking the event
    loop (drawing and other widgets' messages go on). For flows that need the answer to continue (opening a tab
    returns it; creating a scene checks its name first); lists and transcripts post their answer as a message."""
    from textual.worker import WorkerFailed

    worker = node.run_worker(partial(read, node.app.catalog, *args), thread=True, group="catalog-read",
                             exit_on_error=False)
    try:
        return await worker.wait()
    except WorkerFailed as exc:  # the read's own error, as if it had run here
        raise exc.error from None


# -- single rows (each a function a worker runs: `off_ui_thread(node, conversation_of, 7)`) -----------------


def conversation_of(catalog, conversation_id: int) -> Conversation | None:
    return catalog.get_conversation(conversation_id)


def conversations_by_id(catalog, conversation_ids) -> dict[int, Conversation]:
    """The ones of these conversations that still exist (tabs saved by the last run may point at deleted ones)."""
    found = {}
    for conversation_id in conversation_ids:
        conversation = catalog.get_conversation(conversation_id)
        if conversation is not None:
            found[conversation_id] = conversation
    return found


def latest_conversation_id(catalog, persona_id: str) -> int | None:
    latest = catalog.latest_conversation(persona_id)
    return latest.id if latest is not None else None


def message_count(catalog, conversation_id: int) -> int:
    return catalog.message_count(conversation_id)
