"""Open tabs survive a restart: which tabs, in which order, the active one, and each one's scroll position.

A small JSON file in PARLEY_HOME (`ui-state.json`), written whenever the tabs change and when the app quits;
read once at start. It is a convenience, not data: a missing, unreadable or stale file (a deleted persona or
conversation) just opens fewer tabs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app import paths

STATE_FILE = "ui-state.json"


@dataclass
class TabRecord:
    kind: str  # "chat" | "scene"
    conversation_id: int
    persona_id: str | None = None  # chats
    scroll_y: float | None = None  # None: at the newest message (follows new replies)


@dataclass
class TabState:
    tabs: list[TabRecord] = field(default_factory=list)
    active: int = 0


def state_path() -> Path:
    return paths.parley_home() / STATE_FILE


def save(state: TabState, path: Path | None = None) -> None:
    """Write atomically (temporary file, rename) so a crash never leaves half a file."""
    path = path or state_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"tabs": [asdict(t) for t in state.tabs], "active": state.active}), encoding="utf-8")
    os.replace(tmp, path)


def load(path: Path | None = None) -> TabState:
    """The saved tabs; an empty state when there is no file or it cannot be read."""
    path = path or state_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        tabs = [TabRecord(kind=str(t["kind"]), conversation_id=int(t["conversation_id"]),
                          persona_id=t.get("persona_id"),
                          scroll_y=None if t.get("scroll_y") is None else float(t["scroll_y"]))
                for t in raw.get("tabs", []) if t.get("kind") in ("chat", "scene")]
        return TabState(tabs, int(raw.get("active", 0)))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return TabState()
