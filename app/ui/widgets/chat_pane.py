"""One persona's chat tab: header, transcript, prefill progress and the message box."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.widgets import Static, TextArea

from app.catalog.caches import CacheSummary
from app.engine import commands as cmd
from app.engine import events as ev
from app.errors import ParleyError
from app.ui.widgets.chat_input import ChatInput
from app.ui.widgets.conversation_tab import ConversationTab
from app.ui.widgets.message_view import MessageView
from app.ui.widgets.text import duration, lore_mark, lore_of, stats_line


class ChatPane(ConversationTab):
    """One persona's tab: header, transcript, prefill progress, and the message box.

    Reads the transcript from the app's catalog; sends commands through `app.submit`;
    the screen routes engine events for this pane's conversation to it (`ENGINE_HANDLERS`, at the end).
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

    # layout ------------------------------------------------------------------
    def _header(self) -> Text:
        conv = self.app.catalog.get_conversation(self.conversation_id)
        title = (conv.title if conv and conv.title else "New conversation")
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

    def _alternatives(self, message) -> tuple[int, int]:
        alts = self.app.catalog.alternatives(message.id)
        ids = [m.id for m in alts]
        return (ids.index(message.id) + 1 if message.id in ids else 1, max(1, len(ids)))

    def _view_for(self, message) -> MessageView:
        stats = ""
        if message.role == "assistant":
            stats = stats_line(message.meta.get("stats"), bool(message.meta.get("cancelled")))
        lore = lore_of(self.app.catalog, message)
        return MessageView(message.role, message.content, message.id, speaker=self.persona.name,
                           color=self.persona.color, stats=stats + lore_mark(lore), alternatives=self._alternatives(message),
                           lore=lore)

    async def reload(self) -> None:
        """Bring the transcript in line with the catalog: keep the views that still match, replace the rest."""
        transcript = self.transcript
        if not transcript.query(".greeting"):
            greeting = self._greeting()
            if greeting:
                await transcript.mount(MessageView("assistant", greeting, speaker=self.persona.name,
                                                   color=self.persona.color, greeting=True))
        path = [m for m in self.app.catalog.current_path(self.conversation_id) if m.role in ("user", "assistant")]
        views = self.message_views()
        keep = 0
        for view, message in zip(views, path):
            same_text = view.text == message.content and view.role == message.role
            if view.message_id == message.id or (view.message_id is None and same_text):
                if not same_text:
                    break
                view.message_id = message.id
                if not view.alternatives_known:  # a view of a message the engine just saved
                    view.set_alternatives(self._alternatives(message))
                    view.alternatives_known = True
                keep += 1
            else:
                break
        for view in views[keep:]:
            await view.remove()
        new = [self._view_for(m) for m in path[keep:]]
        if new:
            live = self.streaming_view()
            if live is not None:
                await transcript.mount_all(new, before=live)
            else:
                await transcript.mount_all(new)
        self.refresh_chrome()
        transcript.keep_up()

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

    async def browse(self, message_id: int, step: int) -> None:
        if self.generating:
            self.app.notify("Wait for the reply before browsing alternatives.", severity="warning")
            return
        catalog = self.app.catalog
        alts = catalog.alternatives(message_id)
        ids = [m.id for m in alts]
        if len(ids) < 2 or message_id not in ids:
            self.app.notify("This message has no alternatives (ctrl+r regenerates a reply).")
            return
        target = ids[(ids.index(message_id) + step) % len(ids)]
        catalog.set_leaf(self.conversation_id, catalog.leaf_after(target))
        await self.reload()
        view = next((v for v in self.message_views() if v.message_id == target), None)
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
        await self.transcript.remove_children()
        await self.reload()
        if self.parent is not None and self.app.chat_screen.active_pane() is self:
            self.app.chat_screen.request_open(conversation_id)

    # engine events (the screen routes this conversation's here) -----------------------
    def on_engine_opened(self, event: ev.ConversationOpened) -> None:
        self.cache_source, self.cache_tokens = event.cache, event.tokens
        self.cache_load_ms = float(getattr(event, "load_ms", 0.0) or 0.0)
        self.refresh_chrome()

    async def on_engine_saved(self, event: ev.MessageSaved) -> None:
        if event.role == "user":
            await self.reload()

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
            if event.message_id:
                live.lore = lore_of(self.app.catalog, self.app.catalog.get_message(event.message_id))
                await live.finish(event.text, event.message_id,
                                  stats_line(event.stats, event.cancelled) + lore_mark(live.lore))
            elif event.cancelled:  # stopped while reading: the bubble stays, saying so (nothing was saved)
                live.add_class("stopped-note")
                await live.finish("", None, "stopped")
            else:
                await live.stop_stream()
                await live.remove()
        self.generating = False
        self.last_sent = ""
        await self.reload()
        self.title_changed()
        self.transcript.keep_up()

    async def on_engine_failed(self, event: ev.EngineFailed) -> None:
        live = self.streaming_view()
        if live is not None:
            await live.stop_stream()
            await live.remove()
        self.generating = False
        self.remove_class("-prefilling")
        await self.reload()
        if event.unsaved_reply is not None:  # generated, not stored (full disk): keep it on screen to copy
            view = MessageView("assistant", event.unsaved_reply, speaker=self.persona.name, color=self.persona.color,
                               stats=f"NOT SAVED: {event.message} Press c on this message to copy it.")
            view.add_class("unsaved")
            await self.transcript.mount(view)
            self.transcript.scroll_end(animate=False)
        if self.last_sent and not self.composer.text and not any(
                v.message_id is not None and v.text == self.last_sent for v in self.message_views()):
            self.composer.text = self.last_sent  # nothing was saved: let the user shorten or fix it
        self.last_sent = ""

    def title_changed(self) -> None:
        self.refresh_chrome()

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
