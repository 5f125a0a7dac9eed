"""Shared helpers for the UI tests (no tests here): test personas, engine events seen (waiting: conftest.wait_for)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import wait_for  # noqa: F401  (the UI tests import it from here too)

PERSONAS = {
    "tester": 'id = "tester"\nname = "Tester"\ndescription = "Answers in a few tokens."\ncolor = "#e0a030"\n'
              'greetings = ["Hello, I am the tester."]\n\n[sampling]\ntemperature = 0.7\nmax_tokens = 8\n',
    "other": 'id = "other"\nname = "Other"\ndescription = "A second short persona."\ncolor = "#30a0e0"\n\n'
             '[sampling]\ntemperature = 0.7\nmax_tokens = 8\n',
    "long": 'id = "long"\nname = "Longwinded"\ndescription = "Talks until stopped."\ncolor = "#a040c0"\n\n'
            '[sampling]\ntemperature = 0.0\nmax_tokens = 1500\n',
}


def write_personas(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pid, text in PERSONAS.items():
        (directory / f"{pid}.toml").write_text(text, encoding="utf-8")
    return directory


def events_of(app, kind) -> list:
    return [e for e in list(app.events_seen) if isinstance(e, kind)]


def ui_caught_up(app) -> bool:
    """The screen has handled every engine event sent so far to the end, and shows the newest catalog reads (cache
    records, the tabs' transcripts, the list of the dialog on top)."""
    screen = app.chat_screen
    return (screen is not None and screen.events_handled >= app.events_posted and not screen.caches_pending
            and not screen.reads_pending and not getattr(app.screen, "reads_pending", False))


def palette_offers(app, title: str) -> bool:
    """The command palette is open, done searching, and its highlighted hit is `title` (so enter runs it)."""
    from textual.command import CommandList, CommandPalette
    from textual.worker import WorkerState

    screen = app.screen
    if not isinstance(screen, CommandPalette):
        return False
    searching = any(w.group == CommandPalette._GATHER_COMMANDS_GROUP and w.state in (WorkerState.PENDING,
                                                                                    WorkerState.RUNNING)
                    for w in app.workers)
    hits = screen.query_one(CommandList)
    if searching or hits.highlighted is None or not hits.option_count:
        return False
    return title.lower() in str(hits.get_option_at_index(hits.highlighted).prompt).lower()
