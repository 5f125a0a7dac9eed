"""Textual messages: one carries every engine event; the app's own are named as past-tense facts.

The engine calls back on its own thread; `message_for(event)` wraps the event in an
`EngineReported`, and `post_message` (thread-safe) carries it over to the UI thread.
The chat screen handles it once (`on_engine_reported`): its own part by event type, then
the tab of the event's conversation (`ConversationTab.route`). Read the event from `message.event`.
"""

from __future__ import annotations

from textual.message import Message

from app.engine import events as ev


class EngineReported(Message):
    """An engine event, on the UI thread."""

    def __init__(self, event: ev.Event) -> None:
        super().__init__()
        self.event = event

    @property
    def conversation_id(self) -> int | None:
        return getattr(self.event, "conversation_id", None)


def message_for(event: ev.Event) -> EngineReported:
    """The Textual message that carries an engine event to the screen (which routes it to its tab)."""
    return EngineReported(event)


# -- the app's own messages ---------------------------------------------------


class PersonaHighlighted(Message):
    """The cursor in the persona list moved onto a persona."""

    def __init__(self, persona_id: str) -> None:
        super().__init__()
        self.persona_id = persona_id


class PersonaChosen(Message):
    """The user picked a persona in the list (enter or click)."""

    def __init__(self, persona_id: str) -> None:
        super().__init__()
        self.persona_id = persona_id


class ComposerSubmitted(Message):
    """The user pressed enter in the message box."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class AlternativeRequested(Message):
    """The user asked for the previous/next alternative of a message (left/right)."""

    def __init__(self, message_id: int, step: int) -> None:
        super().__init__()
        self.message_id = message_id
        self.step = step


class EditRequested(Message):
    """The user asked to edit a past user message."""

    def __init__(self, message_id: int, text: str) -> None:
        super().__init__()
        self.message_id = message_id
        self.text = text


class CopyRequested(Message):
    """The user asked to copy a message's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class TabCharacter(Message):
    """A character a terminal sends for alt+digit (macOS "¡", 8-bit "±") arrived in an empty message box."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number


class DiskCachesRead(Message):
    """The catalog's records of the caches on disk, read on a worker thread (app.ui.screens.chat)."""

    def __init__(self, rows: list[dict], number: int) -> None:
        super().__init__()
        self.rows = rows
        self.number = number  # which read this is (the screen shows only the newest)


class TranscriptLoaded(Message):
    """A tab's transcript, read on a worker thread (app.ui.catalog_reads); the tab applies only its newest read."""

    def __init__(self, read, number: int) -> None:
        super().__init__()
        self.read = read  # app.ui.catalog_reads.TranscriptRead
        self.number = number  # which of the tab's reads this answers


class ConversationsListed(Message):
    """A list of conversations (or scenes) for a dialog, read on a worker thread; only the newest is shown."""

    def __init__(self, rows: list, number: int, problem: str = "") -> None:
        super().__init__()
        self.rows = rows  # app.ui.catalog_reads.ListedConversation, newest first
        self.number = number
        self.problem = problem  # the read failed: what to tell the user


class LatestConversationFound(Message):
    """The persona's most recent chat, looked up on a worker thread (the screen prefetches its cache)."""

    def __init__(self, persona_id: str, conversation_id: int | None) -> None:
        super().__init__()
        self.persona_id = persona_id
        self.conversation_id = conversation_id



class AlternativeFound(Message):
    """The alternative a browse step lands on and the leaf of its branch, read on a worker thread (None: none)."""

    def __init__(self, conversation_id: int, message_id: int, target: int | None, leaf: int | None) -> None:
        super().__init__()
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.target = target
        self.leaf = leaf
