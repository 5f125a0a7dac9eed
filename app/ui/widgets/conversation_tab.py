"""What a chat tab and a scene tab share: the chrome around the transcript and the way engine events reach them.

Both tabs are one conversation each: a header line, the transcript, a prefill progress row, (a scene's
speaker ticks,) the hint line and the message box. The screen hands every engine event of a conversation to
that conversation's tab (`route`); each tab says which events it handles in `ENGINE_HANDLERS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from app.engine import commands as cmd
from app.engine import events as ev
from app.ui.widgets.chat_input import ChatInput
from app.ui.widgets.transcript import Transcript, TranscriptNavigation


class ConversationTab(TranscriptNavigation, Vertical):
    """A tab over one conversation. Subclasses draw the header (`_header`) and the idle hint (`_idle_hint`)."""

    PREFILL_LABEL = "Reading the conversation"
    BUSY_HINT = "Replying… escape stops"
    QUEUED_HINT = "Queued: waits for {who} to finish replying, then this reply starts"
    WAITING_FALLBACK = "another conversation"  # whom a queued reply waits for when that tab is not open
    # engine event type -> the method that handles it (the screen calls `route`; other events are not this tab's)
    ENGINE_HANDLERS: dict[type, Callable] = {}

    conversation_id: int
    generating: bool = False

    # layout ------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="chat-header")
        yield Transcript(classes="transcript")
        with Horizontal(classes="prefill"):
            yield Label(self.PREFILL_LABEL, classes="prefill-label")
            yield ProgressBar(total=1, show_eta=False, classes="prefill-bar")
        yield from self.compose_controls()
        yield Static(self._hint(), classes="composer-hint")
        yield ChatInput(classes="composer")

    def compose_controls(self) -> ComposeResult:
        """Widgets between the prefill row and the hint (a scene's speaker ticks); none by default."""
        yield from ()

    async def on_mount(self) -> None:
        await self.reload()

    async def reload(self) -> None:
        raise NotImplementedError

    def _header(self) -> Text:
        raise NotImplementedError

    def _idle_hint(self) -> str:
        raise NotImplementedError

    def _hint(self) -> str:
        if self.generating:
            who = self.waiting_for()
            return self.QUEUED_HINT.format(who=who) if who else self.BUSY_HINT
        return self._idle_hint()

    def waiting_for(self) -> str:
        """Whose reply the engine is writing now, when it is not this tab's (this tab's reply waits for it)."""
        screen = getattr(self.app, "chat_screen", None)
        running = getattr(screen, "running", None)
        if screen is None or running is None or running == self.conversation_id:
            return ""
        return screen.running_name(scene_prefix="the scene ", fallback=self.WAITING_FALLBACK)

    def refresh_chrome(self) -> None:
        if not self.query(".chat-header"):  # being closed: nothing to draw on
            return
        self.query_one(".chat-header", Static).update(self._header())
        self.query_one(".composer-hint", Static).update(self._hint())
        self.set_class(self.generating, "-generating")

    def replied_note(self) -> str:
        """The notification when a reply finishes while this tab is not on screen."""
        raise NotImplementedError

    # user actions --------------------------------------------------------------
    def stop(self) -> bool:
        if self.generating:
            self.app.submit(cmd.Cancel())
            return True
        return False

    # engine events ---------------------------------------------------------------
    async def route(self, event: ev.Event) -> bool:
        """Handle an engine event of this tab's conversation; False when this kind of tab has no use for it."""
        handler = self.ENGINE_HANDLERS.get(type(event))
        if handler is None:
            return False
        result = handler(self, event)
        if inspect.isawaitable(result):
            await result
        return True

    def on_engine_prefill(self, event: ev.PrefillProgressed) -> None:
        self.add_class("-prefilling")
        self.query_one(".prefill-bar", ProgressBar).update(total=max(1, event.total), progress=event.done)
        if event.done >= event.total:
            self.remove_class("-prefilling")
