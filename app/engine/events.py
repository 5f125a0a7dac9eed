"""Events out of the engine thread, named as past-tense facts.

The engine calls one callback with these, from its own thread. The app turns
each into a Textual message (`App.call_from_thread`); the command line
collects them. Events carry plain data only: no MLX arrays, no DB handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """Base class of everything the engine reports."""


@dataclass(frozen=True)
class ModelLoadProgressed(Event):
    done: int
    total: int
    label: str


@dataclass(frozen=True)
class ModelLoaded(Event):
    name: str
    fingerprint: str
    context_window: int
    device: str


@dataclass(frozen=True)
class ConversationOpened(Event):
    conversation_id: int
    cache: str  # "ram" | "disk" | "none": where its cache came from
    tokens: int
    load_ms: float = 0.0  # time to read it from disk (including an earlier prefetch of it), when cache == "disk"


@dataclass(frozen=True)
class MessageSaved(Event):
    """A message reached the catalog (the user's, or a finished/cancelled reply)."""

    conversation_id: int
    message_id: int
    role: str


@dataclass(frozen=True)
class PrefillProgressed(Event):
    conversation_id: int
    done: int
    total: int


@dataclass(frozen=True)
class TokensGenerated(Event):
    conversation_id: int
    text: str  # the new text since the previous event


@dataclass(frozen=True)
class ReplyStats:
    ttft_ms: float
    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    decode_tps: float
    cache: str  # "ram" | "disk" | "none"
    queued_ms: float = 0.0  # of ttft_ms: the time the message waited for other replies before its own began
    opened_from: str = ""  # "disk" when the cache was read from disk on opening the tab (it is "ram" by the reply)
    open_ms: float = 0.0  # how long that read took


@dataclass(frozen=True)
class ReplyFinished(Event):
    conversation_id: int
    message_id: int
    text: str
    stats: ReplyStats
    cancelled: bool = False


@dataclass(frozen=True)
class ContextTrimmed(Event):
    """The conversation outgrew the context window; its oldest turns left the model's view."""

    conversation_id: int
    dropped_messages: int


@dataclass(frozen=True)
class NotesProgressed(Event):
    """The model is writing notes on turns about to leave its view (tokens read + written of the most)."""

    conversation_id: int
    done: int
    total: int


@dataclass(frozen=True)
class NotesWritten(Event):
    """Notes on the turns that left the view were added to the conversation's notes (app.engine.notes)."""

    conversation_id: int
    text: str  # what this drop added
    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    ms: float


@dataclass(frozen=True)
class LoreAdded(Event):
    """Lorebook entries entered the conversation with this user message (they stay in its history)."""

    conversation_id: int
    message_id: int
    entries: tuple[str, ...]  # their names, in the order they entered
    speaker: str | None = None  # in a scene: whose lorebook (only that speaker sees them)


@dataclass(frozen=True)
class CacheState:
    conversation_id: int
    persona_id: str
    where: str  # "ram" | "disk" | "none"
    tokens: int
    bytes: int
    pinned: bool = False


@dataclass(frozen=True)
class CacheStatesChanged(Event):
    states: tuple[CacheState, ...] = field(default_factory=tuple)
    ram_bytes: int = 0
    budget_bytes: int = 0


@dataclass(frozen=True)
class CacheDiscarded(Event):
    """A stored cache failed verification and was dropped; the reply rebuilds it from the transcript."""

    conversation_id: int
    reason: str


@dataclass(frozen=True)
class EngineFailed(Event):
    """A command could not be carried out; `message` says what and what to do."""

    message: str
    conversation_id: int | None = None
    exit_code: int = 1  # what `parley` exits with for it (see app.errors)
    unsaved_reply: str | None = None  # a reply generated but not saved (full disk): shown, never silently lost


@dataclass(frozen=True)
class CacheNotSaved(Event):
    """The reply is saved, its cache could not be (full disk, read-only caches/): the next reply rebuilds it."""

    conversation_id: int | None
    reason: str


# -- scenes (several personas in one room; app.engine.scene) -----------------


@dataclass(frozen=True)
class SceneRoundStarted(Event):
    """A scene round began: these personas will reply, in this order (after the user's message, if any)."""

    conversation_id: int
    speakers: tuple[str, ...]
    user_message_id: int | None = None


@dataclass(frozen=True)
class SceneTokensGenerated(Event):
    """New text of one persona's reply in a scene round (several personas stream at once)."""

    conversation_id: int
    persona_id: str
    text: str  # the new text since this persona's previous event


@dataclass(frozen=True)
class SceneReplyFinished(Event):
    """One persona's reply of a scene round is done and saved (message_id 0: nothing was saved)."""

    conversation_id: int
    persona_id: str
    message_id: int
    text: str
    stats: ReplyStats
    cancelled: bool = False


@dataclass(frozen=True)
class SceneRoundFinished(Event):
    """The round is over: every reply is saved and every speaker's cache persisted."""

    conversation_id: int
    speakers: tuple[str, ...] = ()
    batch_tps: float = 0.0  # tokens/s of all speakers together while they decoded as one batch
    cancelled: bool = False


# -- completions for `parley serve` (app.engine.completion) -------------------


@dataclass(frozen=True)
class ModelDescribed(Event):
    request_id: str
    name: str
    folder: str
    fingerprint: str
    context_window: int
    scheme: str


@dataclass(frozen=True)
class CompletionStarted(Event):
    """The prompt is in the cache; `cached_tokens` of it were restored instead of prefilled."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    source: str  # "ram" | "disk" | "none"
    prompt_ms: float


@dataclass(frozen=True)
class CompletionTokens(Event):
    request_id: str
    index: int  # which alternative (n > 1)
    text: str  # new text since this alternative's previous event


@dataclass(frozen=True)
class CompletionFinished(Event):
    request_id: str
    index: int
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" | "cancelled"
    stopping_word: str
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    prompt_ms: float
    decode_ms: float
    ttft_ms: float
    source: str
    batch_rows: int = 1  # the most requests that decoded together in one batch step while this one decoded


@dataclass(frozen=True)
class CompletionFailed(Event):
    request_id: str
    message: str
