"""One persona's chat tab: header, transcript, prefill progress and the message box."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.widgets import Static, TextArea

from app.catalog.caches import CacheSummary
from app.engine import commands as cmd
from app.engine import events as ev
from app.errors import ParleyError
from app.ui import messages as msg
from app.ui.catalog_reads import READ_ERRORS, MessageDetails, alternative_position
from app.ui.widgets.chat_input import ChatInput
from app.ui.widgets.conversation_tab import ConversationTab
from app.ui.widgets.message_view import MessageView
from app.ui.widgets.text import duration, lore_mark, lore_of, stats_line


class ChatPane(ConversationTab):
    """One persona's tab: header, transcript, prefill progress, and the message box.

    Reads the transcript from the app's catalog on a worker thread (`ConversationTab.reload`); sends
    commands through `app.submit`; the screen routes engine events for this pane's conversation to it (`ENGINE_HANDLERS`, at the end).
    """

    def __init__(self, persona, conversation_id: int, **kwargs) -> None:
        super().__init__(classes="chat-pane", **kwargs)
        self.persona = persona
        self.conversation_id = conversation_id
        self.generating = False
        self.editing: int | None = None  # the user message being edited
        self.cache_source = ""
        self.cache_tokens = 0
        self.cache_load_ms = 0.0  # how long opening read the cache from disk (cache_source == "disk")
        self.live_cache: CacheSummary | None = None  # this conversation's cache now (from the engine's reports)
        self.last_sent = ""  # given back to the message box when the engine refuses it
        self.conversation_title: str | None = None  # the conversation's title, as the last transcript read found it

    # layout ------------------------------------------------------------------
    def _header(self) -> Text:
        title = self.conversation_title or "New conversation"
        text = Text()
        text.append(self.persona.name, style=f"bold {self.persona.color}")
        text.append(f" — {title}")
        live = self.live_cache
        if live is not None and live.where != "none":
            text.append(f"   cache {live.where} {live.tokens} tok", style="dim")
            origin = self._cache_origin()
            if origin and (self.cache_source != live.where or self.cache_source == "disk"):
                text.append(f" ({origin})", style="dim")
        elif self.cache_source:
            text.append(f"   cache {self.cache_source}", style="dim")
            if self.cache_tokens:
                text.append(f" {self.cache_tokens} tok", style="dim")
            origin = self._cache_origin()
            if origin and self.cache_source == "disk":
                text.append(f" ({origin})", style="dim")
        return text

    def _cache_origin(self) -> str:
        """Where the cache came from when the tab opened, in words."""
        if self.cache_source == "disk":
            return f"read from disk in {self.cache_load_ms:.0f} ms" if self.cache_load_ms else "read from disk"
        if self.cache_source == "none":
            return "built by this session's replies"
        return ""

    def set_live_cache(self, summary: "CacheSummary | None") -> None:
        if summary != self.live_cache:
            self.live_cache = summary
            self.refresh_chrome()

    def _idle_hint(self) -> str:
        paste = paste_note(self.app, self.composer.text if self.is_mounted and self.query(ChatInput) else "")
        if paste:
            return paste
        if self.editing is not None:
            return "Editing: enter resends it as a new branch · escape cancels"
        return "enter send · ctrl+j new line · ↑ pick a message · F1 keys"

    @on(TextArea.Changed, ".composer")
    def _composer_changed(self) -> None:
        self.query_one(".composer-hint", Static).update(self._hint())

    def replied_note(self) -> str:
        return f"{self.persona.name} replied."

    # transcript --------------------------------------------------------------
    def message_views(self) -> list[MessageView]:
        return [v for v in self.transcript.query(MessageView)
                if not v.greeting and "streaming" not in v.classes and "stopped-note" not in v.classes]

    def streaming_view(self) -> MessageView | None:
        found = [v for v in self.transcript.query(MessageView) if "streaming" in v.classes]
        return found[0] if found else None

    def _details_of(self, catalog, message) -> MessageDetails:
        """On the transcript's worker thread: which alternative the message is, and its turn's lore."""
        return MessageDetails(alternative_position(catalog, message), lore_of(catalog, message))

    def _view_for(self, message, details: MessageDetails) -> MessageView:
        stats = ""
        if message.role == "assistant":
            stats = stats_line(message.meta.get("stats"), bool(message.meta.get("cancelled")))
        return MessageView(message.role, message.content, message.id, speaker=self.persona.name,
                           color=self.persona.color, stats=stats + lore_mark(details.lore),
                           alternatives=details.alternatives, lore=details.lore)

    def _still_shows(self, view: MessageView, message) -> bool:
        """A chat also replaces a view whose message kept its id but not its text (and reads its alternatives)."""
        same_text = view.text == message.content and view.role == message.role
        return same_text and view.message_id in (message.id, None)

    def _took_conversation(self, conversation) -> None:
        self.conversation_title = conversation.title if conversation is not None else None

    async def _before_reconcile(self) -> None:
        transcript = self.transcript
        if not transcript.query(".greeting"):
            greeting = self._greeting()
            if greeting:
                view = MessageView("assistant", greeting, speaker=self.persona.name, color=self.persona.color,
                                   greeting=True)
                first = transcript.children[0] if transcript.children else None
                await transcript.mount(view, before=first) if first is not None else await transcript.mount(view)
                self._asked_children.add(view)

    def _live_view(self) -> MessageView | None:
        return self.streaming_view()

    async def refresh_greeting(self) -> None:
        """The persona changed (edited): show its greeting and colours as they are now."""
        await self.transcript.query(".greeting").remove()
        greeting = self._greeting()
        if greeting:
            first = self.transcript.children[0] if self.transcript.children else None
            view = MessageView("assistant", greeting, speaker=self.persona.name, color=self.persona.color,
                               greeting=True)
            await self.transcript.mount(view, before=first) if first is not None else await self.transcript.mount(view)
        self.refresh_chrome()

    def _greeting(self) -> str:
        from app.personas import preamble_messages

        try:
            pre = preamble_messages(self.persona)
        except ParleyError:  # a bad user persona or lorebook: the engine reports it when a reply is asked for
            return ""
        return next((m["content"] for m in pre if m["role"] == "assistant"), "")

    async def _start_reply(self, user_text: str | None) -> None:
        transcript = self.transcript
        await transcript.query(".stopped-note").remove()
        if user_text is not None:
            await transcript.mount(MessageView("user", user_text))
        await transcript.mount(MessageView("assistant", "", speaker=self.persona.name, color=self.persona.color,
                                           streaming=True))
        self.generating = True
        self.refresh_chrome()
        transcript.show_newest()

    async def _truncate_from(self, view: MessageView | None) -> None:
        """Remove `view` and every message view after it."""
        if view is None:
            return
        views = self.message_views()
        if view in views:
            for v in views[views.index(view):]:
                await v.remove()

    # user actions --------------------------------------------------------------
    async def send(self, text: str) -> bool:
        if not text.strip():
            return False
        self.last_sent = text
        if self.generating:
            self.app.notify("A reply is still coming: your message stays in the box; send it once the reply is "
                            "done, or press escape to stop the reply.", severity="warning")
            return False
        if self.editing is not None:
            message_id = self.editing
            self._mark_editing(None)
            self.editing = None
            target = next((v for v in self.message_views() if v.message_id == message_id), None)
            await self._truncate_from(target)
            await self._start_reply(text)
            self.app.submit(cmd.EditAndResend(self.conversation_id, message_id, text, self.app.sampling))
        else:
            await self._start_reply(text)
            self.app.submit(cmd.Generate(self.conversation_id, text, self.app.sampling))
        return True

    async def regenerate(self) -> None:
        if self.generating:
            self.app.notify("A reply is still coming: wait, or press escape to stop it.", severity="warning")
            return
        views = self.message_views()
        users = [v for v in views if v.role == "user"]
        if not users:
            self.app.notify("There is nothing to regenerate yet: send a message first.", severity="warning")
            return
        last_user = users[-1]
        after = views[views.index(last_user) + 1:]
        if after:
            await self._truncate_from(after[0])
        await self._start_reply(None)
        self.app.submit(cmd.Regenerate(self.conversation_id, self.app.sampling))

    def begin_edit(self, message_id: int, text: str) -> None:
        if self.generating:
            self.app.notify("Wait for the reply (or press escape) before editing.", severity="warning")
            return
        self._mark_editing(None)
        self.editing = message_id
        self._mark_editing(message_id)
        self.composer.text = text
        self.composer.move_cursor(self.composer.document.end)
        self.composer.focus()
        self.refresh_chrome()

    def _mark_editing(self, message_id: int | None) -> None:
        for view in self.message_views():
            view.set_class(message_id is not None and view.message_id == message_id, "editing")

    def cancel_edit(self) -> bool:
        if self.editing is None:
            return False
        self._mark_editing(None)
        self.editing = None
        self.composer.text = ""
        self.refresh_chrome()
        return True

    def browse(self, message_id: int, step: int) -> None:
        """Show the previous/next alternative of a message: its siblings are read on a worker thread."""
        if self.generating:
            self.app.notify("Wait for the reply before browsing alternatives.", severity="warning")
            return
        self._find_alternative(self.conversation_id, message_id, step)

    @work(thread=True, exclusive=True, group="browse")
    def _find_alternative(self, conversation_id: int, message_id: int, step: int) -> None:
        """On a worker thread: the alternative `step` away and the leaf its branch ends in (reads only)."""
        catalog = self.app.catalog
        try:
            ids = [m.id for m in catalog.alternatives(message_id)]
            target = ids[(ids.index(message_id) + step) % len(ids)] if len(ids) > 1 and message_id in ids else None
            leaf = catalog.leaf_after(target) if target is not None else None
        except READ_ERRORS as exc:
            self.app.call_from_thread(self.app.notify, f"The alternatives could not be read ({exc}).",
                                      severity="error")
            return
        self.post_message(msg.AlternativeFound(conversation_id, message_id, target, leaf))

    def on_alternative_found(self, message: msg.AlternativeFound) -> None:
        message.stop()
        if message.conversation_id != self.conversation_id or self.generating:
            return  # the tab moved on (another conversation, a reply began) while the siblings were read
        if message.target is None:
            self.app.notify("This message has no alternatives (ctrl+r regenerates a reply).")
            return
        try:
            self.app.catalog.set_leaf(self.conversation_id, message.leaf)  # a write: one quick statement
        except ParleyError as exc:  # the message went meanwhile (deleted from another window)
            self.app.notify(str(exc), severity="warning")
            return
        self.reload(then=lambda: self._focus_message_id(message.target))

    def _focus_message_id(self, message_id: int) -> None:
        view = next((v for v in self.message_views() if v.message_id == message_id), None)
        if view is not None:
            view.focus()
            view.scroll_visible(animate=False)

    def last_user(self) -> MessageView | None:
        users = [v for v in self.message_views() if v.role == "user" and v.message_id is not None]
        return users[-1] if users else None

    async def switch_conversation(self, conversation_id: int) -> None:
        if conversation_id == self.conversation_id:
            return
        live = self.streaming_view()
        if live is not None:
            await live.stop_stream()
        self.generating = False
        self.editing = None
        self.conversation_id = conversation_id
        self.cache_source, self.cache_tokens, self.cache_load_ms = "", 0, 0.0
        self.live_cache = None
        self.conversation_title = None
        self.forget_transcript()
        await self.transcript.remove_children()
        self.reload()
        if self.parent is not None and self.app.chat_screen.active_pane() is self:
            self.app.chat_screen.request_open(conversation_id)

    # engine events (the screen routes this conversation's here) -----------------------
    def on_engine_opened(self, event: ev.ConversationOpened) -> None:
        self.cache_source, self.cache_tokens = event.cache, event.tokens
        self.cache_load_ms = float(getattr(event, "load_ms", 0.0) or 0.0)
        self.refresh_chrome()

    def on_engine_saved(self, event: ev.MessageSaved) -> None:
        if event.role == "user":
            self.reload()

    async def on_engine_tokens(self, event: ev.TokensGenerated) -> None:
        self.remove_class("-prefilling")
        live = self.streaming_view()
        if live is None:
            await self._start_reply(None)
            live = self.streaming_view()
        await live.write(event.text)
        self.transcript.keep_up()  # a reader who scrolled up stays put

    async def on_engine_finished(self, event: ev.ReplyFinished) -> None:
        self.remove_class("-prefilling")
        live = self.streaming_view()
        if live is not None:
            if event.message_id:  # its alternatives and lore mark come with the transcript read below
                await live.finish(event.text, event.message_id, stats_line(event.stats, event.cancelled))
            elif event.cancelled:  # stopped while reading: the bubble stays, saying so (nothing was saved)
                live.add_class("stopped-note")
                await live.finish("", None, "stopped")
            else:
                await live.stop_stream()
                await live.remove()
        self.generating = False
        self.last_sent = ""
        self.reload()  # also reads the title the first message gave the conversation
        self.transcript.keep_up()

    async def on_engine_failed(self, event: ev.EngineFailed) -> None:
        live = self.streaming_view()
        if live is not None:
            await live.stop_stream()
            await live.remove()
        self.generating = False
        self.remove_class("-prefilling")
        last_sent, self.last_sent = self.last_sent, ""
        self.reload(then=lambda: self._after_failure(event, last_sent))

    async def _after_failure(self, event: ev.EngineFailed, last_sent: str) -> None:
        """Once the transcript shows what was saved: an unsaved reply to copy, the unsaved message back in the box."""
        if event.unsaved_reply is not None:  # generated, not stored (full disk): keep it on screen to copy
            view = MessageView("assistant", event.unsaved_reply, speaker=self.persona.name, color=self.persona.color,
                               stats=f"NOT SAVED: {event.message} Press c on this message to copy it.")
            view.add_class("unsaved")
            await self.mount_after_read(view)
            self.transcript.scroll_end(animate=False)
        if last_sent and not self.composer.text and not any(
                v.message_id is not None and v.text == last_sent for v in self.message_views()):
            self.composer.text = last_sent  # nothing was saved: let the user shorten or fix it

    ENGINE_HANDLERS = {
        ev.ConversationOpened: on_engine_opened,
        ev.MessageSaved: on_engine_saved,
        ev.PrefillProgressed: ConversationTab.on_engine_prefill,
        ev.TokensGenerated: on_engine_tokens,
        ev.ReplyFinished: on_engine_finished,
        ev.EngineFailed: on_engine_failed,
    }


PASTE_NOTE_CHARS = 2000  # messages longer than this get their token count and reading time before sending


def paste_note(app, text: str) -> str:
    """For a long message: its tokens and about how long reading them takes, from the speed replies measured."""
    if len(text) < PASTE_NOTE_CHARS:
        return ""
    engine = getattr(app, "engine", None)
    tokens = engine.count_tokens(text) if engine is not None else None
    if tokens is None:
        return f"{len(text):,} characters: the model reads them all before it replies · enter sends"
    rate = getattr(app, "prefill_tps", 0.0)
    if rate > 0:
        return (f"{tokens:,} tokens: reading them takes about {duration(tokens / rate * 1000)} before the reply "
                f"starts (at {rate:.0f} tok/s measured) · enter sends")
    return f"{tokens:,} tokens: the model reads them all before it replies · enter sends"
