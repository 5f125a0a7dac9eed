"""The widgets of the main screen: persona sidebar, RAM gauge, chat pane, message views, message box."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, Markdown, OptionList, ProgressBar, Static, TextArea
from textual.widgets.option_list import Option

from app.engine import commands as cmd
from app.engine import events as ev
from app.ui import messages as msg

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Text safe to draw: control characters (a small model emits them) are dropped."""
    return _CONTROL.sub("", text)


def human_bytes(n: int) -> str:
    """1536 -> '2 KB', 13.4 MiB -> '13.4 MB', 512 MiB -> '512 MB'."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            if unit in ("B", "KB") or value >= 100 or value == int(value):
                return f"{value:.0f} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def stats_line(stats: dict | ev.ReplyStats | None, cancelled: bool = False) -> str:
    """ttft · reused/prefilled · tokens/s · cache source, for the line under a reply."""
    if stats is None:
        return "stopped" if cancelled else ""
    if not isinstance(stats, dict):
        stats = stats.__dict__
    try:
        queued = float(stats.get("queued_ms") or 0)
        line = (
            f"ttft {duration(float(stats.get('ttft_ms', 0)))}"
            + (f" (queued {duration(queued)})" if queued >= QUEUE_SHOWN_MS else "")
            + f" · reused {int(stats.get('reused_tokens', 0))}"
            f" · prefilled {int(stats.get('prefilled_tokens', 0))} · {float(stats.get('decode_tps', 0)):.0f} tok/s"
            f" · cache {stats.get('cache', 'none')}"
        )
        if stats.get("opened_from") == "disk":
            line += f" (read from disk in {float(stats.get('open_ms') or 0):.0f} ms on opening the tab)"
    except (TypeError, ValueError):
        return ""
    return line + (" · stopped" if cancelled else "")


QUEUE_SHOWN_MS = 50.0  # shorter waits are the engine picking the message up, not a queue


def duration(ms: float) -> str:
    """840 -> '840 ms', 20345 -> '20.3 s'."""
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def lore_of(catalog, message) -> tuple[dict, ...]:
    """Lorebook entries stored with the user message a reply answers (app.engine.lore writes meta["lore"])."""
    if message is None or message.role != "assistant" or not message.parent_id:
        return ()
    parent = catalog.get_message(message.parent_id)
    return lore_entries(parent.meta.get("lore") if parent is not None else None)


def lore_entries(items) -> tuple[dict, ...]:
    """The entries of a stored lore list (meta may be hand-edited: anything else is no entries)."""
    return tuple(i for i in items if isinstance(i, dict)) if isinstance(items, list) else ()


def lore_mark(lore) -> str:
    """The quiet marker on a reply whose turn added lorebook entries (key l on the reply shows them)."""
    return f" · lore: {', '.join(str(i.get('name', '?')) for i in lore)} (l)" if lore else ""


@dataclass
class CacheSummary:
    where: str = "none"  # "ram" | "disk" | "none"
    tokens: int = 0
    bytes: int = 0

    def label(self) -> str:
        if self.where == "none":
            return "no cache"
        return f"{self.where} {self.tokens} tok {human_bytes(self.bytes)}"


# -- sidebar ---------------------------------------------------------------------


class PersonaList(Vertical):
    """A filter box over the persona list; each line shows the persona's cache state and size."""

    BINDINGS = [Binding("down", "to_list", "Persona list", show=False)]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._personas: dict = {}
        self._caches: dict[str, CacheSummary] = {}
        self._last_highlighted: str | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Filter personas…", id="persona-filter")
        yield OptionList(id="persona-list")

    @property
    def filter_text(self) -> str:
        return self.query_one("#persona-filter", Input).value.strip().lower()

    def set_personas(self, personas: dict) -> None:
        self._personas = dict(personas)
        self.refresh_list()

    def set_caches(self, caches: dict[str, CacheSummary]) -> None:
        self._caches = dict(caches)
        self.refresh_list()

    def cache_of(self, persona_id: str) -> CacheSummary:
        return self._caches.get(persona_id, CacheSummary())

    def visible_ids(self) -> list[str]:
        needle = self.filter_text
        out = []
        for persona in sorted(self._personas.values(), key=lambda p: p.name.lower()):
            hay = f"{persona.id} {persona.name} {persona.description} {' '.join(persona.tags)}".lower()
            if not needle or needle in hay:
                out.append(persona.id)
        return out

    def _prompt(self, persona) -> Text:
        cache = self.cache_of(persona.id)
        text = Text()
        text.append("● ", style=persona.color)
        text.append(persona.name, style="bold")
        text.append("\n  ")
        style = {"ram": "#3fa34d", "disk": "#c98a00"}.get(cache.where, "dim")
        text.append(cache.label(), style=style)
        return text

    def refresh_list(self) -> None:
        options = self.query_one("#persona-list", OptionList)
        ids = self.visible_ids()
        current = [options.get_option_at_index(i).id for i in range(options.option_count)]
        if current == ids:  # same personas: only their cache lines changed
            for pid in ids:
                options.replace_option_prompt(pid, self._prompt(self._personas[pid]))
            return
        highlighted = options.highlighted_option.id if options.highlighted_option is not None else None
        options.clear_options()
        options.add_options([Option(self._prompt(self._personas[pid]), id=pid) for pid in ids])
        if ids:
            options.highlighted = ids.index(highlighted) if highlighted in ids else 0

    @property
    def highlighted_id(self) -> str | None:
        option = self.query_one("#persona-list", OptionList).highlighted_option
        return option.id if option is not None else None

    def action_to_list(self) -> None:
        self.query_one("#persona-list", OptionList).focus()

    @on(Input.Changed, "#persona-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.refresh_list()

    @on(Input.Submitted, "#persona-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.highlighted_id:
            self.post_message(msg.PersonaChosen(self.highlighted_id))
            event.input.value = ""  # the filter has done its job: new personas must not stay hidden behind it

    @on(OptionList.OptionHighlighted, "#persona-list")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option.id and event.option.id != self._last_highlighted:
            self._last_highlighted = event.option.id
            self.post_message(msg.PersonaHighlighted(event.option.id))

    @on(OptionList.OptionSelected, "#persona-list")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.post_message(msg.PersonaChosen(event.option.id))


class RamGauge(Vertical):
    """How much of the RAM budget the conversation caches use."""

    def __init__(self, budget_bytes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.budget = max(1, int(budget_bytes))
        self.used = 0

    def compose(self) -> ComposeResult:
        yield Label(self._label(), id="ram-label")
        yield ProgressBar(total=self.budget, show_eta=False, show_percentage=True, id="ram-bar")

    def _label(self) -> str:
        return f"Cache RAM {human_bytes(self.used)} / {human_bytes(self.budget)}"

    def update_usage(self, used: int, budget: int) -> None:
        self.used, self.budget = int(used), max(1, int(budget or self.budget))
        bar = self.query_one(ProgressBar)
        bar.update(total=self.budget, progress=min(self.used, self.budget))
        self.query_one("#ram-label", Label).update(self._label())


# -- chat ------------------------------------------------------------------------


class ChatInput(TextArea):
    """The message box: enter sends, shift+enter or ctrl+j starts a new line."""

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(msg.ComposerSubmitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        number = self._tab_character(event.character)
        if number is not None:
            event.stop()
            event.prevent_default()
            self.post_message(msg.TabCharacter(number))
            return
        if event.key == "up" and self.cursor_location == (0, 0):
            pane = next((a for a in self.ancestors if hasattr(a, "focus_message")), None)  # a chat or a scene
            if pane is not None and pane.focus_message(-1):
                event.stop()
                event.prevent_default()
                return
        await super()._on_key(event)

    def _tab_character(self, character: str | None) -> int | None:
        """The tab an option/8-bit digit character asks for (app.ui.keys), or None to type it."""
        from app.ui.keys import TAB_CHARACTERS, TabCharacterGuard

        if character not in TAB_CHARACTERS:
            return None
        guard = getattr(self.app, "tab_character_guard", None)
        if guard is None:
            guard = self.app.tab_character_guard = TabCharacterGuard()
        screen = getattr(self.app, "chat_screen", None)
        tabs = len(screen.pane_ids()) if screen is not None and screen.is_mounted else 0
        return guard.tab_for(character, not self.text, tabs)


class MessageView(Vertical, can_focus=True):
    """One message: a header (who, which alternative), the text as Markdown, and a figures line for replies."""

    BINDINGS = [
        Binding("left", "alternative(-1)", "Previous alternative"),
        Binding("right", "alternative(1)", "Next alternative"),
        Binding("e", "edit", "Edit & resend"),
        Binding("c", "copy", "Copy"),
        Binding("l", "lore", "Lorebook entries", show=False),
        Binding("up", "move(-1)", "Previous message", show=False),
        Binding("down", "move(1)", "Next message", show=False),
    ]

    def __init__(self, role: str, text: str, message_id: int | None = None, *, speaker: str = "",
                 color: str = "", stats: str = "", alternatives: tuple[int, int] = (1, 1),
                 streaming: bool = False, greeting: bool = False, lore: tuple[dict, ...] = ()) -> None:
        classes = f"message {role}" + (" streaming" if streaming else "") + (" greeting" if greeting else "")
        super().__init__(classes=classes)
        self.role = role
        self.text = text
        self.message_id = message_id
        self.speaker = speaker
        self.color = color
        self.stats = stats
        self.alternatives = alternatives
        self.greeting = greeting
        self.lore = lore  # lorebook entries that entered with the turn this reply answers (key l shows them)
        self.alternatives_known = message_id is not None and not streaming
        self._stream = None
        if greeting:
            self.can_focus = False

    def compose(self) -> ComposeResult:
        yield Static(self._head(), classes="msg-head")
        yield Markdown(self._body(self.text), classes="msg-body")
        stats = Static(self.stats, classes="msg-stats")
        stats.display = bool(self.stats)
        yield stats

    def _body(self, text: str) -> str:
        """The text to draw; a finished reply with no text says so instead of showing nothing."""
        if not text.strip() and self.role == "assistant" and "streaming" not in self.classes:
            return "*(stopped before the first token)*" if "stopped-note" in self.classes else "*(empty reply)*"
        return clean(text)

    def _head(self) -> Text:
        text = Text()
        who = "You" if self.role == "user" else (self.speaker or "Assistant")
        text.append(who, style=f"bold {self.color}" if self.color and self.role != "user" else "bold")
        if self.greeting:
            text.append("  greeting", style="dim")
        index, total = self.alternatives
        if total > 1:
            text.append(f"  ‹ {index}/{total} ›", style="bold")
        if "streaming" in self.classes:
            text.append("  …", style="dim")
        return text

    def set_alternatives(self, alternatives: tuple[int, int]) -> None:
        if alternatives != self.alternatives:
            self.alternatives = alternatives
            self.query_one(".msg-head", Static).update(self._head())

    def set_stats(self, stats: str) -> None:
        self.stats = stats
        line = self.query_one(".msg-stats", Static)
        line.update(stats)
        line.display = bool(stats)

    # streaming ---------------------------------------------------------------
    async def write(self, delta: str) -> None:
        self.text += delta
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(clean(delta))

    async def finish(self, text: str, message_id: int | None, stats: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.remove_class("streaming")
        self.message_id = message_id
        if text != self.text or not text.strip():
            self.text = text
            await self.query_one(Markdown).update(self._body(text))
        self.query_one(".msg-head", Static).update(self._head())
        self.set_stats(stats)

    async def stop_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    # actions -----------------------------------------------------------------
    def action_alternative(self, step: int) -> None:
        if self.message_id is not None:
            self.post_message(msg.AlternativeRequested(self.message_id, step))

    def action_edit(self) -> None:
        if self.role == "user" and self.message_id is not None:
            self.post_message(msg.EditRequested(self.message_id, self.text))
        else:
            self.app.notify("Only your own messages can be edited; ctrl+r regenerates a reply.", severity="warning")

    def action_copy(self) -> None:
        self.post_message(msg.CopyRequested(self.text))

    def action_lore(self) -> None:
        if not self.lore:
            self.app.notify("No lorebook entries entered the conversation with this reply.")
            return
        body = "\n\n".join(f"{i.get('name', '?')}: {i.get('content', '')}" for i in self.lore)
        self.app.notify(body, title="Lorebook entries added with this turn", timeout=30)

    def action_move(self, step: int) -> None:
        pane = next((a for a in self.ancestors if hasattr(a, "move_focus_from")), None)  # a chat or a scene
        if pane is not None:
            pane.move_focus_from(self, step)


class Transcript(VerticalScroll):
    """The scrolling message list. It remembers whether the reader is at the newest message (`following`),
    so a reply finished while the tab was hidden, or a resize, still ends with the newest message and its
    figures in view; a reader who scrolled up stays where they are."""

    following = True

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self.size.height and self.is_on_screen and self.max_scroll_y > 0:
            self.following = new_value >= self.max_scroll_y - 2

    def show_newest(self) -> None:
        """Scroll to the end once the layout is up to date (a hidden tab has no size before that)."""
        self.following = True
        self.call_after_refresh(self.scroll_end, animate=False, immediate=True)

    def keep_up(self) -> None:
        """After the content or the size changed: stay at the end if the reader was there."""
        if self.following:
            self.show_newest()

    def on_resize(self) -> None:
        self.keep_up()


class TranscriptNavigation:
    """What chat and scene tabs share: their transcript and message box, and keyboard focus over
    the message views (↑/↓ between messages). The tab provides `message_views()`.
    """

    @property
    def transcript(self) -> Transcript:
        return self.query_one(".transcript", Transcript)

    @property
    def composer(self) -> ChatInput:
        return self.query_one(ChatInput)

    restore_scroll: float | None = None  # a saved scroll position, applied when the tab is next shown

    def show_in_view(self) -> None:
        """The tab came on screen: back to its saved scroll position, or to the newest message if following."""
        if not self.query(".transcript"):  # being closed
            return
        transcript = self.transcript
        if self.restore_scroll is not None:
            y, self.restore_scroll = self.restore_scroll, None
            transcript.following = False
            transcript.call_after_refresh(transcript.scroll_to, y=y, animate=False, immediate=True)
        else:
            transcript.keep_up()

    def scroll_record(self) -> float | None:
        """What to save: the scroll position, or None when the reader is at the newest message."""
        if self.restore_scroll is not None:
            return self.restore_scroll
        found = self.query(".transcript")
        transcript = found.first() if found else None
        return None if transcript is None or transcript.following else float(transcript.scroll_y)

    def focus_message(self, index: int) -> bool:
        views = [v for v in self.message_views() if v.message_id is not None]
        if not views:
            return False
        view = views[index]
        view.focus()
        view.scroll_visible(animate=False)
        return True

    def move_focus_from(self, view: MessageView, step: int) -> None:
        views = [v for v in self.message_views() if v.message_id is not None]
        if view not in views:
            self.composer.focus()
            return
        i = views.index(view) + step
        if i >= len(views):
            self.composer.focus()
        elif i >= 0:
            views[i].focus()
            views[i].scroll_visible(animate=False)

    def focused_message(self) -> MessageView | None:
        focused = self.app.focused
        return focused if isinstance(focused, MessageView) and focused in self.message_views() else None

    def last_reply(self) -> MessageView | None:
        replies = [v for v in self.message_views() if v.role == "assistant"]
        return replies[-1] if replies else None


class ChatPane(TranscriptNavigation, Vertical):
    """One persona's tab: header, transcript, prefill progress, and the message box.

    Reads the transcript from the app's catalog; sends commands through `app.submit`;
    the screen routes engine events for this pane's conversation to its `on_engine_*` methods.
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
    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="chat-header")
        yield Transcript(classes="transcript")
        with Horizontal(classes="prefill"):
            yield Label("Reading the conversation", classes="prefill-label")
            yield ProgressBar(total=1, show_eta=False, classes="prefill-bar")
        yield Static(self._hint(), classes="composer-hint")
        yield ChatInput(classes="composer")

    async def on_mount(self) -> None:
        await self.reload()

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

    def _hint(self) -> str:
        if self.generating:
            waits = self.waiting_for()
            if waits:
                return f"Queued: waits for {waits} to finish replying, then this reply starts"
            return "Replying… escape stops"
        paste = paste_note(self.app, self.composer.text if self.is_mounted and self.query(ChatInput) else "")
        if paste:
            return paste
        if self.editing is not None:
            return "Editing: enter resends it as a new branch · escape cancels"
        return "enter send · ctrl+j new line · ↑ pick a message · F1 keys"

    def waiting_for(self) -> str:
        """Whose reply the engine is writing now, when it is not this tab's (this tab's reply waits for it)."""
        screen = getattr(self.app, "chat_screen", None)
        running = getattr(screen, "running", None)
        if screen is None or running is None or running == self.conversation_id:
            return ""
        other = screen.pane_for_conversation(running)
        scene = screen.scene_for_conversation(running)
        return other.persona.name if other else f"the scene {scene.scene_title}" if scene else "another conversation"

    @on(TextArea.Changed, ".composer")
    def _composer_changed(self) -> None:
        self.query_one(".composer-hint", Static).update(self._hint())

    def refresh_chrome(self) -> None:
        if not self.query(".chat-header"):  # being closed: nothing to draw on
            return
        self.query_one(".chat-header", Static).update(self._header())
        self.query_one(".composer-hint", Static).update(self._hint())
        self.set_class(self.generating, "-generating")

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
        try:
            from app.personas import preamble_messages

            pre = preamble_messages(self.persona)
        except Exception:
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

    def stop(self) -> bool:
        if self.generating:
            self.app.submit(cmd.Cancel())
            return True
        return False

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

    # engine events (routed here by the screen) -----------------------------------
    def on_engine_opened(self, event: ev.ConversationOpened) -> None:
        self.cache_source, self.cache_tokens = event.cache, event.tokens
        self.cache_load_ms = float(getattr(event, "load_ms", 0.0) or 0.0)
        self.refresh_chrome()

    async def on_engine_saved(self, event: ev.MessageSaved) -> None:
        if event.role == "user":
            await self.reload()

    def on_engine_prefill(self, event: ev.PrefillProgressed) -> None:
        self.add_class("-prefilling")
        self.query_one(".prefill-bar", ProgressBar).update(total=max(1, event.total), progress=event.done)
        if event.done >= event.total:
            self.remove_class("-prefilling")

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
