"""The sidebar's RAM gauge: how much of the cache budget the conversation caches use."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar

from app.ui.widgets.text import human_bytes


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
