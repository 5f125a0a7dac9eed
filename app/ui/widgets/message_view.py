"""One message in a transcript: who, which alternative, the text as Markdown, the figures line."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Markdown, Static

from app.ui import messages as msg
from app.ui.widgets.text import clean


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
        self.details_known = message_id is not None and not streaming  # alternatives and lore as read
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
