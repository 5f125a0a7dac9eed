"""Export a persona as a character card (F5)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from app.errors import ParleyError


class ExportCardScreen(ModalScreen):
    """Export a persona as a Character Card V2 (.json or .png, by the name)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, persona) -> None:
        super().__init__()
        self.persona = persona

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box", classes="dialog"):
            yield Label(f"Export {self.persona.name} as a character card (.json or .png)", classes="dialog-title")
            yield Input(str(export_folder() / f"{self.persona.id}.json"), id="export-path")
            yield Static("", id="export-error")
            yield Static("enter exports · escape cancels", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted, "#export-path")
    def _export(self, event: Input.Submitted) -> None:
        from app.personas.cards import export_card

        try:
            path = export_card(self.persona, Path(event.value.strip()).expanduser())
        except ParleyError as exc:
            self.query_one("#export-error", Static).update(Text(str(exc), style="bold red"))
            return
        self.app.notify(f"Exported {self.persona.name} to {path}.", timeout=4)
        self.dismiss(path)


def export_folder() -> Path:
    """Where an exported card is proposed: the user's Documents folder, or home (never the folder Parley runs in)."""
    documents = Path.home() / "Documents"
    return documents if documents.is_dir() else Path.home()
