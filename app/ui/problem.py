"""A screen that says why the app cannot go on (a damaged catalog), in full, and nothing else.

Shown instead of the chat screen when the catalog fails its start-up check: the recovery steps
must be readable (and selectable) on screen, and nothing may write to the damaged file meanwhile.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static


class ProblemScreen(Screen):
    """The message of a `ParleyError` that stops the app at start-up; q quits."""

    BINDINGS = [Binding("q", "app.quit", "Quit"), Binding("escape", "app.quit", "Quit", show=False)]
    DEFAULT_CSS = """
    ProblemScreen { align: center middle; }
    ProblemScreen #problem { width: 100%; max-width: 110; height: auto; border: heavy $error; padding: 1 2; }
    """

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.problem_title = title
        self.message = message

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(f"[b]{self.problem_title}[/b]\n\n", id="problem-title", markup=True)
            yield Static(self.message, id="problem", markup=False)
        yield Footer()
