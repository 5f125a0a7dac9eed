"""The conversation's notes in the app: read and edit what the model wrote about turns that left its view.

The notes live in the catalog (app.catalog.notes); the engine reads them at the next turn, so an edit
takes effect then (the view after the preamble is read again once). A scene keeps notes per seat (each
member sees the room from its own seat), so in a scene tab the user first picks whose notes to open.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from app.errors import ParleyError

EMPTY_HINT = "No notes yet: the model writes them when the conversation first outgrows its context window."


class NotesScreen(ModalScreen):
    """Edit one conversation's (or one scene seat's) notes; ctrl+s saves, escape closes."""

    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, conversation_id: int, title: str, speaker: str | None = None, notes: str = "") -> None:
        """`notes`: as read from the catalog (off the UI thread: `open_notes`)."""
        super().__init__()
        self.conversation_id = conversation_id
        self.title_text = title
        self.speaker = speaker
        self.notes = notes

    def compose(self) -> ComposeResult:
        notes = self.notes
        with Vertical(id="notes-box", classes="dialog"):
            yield Label(f"Notes · {self.title_text}", classes="dialog-title")
            yield Static(EMPTY_HINT if not notes else "What the model keeps of the turns it no longer sees.",
                         classes="dialog-hint")
            yield TextArea(notes, id="notes-text")
            yield Static("", id="notes-error")
            yield Static("ctrl+s saves · escape closes", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_save(self) -> None:
        from app.catalog.notes import set_conversation_notes

        try:
            set_conversation_notes(self.app.catalog, self.conversation_id, self.query_one(TextArea).text, self.speaker)
        except ParleyError as exc:
            self.query_one("#notes-error", Static).update(Text(str(exc), style="bold red"))
            return
        self.app.notify("Notes saved; the model reads them from the next turn.")
        self.dismiss(True)


class SeatScreen(ModalScreen):
    """Pick the scene member whose notes to open; enter picks (dismisses with its persona id), escape closes."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, title: str, seats: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.seats = seats  # (persona id, name, colour), in speaking order

    def compose(self) -> ComposeResult:
        with Vertical(id="seats-box", classes="dialog"):
            yield Label(f"Notes · {self.title_text} · whose?", classes="dialog-title")
            yield OptionList(*[Option(Text(name, style=f"bold {color}"), id=pid) for pid, name, color in self.seats],
                             id="seat-list")
            yield Static("each member keeps its own notes · enter opens · escape closes", classes="dialog-hint")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = 0 if self.seats else None
        options.focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


async def open_notes(node, conversation_id: int, title: str, speaker: str | None = None) -> None:
    """Read the notes on a worker thread (app.ui.catalog_reads), then open the dialog over them."""
    from app.catalog.notes import conversation_notes
    from app.ui.catalog_reads import READ_ERRORS, off_ui_thread

    try:
        notes = await off_ui_thread(node, conversation_notes, conversation_id, speaker)
    except READ_ERRORS as exc:
        node.app.notify(f"The notes could not be read ({exc}); try again.", severity="error")
        return
    node.app.push_screen(NotesScreen(conversation_id, title, speaker, notes))


def open_scene_notes(app, scene) -> None:
    """The notes dialog for a scene tab: pick the seat, then read or edit that member's notes."""

    async def picked(persona_id: str | None) -> None:
        if persona_id:
            await open_notes(scene, scene.conversation_id, f"{scene.scene_title} · {scene.name_of(persona_id)}",
                             persona_id)

    seats = [(pid, scene.name_of(pid), scene.color_of(pid)) for pid in scene.members]
    app.push_screen(SeatScreen(scene.scene_title, seats), picked)
