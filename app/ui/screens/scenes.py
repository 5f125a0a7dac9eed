"""The scenes (F9): reopen one, make a new one, delete one."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from app.engine import commands as cmd
from app.ui.screens.confirm import ConfirmScreen
from app.ui.screens.listed import ListedDialog


class ScenesScreen(ListedDialog):
    """The scenes: enter reopens one, n makes a new one, d deletes (after a yes)."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("n", "new", "New scene"),
        Binding("d,delete", "delete", "Delete"),
    ]

    LIST_KIND = "scene"

    def compose(self) -> ComposeResult:
        with Vertical(id="scenes-box", classes="dialog"):
            yield Label("Scenes", classes="dialog-title")
            yield OptionList(id="scene-list")
            yield Static("enter reopen · n new scene · d delete · escape close", classes="dialog-hint")

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def show_rows(self, options: OptionList, rows: list) -> None:
        for row in rows:
            conv = row.conversation
            text = Text()
            text.append(conv.title or "Scene", style="bold")
            text.append("\n  ")
            for i, pid in enumerate(conv.members):
                persona = self.app.personas.get(pid)
                if i:
                    text.append(" · ", style="dim")
                text.append(persona.name if persona else pid, style=persona.color if persona else "dim")
            text.append(f" · {row.messages} messages · {conv.updated_at[:16].replace('T', ' ')}", style="dim")
            options.add_option(Option(text, id=str(conv.id)))
        if not rows:
            options.add_option(Option(Text("No scenes yet: press n to make one.", style="dim"), disabled=True))
        else:
            options.highlighted = 0

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.dismiss(int(event.option.id))

    def action_new(self) -> None:
        self.dismiss("new")

    def action_delete(self) -> None:
        option = self.query_one(OptionList).highlighted_option
        if option is None or not option.id:
            return
        conversation_id = int(option.id)
        screen = self.app.chat_screen
        tab = screen.scene_for_conversation(conversation_id) if screen else None
        if tab is not None and tab.generating:
            self.app.notify("A round is going on in this scene: stop it first (escape).", severity="warning")
            return

        async def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            if screen is not None:
                await screen.close_scene(conversation_id)
            self.app.catalog.delete_conversation(conversation_id)  # a write: one quick transaction
            self.app.submit(cmd.Forget(conversation_id))
            self.refresh_list()
            self.app.notify("Scene deleted.", timeout=2)

        self.app.push_screen(ConfirmScreen("Delete this scene and all its messages?"), confirmed)
