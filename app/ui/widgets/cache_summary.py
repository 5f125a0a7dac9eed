"""Where a cache is (RAM, disk, none) and how big, as the sidebar and a tab header show it."""

from __future__ import annotations

from dataclasses import dataclass

from app.ui.widgets.text import human_bytes


@dataclass
class CacheSummary:
    where: str = "none"  # "ram" | "disk" | "none"
    tokens: int = 0
    bytes: int = 0

    def label(self) -> str:
        if self.where == "none":
            return "no cache"
        return f"{self.where} {self.tokens} tok {human_bytes(self.bytes)}"
