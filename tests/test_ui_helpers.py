"""Shared helpers for the UI tests (no tests here): test personas, waiting on engine events under Pilot."""

from __future__ import annotations

import time
from pathlib import Path

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


async def wait_until(pilot, condition, timeout: float = 15.0, what: str = "the condition") -> None:
    """Poll `condition()` between short pauses until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


def events_of(app, kind) -> list:
    return [e for e in list(app.events_seen) if isinstance(e, kind)]
