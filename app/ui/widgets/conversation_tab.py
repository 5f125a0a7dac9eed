"""What a chat tab and a scene tab share: the chrome around the transcript and the way engine events reach them.

Both tabs are one conversation each: a header line, the transcript, a prefill progress row, (a scene's
speaker ticks,) the hint line and the message box. The screen hands every engine event of a conversation to
that conversation's tab (`route`); each tab says which events it handles in `ENGINE_HANDLERS`.

The transcript is read from the catalog on a worker thread (`reload` asks, `TranscriptLoaded` answers) and
brought in line here, once for both kinds of tab: views that still match are kept, the rest replaced. A tab
differs only in its hooks (`_still_shows`, `_details_of`, `_view_for`, `_scroll_after_reload`, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from app.engine import commands as cmd
from app.engine import events as ev
from app.ui import messages as msg
from app.ui.catalog_reads import LatestOnly, MessageDetails, TranscriptRead, read_transcript
from app.ui.widgets.chat_input import ChatInput
from app.ui.widgets.message_view import MessageView
from app.ui.widgets.text import lore_mark
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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._transcript_reads = LatestOnly()
        self._after_reload: list[Callable[[], Awaitable[None] | None]] = []
        self._asked_children: set = set()
        self.transcript_answers = 0  # answers to transcript reads handled, shown or dropped
        self.stale_reads = 0  # answers dropped because a newer read or another conversation came first

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

    def on_mount(self) -> None:
        self.reload()

    # transcript (read on a worker thread, applied here) -------------------------------------
    @property
    def transcript_pending(self) -> bool:
        """A transcript read is under way: what the tab shows may be one read behind the catalog."""
        return self._transcript_reads.pending

    def reload(self, then: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Bring the transcript in line with the catalog. The read runs on a worker thread; `then` runs once the
        newest read is applied (a read overtaken by a newer one hands its `then` on to it; a switch to another
        conversation drops them)."""
        if then is not None:
            self._after_reload.append(then)
        number = self._transcript_reads.ask()
        self._asked_children = set(self.transcript.children)  # what is shown as the read starts
        shown = {v.message_id: v.text for v in self.message_views() if v.message_id is not None and v.details_known}
        self._read_transcript(self.conversation_id, shown, number)

    def forget_transcript(self) -> None:
        """Another conversation takes the tab: reads under way are for the old one and their `then`s go too."""
        self._transcript_reads.done(self._transcript_reads.ask())
        self._after_reload.clear()

    @work(thread=True, exclusive=True, group="transcript")
    def _read_transcript(self, conversation_id: int, shown: dict[int, str], number: int) -> None:
        """On a worker thread: only reads the catalog (never MLX, never a widget) and posts what it read."""
        read = read_transcript(self.app.catalog, conversation_id, shown, self._details_of)
        self.post_message(msg.TranscriptLoaded(read, number))

    async def on_transcript_loaded(self, message: msg.TranscriptLoaded) -> None:
        message.stop()
        self.transcript_answers += 1
        reads, read = self._transcript_reads, message.read
        if not reads.is_newest(message.number) or read.conversation_id != self.conversation_id:
            self.stale_reads += 1  # overtaken by a newer read, or the tab shows another conversation now
            return
        try:
            if read.problem:
                self.app.notify(read.problem, severity="error", timeout=8)
            else:
                await self._apply_transcript(read, message.number)
        finally:
            reads.done(message.number)
        if not reads.is_newest(message.number):
            return  # a newer read was asked for while this one was applied: it finishes the work, follow-ups too
        follow_ups, self._after_reload = self._after_reload, []
        for follow_up in follow_ups:
            result = follow_up()
            if inspect.isawaitable(result):
                await result

    async def _apply_transcript(self, read: TranscriptRead, number: int) -> None:
        """Keep the views (shown when the read started) that still match, remove the rest, mount the new ones where
        the read started (before anything mounted since: a reply that began meanwhile stays last). Stops at once when
        a newer read is asked for meanwhile (an engine event between two awaits): that read started from what this
        one had done so far and does the rest."""
        def overtaken() -> bool:
            return not self._transcript_reads.is_newest(number)

        self._took_conversation(read.conversation)
        await self._before_reconcile()
        if overtaken():
            return
        views = [v for v in self.message_views() if v in self._asked_children]
        keep = 0
        for view, message in zip(views, read.messages):
            if not self._still_shows(view, message):
                break
            view.message_id = message.id
            details = read.details.get(message.id)
            if details is not None and not view.details_known:  # a view of a message the engine just saved
                self._add_details(view, details)
            keep += 1
        for view in views[keep:]:
            await view.remove()
            if overtaken():
                return
        new = [self._view_for(m, read.details.get(m.id, MessageDetails())) for m in read.messages[keep:]]
        if new:
            await self.mount_after_read(*new)
        self.refresh_chrome()
        self._scroll_after_reload()

    async def mount_after_read(self, *widgets) -> None:
        """Mount at the end of what the newest read shows: before anything mounted while it was being read (the
        bubbles of a reply or round that began meanwhile stay last), else before a streaming view, else last."""
        transcript = self.transcript
        later = next((c for c in transcript.children if c not in self._asked_children), None) or self._live_view()
        if later is not None and later.parent is transcript:
            await transcript.mount_all(widgets, before=later)
        else:
            await transcript.mount_all(widgets)

    # hooks of the reconciliation ----------------------------------------------------------
    def message_views(self) -> list[MessageView]:
        raise NotImplementedError

    def _details_of(self, catalog, message) -> MessageDetails:
        """On the worker thread: what the view of `message` shows besides its text."""
        return MessageDetails()

    def _view_for(self, message, details: MessageDetails) -> MessageView:
        raise NotImplementedError

    def _still_shows(self, view: MessageView, message) -> bool:
        """Whether `view` can stay as the view of `message`: it is that message, or an unsaved one with its text."""
        return view.message_id == message.id or (view.message_id is None and view.text == message.content
                                                 and view.role == message.role)

    def _add_details(self, view: MessageView, details: MessageDetails) -> None:
        """A kept view of a message saved since it was drawn: its alternatives and lore mark, as read."""
        view.set_alternatives(details.alternatives)
        if details.lore and not view.lore:
            view.lore = details.lore
            view.set_stats(view.stats + lore_mark(details.lore))
        view.details_known = True

    def _took_conversation(self, conversation) -> None:
        """The conversation's row as read with the transcript (a chat's title)."""

    async def _before_reconcile(self) -> None:
        """Before the views are compared (a chat's greeting goes first)."""

    def _live_view(self) -> MessageView | None:
        """The first view still streaming: new messages go before it."""
        return None

    def _scroll_after_reload(self) -> None:
        self.transcript.keep_up()

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
