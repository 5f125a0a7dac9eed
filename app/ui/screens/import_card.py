"""Import a character card from a file (F4)."""

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


class ImportCardScreen(ModalScreen):
    """Import a character card (V2/V3 JSON, PNG, CHARX) from a path."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="import-box", classes="dialog"):
            yield Label("Import a character card (.json, .png or .charx)", classes="dialog-title")
            yield Input(placeholder="/path/to/card.png", id="card-path")
            yield Static("", id="card-error")
            yield Static("enter imports · escape cancels", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted, "#card-path")
    def _import(self, event: Input.Submitted) -> None:
        from app.personas.cards import import_card

        raw = event.value.strip()
        if not raw:
            return
        try:
            persona = import_card(Path(raw).expanduser(), self.app.user_persona_dir())
        except ParleyError as exc:
            self.query_one("#card-error", Static).update(Text(str(exc), style="bold red"))
            return
        self.dismiss(persona)
