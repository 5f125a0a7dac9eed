"""Name a new scene and pick its personas (F8)."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, SelectionList, Static

from app.engine.scene import MAX_MEMBERS, MIN_MEMBERS, create_scene
from app.ui.catalog_reads import READ_ERRORS, off_ui_thread
from app.ui.widgets.scene_tab import DEFAULT_COLOR


class NewSceneScreen(ModalScreen):
    """Name a scene and pick 2 to 6 personas (their speaking order is the order they are picked in)."""

    BINDINGS = [Binding("ctrl+s", "create", "Create"), Binding("escape", "dismiss(None)", "Cancel"),
                Binding("tab", "app.focus_next", "Next field", show=False, priority=True),  # see PersonaEditorScreen
                Binding("shift+tab", "app.focus_previous", "Previous field", show=False, priority=True)]

    def compose(self) -> ComposeResult:
        personas = sorted(self.app.personas.values(), key=lambda p: p.name.lower())
        with Vertical(id="new-scene-box", classes="dialog"):
            yield Label("New scene", classes="dialog-title")
            yield Label("Name")
            yield Input(placeholder="The classroom", id="scene-name")
            yield Label(f"Personas ({MIN_MEMBERS} to {MAX_MEMBERS}; space picks, in speaking order)")
            yield SelectionList(*[(Text.assemble(("● ", p.color or DEFAULT_COLOR), (p.name, "bold"),
                                                 (f"  {p.description}" if p.description else "", "dim")), p.id)
                                  for p in personas], id="scene-members")
            yield Static("", id="scene-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Create (ctrl+s)", variant="primary", id="scene-create")
                yield Button("Cancel (esc)", id="scene-cancel")
            yield Static("tab moves between the name and the list · enter in the name creates", classes="dialog-hint")

    def on_mount(self) -> None:
        self.query_one("#scene-name", Input).focus()

    async def action_create(self) -> None:
        """Check and create the scene on a worker thread (its name is compared with the scenes in the catalog)."""
        name = self.query_one("#scene-name", Input).value
        members = list(self.query_one("#scene-members", SelectionList).selected)
        try:
            conversation_id = await off_ui_thread(self, create_scene, name, members, self.app.personas)
        except READ_ERRORS as exc:
            self.query_one("#scene-error", Static).update(Text(str(exc), style="bold red"))
            return
        self.dismiss(conversation_id)

    @on(Input.Submitted, "#scene-name")
    async def _name_submitted(self) -> None:
        await self.action_create()

    @on(Button.Pressed, "#scene-create")
    async def _create_pressed(self) -> None:
        await self.action_create()

    @on(Button.Pressed, "#scene-cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)
