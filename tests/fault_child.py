"""Child processes for tests/test_faults.py: real `parley` runs on a real small (tmpfs) disk.

    python -m tests.fault_child scenario NAME OUT_JSON MODEL_DIR
        run inside `unshare -rm` (a private mount namespace, no root needed): mounts a small tmpfs on
        $PARLEY_HOME, runs one fault scenario as separate `parley` processes, then `parley cache verify`
        and SQLite's integrity_check, and writes what happened to OUT_JSON.

    python -m tests.fault_child fill-on ROLE TOKENS_FILE -- PARLEY_ARGS...
        `parley PARLEY_ARGS...` in this process, whose engine fills the disk the moment a message of
        ROLE ("user": during the reply; "assistant": before the cache is saved) reaches the catalog;
        the streamed reply text goes to TOKENS_FILE, so the parent can check it was printed.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISK_BYTES = 24 * 1024 * 1024


def fill_disk(home: Path) -> None:
    """Write a filler file until the disk refuses even one more byte."""
    with open(home / "filler", "ab", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    fh.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break


def free_disk(home: Path) -> None:
    (home / "filler").unlink(missing_ok=True)


# -- fill-on: one parley run whose disk fills mid-turn --------------------------------------------------------------

def fill_on(role: str, tokens_file: str, argv: list[str]) -> int:
    from app import fastblas

    fastblas.preload()
    import app.cli.chat as chat
    from app.cli import main
    from app.engine import events as ev

    home = Path(os.environ["PARLEY_HOME"])
    real_start = chat.start_engine
    streamed: list[str] = []

    def start_engine(args, on_event):
        def hooked(event):
            on_event(event)
            if isinstance(event, ev.TokensGenerated):
                streamed.append(event.text)
            if isinstance(event, ev.MessageSaved) and event.role == role:
                fill_disk(home)  # on the engine thread: before the next write of the turn

        return real_start(args, hooked)

    chat.start_engine = start_engine
    try:
        return main(argv)
    finally:
        Path(tokens_file).write_text("".join(streamed))


# -- scenarios (inside the mount namespace) --------------------------------------------------------------------------

class Runner:
    def __init__(self, model: str, out_dir: Path):
        self.model = model
        self.out_dir = out_dir
        self.home = Path(os.environ["PARLEY_HOME"])
        self.results: dict[str, dict] = {}

    def parley(self, name: str, *args: str, fill_on_role: str | None = None) -> dict:
        tokens = self.out_dir / f"{name}.tokens"
        if fill_on_role:
            cmd = [sys.executable, "-m", "tests.fault_child", "fill-on", fill_on_role, str(tokens), "--"]
        else:
            cmd = [sys.executable, "-m", "app"]
        if args[0] == "chat":
            args = (*args, "--temperature", "1.5", "--seed", "7")  # varied text, so "it was printed" means something
        proc = subprocess.run([*cmd, "--model", self.model, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        result = {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr,
                  "streamed": tokens.read_text() if tokens.exists() else None}
        self.results[name] = result
        return result

    def after(self) -> None:
        """Disk freed, mounts back to writable: the cache verifies clean and SQLite finds no damage."""
        free_disk(self.home)
        subprocess.run(["umount", str(self.home / "caches")], capture_output=True)
        subprocess.run(["umount", str(self.home / "catalog.db")], capture_output=True)
        self.parley("verify", "cache", "verify")
        self.parley("verify_again", "cache", "verify")
        with sqlite3.connect(self.home / "catalog.db") as conn:
            self.results["integrity"] = {"rows": [r[0] for r in conn.execute("PRAGMA integrity_check")]}
            self.results["messages"] = {"rows": [list(r) for r in conn.execute(
                "SELECT id, parent_id, role, content FROM messages ORDER BY id")]}
        self.parley("chat_after", "chat", "tester", "and now?")
        with sqlite3.connect(self.home / "catalog.db") as conn:
            self.results["final"] = {"rows": [list(r) for r in conn.execute(
                "SELECT id, parent_id, role, content FROM messages ORDER BY id")]}


def read_only(path: Path) -> None:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)


def scenario(name: str, r: Runner) -> None:
    home = r.home
    if name == "cache_full":  # the reply is saved, then the disk is full for its cache
        r.parley("chat", "chat", "tester", "hello there", fill_on_role="assistant")
    elif name == "caches_read_only":
        r.parley("first", "chat", "tester", "hello there")
        read_only(home / "caches")
        r.parley("chat", "chat", "tester", "again please")
    elif name == "full_during_reply":  # the user's message is saved, then the disk fills while the reply streams
        r.parley("first", "chat", "tester", "hello there")
        r.parley("chat", "chat", "tester", "tell me more", fill_on_role="user")
    elif name == "full_at_start":
        r.parley("first", "chat", "tester", "hello there")
        fill_disk(home)
        r.parley("chat", "chat", "tester", "are you there?")
        r.parley("personas", "personas")
    elif name == "catalog_read_only":
        r.parley("first", "chat", "tester", "hello there")
        read_only(home / "catalog.db")
        r.parley("chat", "chat", "tester", "are you there?")
    elif name == "app_full_during_reply":
        app_full_during_reply(r)
        return
    else:
        raise SystemExit(f"unknown scenario {name}")
    r.after()


def app_full_during_reply(r: Runner) -> None:
    """The app (driven by Pilot) streams a reply; after its third piece the disk is full."""
    import asyncio

    asyncio.run(_app_full_during_reply(r))
    r.after()


async def _app_full_during_reply(r: Runner) -> None:
    from app.engine import events as ev
    from app.ui.app import ParleyApp
    from tests.test_ui_helpers import events_of, ui_caught_up, wait_for

    from app.engine.commands import Sampling

    app = ParleyApp(model=r.model, personas_dirs=[r.home / "personas"],
                    sampling=Sampling(temperature=1.5, top_p=1.0, max_tokens=12, seed=7))  # varied text
    sink = app._engine_event
    pieces: list[str] = []

    def hooked(event):
        sink(event)
        if isinstance(event, ev.TokensGenerated):
            pieces.append(event.text)
            if len(pieces) == 3:
                fill_disk(r.home)  # on the engine thread, between two tokens of the reply

    app._engine_event = hooked
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.chat_screen is not None and app.chat_screen.model_ready, timeout=60,
                       what="the model")
        await pilot.press("ctrl+f")
        app.chat_screen.query_one("#persona-filter").value = "tester"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is not None, what="the chat tab")
        pane = app.chat_screen.active_pane()
        pane.composer.focus()
        pane.composer.text = "tell me a story"
        await pilot.press("enter")
        await wait_for(pilot, lambda: events_of(app, ev.EngineFailed) and not pane.generating, timeout=60,
                       what="the failed save")
        await wait_for(pilot, lambda: ui_caught_up(app), what="the screen to show the failure")
        r.results["app"] = {
            "streamed": "".join(pieces),
            "notifications": [{"title": n.title, "message": n.message, "severity": n.severity}
                              for n in app._notifications],
            "views": [{"role": v.role, "text": v.text, "stats": v.stats, "saved": v.message_id is not None,
                       "unsaved": v.has_class("unsaved")} for v in pane.message_views()],
        }
        free_disk(r.home)  # space again: the next message is answered and saved
        pane.composer.text = "and now?"
        await pilot.press("enter")
        await wait_for(pilot, lambda: any(isinstance(e, ev.ReplyFinished) for e in app.events_seen[-20:])
                       and not pane.generating and ui_caught_up(app), timeout=60, what="the next reply")
        r.results["app"]["after"] = [{"role": v.role, "text": v.text, "saved": v.message_id is not None}
                                     for v in pane.message_views()]


def run_scenario(name: str, out_json: str, model: str) -> int:
    home = Path(os.environ["PARLEY_HOME"])
    personas = home.parent / "personas-seed"
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(home)], check=True)
    (home / "personas").mkdir(mode=0o700)
    for f in personas.glob("*.toml"):
        (home / "personas" / f.name).write_bytes(f.read_bytes())
    r = Runner(model, Path(out_json).parent)
    try:
        scenario(name, r)
    finally:
        Path(out_json).write_text(json.dumps(r.results))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "fill-on":
        sep = sys.argv.index("--")
        sys.exit(fill_on(sys.argv[2], sys.argv[3], sys.argv[sep + 1:]))
    if sys.argv[1] == "scenario":
        sys.exit(run_scenario(sys.argv[2], sys.argv[3], sys.argv[4]))
    raise SystemExit(__doc__)
