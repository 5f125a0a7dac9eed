"""Commands into the engine thread: frozen dataclasses on a queue.

The app and the command line never touch MLX; they put one of these on
`Engine.submit` and hear back through events (see `events.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


def _now() -> float:
    """When a command was made, on the clock the engine times replies with (time to first token counts from here)."""
    return time.perf_counter()


MAX_TEMPERATURE = 5.0  # as persona files allow


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. A persona's defaults, overridable per request."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refuse values that would sample garbage (nan temperature) or nothing (max_tokens 0) before any work."""
        from app.errors import ParleyError

        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ParleyError(f"max_tokens must be a whole number of at least 1, not {self.max_tokens!r}.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise ParleyError(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {self.temperature!r}.")
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise ParleyError(f"top_p must be a number from 0 to 1, not {self.top_p!r}.")


@dataclass(frozen=True)
class Command:
    """Base class of everything the engine accepts."""


@dataclass(frozen=True)
class Generate(Command):
    """Append the user's message to the conversation and stream a reply."""

    conversation_id: int
    text: str
    sampling: Sampling | None = None
    sent_at: float = field(default_factory=_now, compare=False)


@dataclass(frozen=True)
class Regenerate(Command):
    """Reply again to the last user message; the old reply stays as an alternative."""

    conversation_id: int
    sampling: Sampling | None = None
    sent_at: float = field(default_factory=_now, compare=False)


@dataclass(frozen=True)
class EditAndResend(Command):
    """Replace a past user message (a new branch) and reply to it."""

    conversation_id: int
    message_id: int
    text: str
    sampling: Sampling | None = None
    sent_at: float = field(default_factory=_now, compare=False)


@dataclass(frozen=True)
class Continue(Command):
    """Reply to the conversation as it stands (used by scenes and after a cancelled prefill)."""

    conversation_id: int
    sampling: Sampling | None = None
    sent_at: float = field(default_factory=_now, compare=False)


@dataclass(frozen=True)
class Cancel(Command):
    """Stop the running generation within one token step. Handled out of band."""


@dataclass(frozen=True)
class Open(Command):
    """The user is looking at this conversation: bring its cache into RAM and pin it."""

    conversation_id: int


@dataclass(frozen=True)
class Prefetch(Command):
    """The user is about to look at this conversation: load its cache from disk if idle."""

    conversation_id: int


@dataclass(frozen=True)
class Evict(Command):
    """Drop this conversation's cache from RAM (it stays on disk)."""

    conversation_id: int


@dataclass(frozen=True)
class RefreshCacheStates(Command):
    """Ask for a fresh `CacheStatesChanged` event."""


@dataclass(frozen=True)
class Shutdown(Command):
    """Finish the current step, save, and stop the thread; with `release`, let go of the model and caches too
    (off when the process exits right after: freeing them would only delay the exit)."""

    release: bool = True


@dataclass(frozen=True)
class SceneRound(Command):
    """One round in a scene: the user's message (optional), then the chosen personas reply, batched."""

    conversation_id: int
    text: str = ""
    speakers: tuple[str, ...] = ()  # persona ids to reply this round; empty = every member
    sampling: Sampling | None = None


@dataclass(frozen=True)
class Forget(Command):
    """The conversation was deleted: drop its caches from RAM and disk, free blocks nothing else uses."""

    conversation_id: int


# -- completions for `parley serve` (app.engine.completion) -------------------


@dataclass(frozen=True)
class CompletionOptions:
    """How to pick tokens for one server request (the fields front-ends send)."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -inf bans the token
    n: int = 1  # alternatives; they share one prefill


@dataclass(frozen=True)
class Complete(Command):
    """Continue these exact token ids, reusing the longest prefix stored in any cache (RAM or disk).

    `session` optionally names the cache the result is saved under (X-Session-ID or `user`);
    without it the engine picks or creates one by content.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    options: CompletionOptions = CompletionOptions()
    session: str | None = None


@dataclass(frozen=True)
class CancelCompletion(Command):
    """The client went away: stop (or skip) this request. Handled out of band."""

    request_id: str


@dataclass(frozen=True)
class DescribeModel(Command):
    """Ask for a `ModelDescribed` event (the server needs the model folder for its tokenizer)."""

    request_id: str
