"""How figures and model text are drawn: safe text, sizes, durations, the figures line under a reply, lore marks."""

from __future__ import annotations

import re

from app.engine import events as ev

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Text safe to draw: control characters (a small model emits them) are dropped."""
    return _CONTROL.sub("", text)


def human_bytes(n: int) -> str:
    """1536 -> '2 KB', 13.4 MiB -> '13.4 MB', 512 MiB -> '512 MB'."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            if unit in ("B", "KB") or value >= 100 or value == int(value):
                return f"{value:.0f} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def stats_line(stats: dict | ev.ReplyStats | None, cancelled: bool = False) -> str:
    """ttft · reused/prefilled · tokens/s · cache source, for the line under a reply."""
    if stats is None:
        return "stopped" if cancelled else ""
    if not isinstance(stats, dict):
        stats = stats.__dict__
    try:
        queued = float(stats.get("queued_ms") or 0)
        line = (
            f"ttft {duration(float(stats.get('ttft_ms', 0)))}"
            + (f" (queued {duration(queued)})" if queued >= QUEUE_SHOWN_MS else "")
            + f" · reused {int(stats.get('reused_tokens', 0))}"
            f" · prefilled {int(stats.get('prefilled_tokens', 0))} · {float(stats.get('decode_tps', 0)):.0f} tok/s"
            f" · cache {stats.get('cache', 'none')}"
        )
        if stats.get("opened_from") == "disk":
            line += f" (read from disk in {float(stats.get('open_ms') or 0):.0f} ms on opening the tab)"
    except (TypeError, ValueError):
        return ""
    return line + (" · stopped" if cancelled else "")


QUEUE_SHOWN_MS = 50.0  # shorter waits are the engine picking the message up, not a queue


def duration(ms: float) -> str:
    """840 -> '840 ms', 20345 -> '20.3 s'."""
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def lore_of(catalog, message) -> tuple[dict, ...]:
    """Lorebook entries stored with the user message a reply answers (app.engine.lore writes meta["lore"])."""
    if message is None or message.role != "assistant" or not message.parent_id:
        return ()
    parent = catalog.get_message(message.parent_id)
    return lore_entries(parent.meta.get("lore") if parent is not None else None)


def lore_entries(items) -> tuple[dict, ...]:
    """The entries of a stored lore list (meta may be hand-edited: anything else is no entries)."""
    return tuple(i for i in items if isinstance(i, dict)) if isinstance(items, list) else ()


def lore_mark(lore) -> str:
    """The quiet marker on a reply whose turn added lorebook entries (key l on the reply shows them)."""
    return f" · lore: {', '.join(str(i.get('name', '?')) for i in lore)} (l)" if lore else ""
