"""Old conversations (ctrl+o): reopen, delete, all personas' or this one's."""

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


class ConversationsScreen(ListedDialog):
    """Old conversations: enter reopens, d deletes (after a yes), a shows every persona's."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("d,delete", "delete", "Delete"),
        Binding("a", "toggle_all", "All personas"),
    ]

    def __init__(self, persona_id: str | None) -> None:
        super().__init__()
        self.persona_id = persona_id
        self.show_all = persona_id is None

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-box", classes="dialog"):
            yield Label("", id="conv-title", classes="dialog-title")
            yield OptionList(id="conversation-list")
            yield Static("enter reopen · d delete · a all personas / this one · escape close", classes="dialog-hint")

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def refresh_list(self) -> None:
        """Read the list again (on a worker thread: `ListedDialog`)."""
        pid = None if self.show_all else self.persona_id
        who = "all personas" if pid is None else self.app.personas.get(pid).name if pid in self.app.personas else pid
        self.query_one("#conv-title", Label).update(f"Conversations — {who}")
        super().refresh_list(pid)

    def show_rows(self, options: OptionList, rows: list) -> None:
        for row in rows:
            conv = row.conversation
            persona = self.app.personas.get(conv.persona_id)
            text = Text()
            text.append(f"{conv.title or 'New conversation'}", style="bold")
            text.append(f"\n  {persona.name if persona else conv.persona_id} · {row.messages} "
                        f"messages · {conv.updated_at[:16].replace('T', ' ')}", style="dim")
            options.add_option(Option(text, id=str(conv.id)))
        if rows:
            options.highlighted = 0

    def action_toggle_all(self) -> None:
        if self.persona_id is not None:
            self.show_all = not self.show_all
            self.refresh_list()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_delete(self) -> None:
        option = self.query_one(OptionList).highlighted_option
        if option is None:
            return
        conversation_id = int(option.id)
        open_pane = self.app.chat_screen.pane_for_conversation(conversation_id) if self.app.chat_screen else None
        if open_pane is not None and open_pane.generating:
            self.app.notify("A reply is being written in this conversation: stop it first (escape).",
                            severity="warning")
            return

        async def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            self.app.catalog.delete_conversation(conversation_id)  # a write: one quick transaction
            self.app.submit(cmd.Forget(conversation_id))
            self.refresh_list()
            self.app.notify("Conversation deleted.", timeout=2)
            screen = self.app.chat_screen
            if screen is not None:
                await screen.conversation_deleted(conversation_id)

        self.app.push_screen(ConfirmScreen("Delete this conversation and all its messages?"), confirmed)
