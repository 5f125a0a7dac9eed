"""The Parley app: persona tabs, streaming chat, visible cache state.

All model work happens on the engine thread (`app.engine.worker.Engine`); this
module only sends commands and turns engine events into Textual messages.
The app opens its own `Catalog`; the UI reads it only on Textual thread workers (app.ui.catalog_reads).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from textual.app import App
from textual.binding import Binding

from app import paths
from app.catalog import Catalog
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.worker import Engine
from app.errors import CatalogDamaged, ParleyError
from app.ui.keys import TabCharacterGuard
from app.ui.messages import message_for
from app.ui.palette import ParleyCommands
from app.ui.screens import ChatScreen, HelpScreen

log = logging.getLogger(__name__)

DARK, LIGHT = "textual-dark", "textual-light"


class ParleyApp(App):
    """`ParleyApp(model=..., personas_dirs=[...])`; tests may pass `sampling` to override every persona's."""

    CSS_PATH = "parley.tcss"
    TITLE = "Parley"
    COMMANDS = App.COMMANDS | {ParleyCommands}
    BINDINGS = [
        Binding("f1", "help", "Help", priority=True),
        Binding("question_mark", "help", "Help", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
    ]

    def __init__(self, model: str | None = None, scheme: str = "q4", budget_mb: float = 512.0,
                 personas_dirs=None, catalog_path=None, sampling: cmd.Sampling | None = None,
                 theme: str = DARK, start_engine: bool = True) -> None:
        super().__init__()
        self.model = model
        self.scheme = scheme
        self.budget_mb = budget_mb
        self.personas_dirs = [Path(d) for d in personas_dirs] if personas_dirs else None
        self.catalog_path = catalog_path
        self.sampling = sampling
        self.start_theme = theme
        self.start_engine = start_engine
        self.engine: Engine | None = None
        self.catalog: Catalog | None = None
        self.personas: dict = {}
        self.persona_problems: list[str] = []
        self.model_name = ""
        self.chat_screen: ChatScreen | None = None
        self.start_problem: str | None = None  # why the app could not start (shown on a ProblemScreen)
        self.events_seen: list[ev.Event] = []  # the last engine events, newest last (tests read them)
        self.events_posted = 0  # engine events handed to the screen so far
        self.prefill_tps = 0.0  # reading speed the last long-enough reply measured (estimates for long pastes)
        self.tab_character_guard = TabCharacterGuard()

    # -- start and stop ----------------------------------------------------------
    def on_mount(self) -> None:
        self.theme = self.start_theme
        try:
            self.catalog = Catalog(self.catalog_path, check=True)
        except ParleyError as exc:  # damaged, read-only, full disk: say so on screen and touch nothing
            from app.ui.problem import ProblemScreen

            self.start_problem = str(exc)
            self.push_screen(ProblemScreen("Parley cannot open its catalog", str(exc)))
            return
        self.reload_personas()
        for problem in self.persona_problems:
            self.notify(problem, title="Persona file", severity="warning", timeout=8)
        self.chat_screen = ChatScreen(int(self.budget_mb * 1024 * 1024))
        self.push_screen(self.chat_screen)
        if self.start_engine:
            self.engine = Engine(self._engine_event, model=self.model, scheme=self.scheme, budget_mb=self.budget_mb,
                                 personas_dirs=self.personas_dirs, catalog_path=self.catalog_path).start()

    def _engine_event(self, event: ev.Event) -> None:
        """Called on the engine thread: hand the event to the UI thread as a message (post_message is thread-safe)."""
        self.events_seen.append(event)
        del self.events_seen[:-500]
        screen = self.chat_screen
        if screen is not None:
            self.events_posted += 1  # the screen counts the ones it has handled (tests wait for the two to meet)
            screen.post_message(message_for(event))

    async def on_unmount(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await self.run_in_thread(engine.shutdown, 20.0)
        if self.catalog is not None:
            self.catalog.close()

    async def run_in_thread(self, fn, *args):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- what screens use ----------------------------------------------------------
    def submit(self, command: cmd.Command) -> None:
        if self.engine is not None:
            self.engine.submit(command)

    def persona_dirs(self) -> list[Path]:
        if self.personas_dirs is not None:
            return list(self.personas_dirs)
        from app.personas import default_dirs

        return default_dirs()

    def user_persona_dir(self) -> Path:
        return self.personas_dirs[-1] if self.personas_dirs else paths.user_personas_dir()

    def reload_personas(self) -> None:
        from app.personas import load_personas

        result = load_personas(self.personas_dirs)
        self.personas = result.personas
        self.persona_problems = result.problems
        if self.chat_screen is not None and self.chat_screen.is_mounted:
            self.chat_screen.refresh_personas()

    def disk_caches(self) -> list[dict]:
        """Conversation caches on disk, from the catalog's cache records. Runs on a worker thread (the screen's
        disk-caches read), so only what SQLite itself can refuse is turned into "no disk state this time": a
        locked moment or no cache table yet (OperationalError; `conversation_rows` says [] for those already),
        or the catalog closed under this thread as the app quits (ProgrammingError). Anything else is a bug and
        is raised."""
        from app.catalog.caches import CacheStore

        try:
            return CacheStore(self.catalog).conversation_rows()
        except (sqlite3.OperationalError, sqlite3.ProgrammingError):
            return []

    # -- app actions -----------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme != LIGHT else DARK

    async def action_quit(self) -> None:
        if self.chat_screen is not None:
            self.chat_screen.save_tabs()  # scroll positions as they are now
        await super().action_quit()

    def get_system_commands(self, screen):
        """Textual's own palette entries, less its theme picker: Parley lists one theme command (ctrl+t)."""
        for command in super().get_system_commands(screen):
            if command.title != "Theme":
                yield command


def run_app(args) -> int:
    """`parley` with no subcommand: run the app until the user quits."""
    try:
        Catalog().close()  # a catalog that cannot be opened is reported by the command line, before the screen changes
    except CatalogDamaged:
        pass  # except damage: the app shows it with the recovery steps, on screen
    app = ParleyApp(model=getattr(args, "model", None), scheme=getattr(args, "kv_scheme", "q4"),
                    budget_mb=getattr(args, "budget_mb", 512.0))
    app.run()
    return int(app.return_code or 0)
