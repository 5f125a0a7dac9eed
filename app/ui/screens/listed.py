"""What the conversations and scenes dialogs share: a list the catalog gives, read on a worker thread."""

from __future__ import annotations

from textual import work
from textual.screen import ModalScreen
from textual.widgets import OptionList

from app.ui.catalog_reads import LatestOnly, post_list
from app.ui.messages import ConversationsListed


class ListedDialog(ModalScreen):
    """A dialog over the catalog's conversations of one kind. `refresh_list` asks for them (read on a worker
    thread, `ConversationsListed` answers); only the newest read is shown; `show_rows` draws them."""

    LIST_KIND = "chat"

    def __init__(self) -> None:
        super().__init__()
        self.lists = LatestOnly()  # the list reads asked for (only the newest is shown)

    @property
    def reads_pending(self) -> bool:
        return self.lists.pending

    def refresh_list(self, persona_id: str | None = None) -> None:
        self._read_list(persona_id, self.lists.ask())

    @work(thread=True, exclusive=True, group="dialog-list")
    def _read_list(self, persona_id: str | None, number: int) -> None:
        post_list(self, persona_id, self.LIST_KIND, number)

    def on_conversations_listed(self, message: ConversationsListed) -> None:
        if not self.lists.is_newest(message.number):
            return  # an older read (before a delete, or another filter) answered late
        self.lists.done(message.number)
        if message.problem:
            self.app.notify(message.problem, severity="error")
        options = self.query_one(OptionList)
        options.clear_options()
        self.show_rows(options, message.rows)

    def show_rows(self, options: OptionList, rows: list) -> None:
        raise NotImplementedError
