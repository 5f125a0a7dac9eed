"""Textual messages: each engine event becomes one, plus the app's own, named as past-tense facts.

The engine calls back on its own thread; `message_for(event)` wraps the event
in the matching message, and `post_message` (thread-safe) carries it over to
the UI thread. Handlers read the plain event data from `message.event`.
"""

from __future__ import annotations

from textual.message import Message

from app.engine import events as ev


class EngineReported(Message):
    """Base of every message that carries an engine event."""

    def __init__(self, event: ev.Event) -> None:
        super().__init__()
        self.event = event

    @property
    def conversation_id(self) -> int | None:
        return getattr(self.event, "conversation_id", None)


class ModelLoadProgressed(EngineReported):
    pass


class ModelLoaded(EngineReported):
    pass


class ConversationOpened(EngineReported):
    pass


class MessageSaved(EngineReported):
    pass


class PrefillProgressed(EngineReported):
    pass


class TokensGenerated(EngineReported):
    pass


class ReplyFinished(EngineReported):
    pass


class ContextTrimmed(EngineReported):
    pass


class CacheStatesChanged(EngineReported):
    pass


class CacheDiscarded(EngineReported):
    pass


class EngineFailed(EngineReported):
    pass


class CacheNotSaved(EngineReported):
    pass


class SceneRoundStarted(EngineReported):
    pass


class SceneTokensGenerated(EngineReported):
    pass


class SceneReplyFinished(EngineReported):
    pass


class SceneRoundFinished(EngineReported):
    pass


_BY_EVENT: dict[type, type[EngineReported]] = {
    ev.ModelLoadProgressed: ModelLoadProgressed,
    ev.ModelLoaded: ModelLoaded,
    ev.ConversationOpened: ConversationOpened,
    ev.MessageSaved: MessageSaved,
    ev.PrefillProgressed: PrefillProgressed,
    ev.TokensGenerated: TokensGenerated,
    ev.ReplyFinished: ReplyFinished,
    ev.ContextTrimmed: ContextTrimmed,
    ev.CacheStatesChanged: CacheStatesChanged,
    ev.CacheDiscarded: CacheDiscarded,
    ev.EngineFailed: EngineFailed,
    ev.CacheNotSaved: CacheNotSaved,
    ev.SceneRoundStarted: SceneRoundStarted,
    ev.SceneTokensGenerated: SceneTokensGenerated,
    ev.SceneReplyFinished: SceneReplyFinished,
    ev.SceneRoundFinished: SceneRoundFinished,
}


def message_for(event: ev.Event) -> EngineReported:
    """The Textual message for an engine event (an unknown event kind still arrives, as the base class)."""
    return _BY_EVENT.get(type(event), EngineReported)(event)


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
