"""The main screen: the persona sidebar with cache states and the RAM gauge, and the chat and scene tabs."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ProgressBar, Static, TabbedContent, TabPane, TextArea
from textual.worker import get_current_worker

from app.catalog.caches import cache_states_by_persona, conversation_cache_state
from app.engine import commands as cmd
from app.engine import events as ev
from app.errors import ParleyError
from app.ui import messages as msg
from app.ui import tab_state
from app.ui.catalog_reads import (READ_ERRORS, conversation_of, conversations_by_id, latest_conversation_id,
                                   message_count, off_ui_thread)
from app.ui.keys import GoToTabScreen
from app.ui.screens.export_card import ExportCardScreen
from app.ui.screens.import_card import ImportCardScreen
from app.ui.screens.conversations import ConversationsScreen
from app.ui.screens.new_scene import NewSceneScreen
from app.ui.screens.persona_editor import PersonaEditorScreen
from app.ui.screens.scenes import ScenesScreen
from app.ui.widgets import ChatPane, PersonaList, RamGauge
from app.ui.widgets.conversation_tab import ConversationTab
from app.ui.widgets.scene_tab import SceneTab, scene_caches, scene_tab_id

TAB_PREFIX = "tab-"
NARROW_BELOW = 100  # columns: a narrower terminal gets the narrow persona list
# engine events that say which conversation the engine is writing in now, or that it has stopped
RUNNING_STARTS = (ev.PrefillProgressed, ev.TokensGenerated, ev.SceneRoundStarted, ev.SceneTokensGenerated)
RUNNING_ENDS = (ev.ReplyFinished, ev.SceneRoundFinished, ev.EngineFailed)
REPLY_ENDS = (ev.ReplyFinished, ev.SceneRoundFinished)  # a finished reply or round: announce it, refresh caches


class ChatScreen(Screen):
    """The main screen: persona sidebar with cache states and RAM gauge; persona tabs with the chat."""

    BINDINGS = [
        Binding("ctrl+pageup", "tab(-1)", "Prev tab", show=False, priority=True),
        Binding("ctrl+pagedown", "tab(1)", "Next tab", show=False, priority=True),
        Binding("f6", "tab(-1)", "Prev tab", show=False, priority=True),
        Binding("f7", "tab(1)", "Next tab", show=False, priority=True),
        Binding("ctrl+g", "go_to_tab", "Go to tab", show=False, priority=True),
        *[Binding(f"alt+{n}", f"show_tab({n})", f"Tab {n}", show=False, priority=True) for n in range(1, 10)],
        Binding("escape", "stop", "Stop / back"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+o", "conversations", "Conversations"),
        Binding("ctrl+l,alt+c", "copy_last", "Copy reply", show=False, priority=True),
        Binding("ctrl+w,alt+w", "close_tab", "Close tab", show=False, priority=True),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", show=False),
        Binding("ctrl+f", "filter_personas", "Find persona", show=False, priority=True),
        Binding("f2", "edit_persona", "Edit persona", show=False),
        Binding("f3", "new_persona", "New persona", show=False),
        Binding("f4", "import_card", "Import card", show=False),
        Binding("f5", "export_card", "Export card", show=False),
        Binding("f8", "new_scene", "New scene", show=False),
        Binding("f9", "scenes", "Scenes", show=False),
    ]

    def __init__(self, budget_bytes: int) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self.ram_states: dict[int, object] = {}
        self.ram_list: list = []  # every cache in RAM (a scene has one per member)
        self._last_open: int | None = None
        self._disk_rows: list[dict] = []
        self.running: int | None = None  # the conversation the engine is replying in now, if known
        self._restoring = False  # tabs are being reopened from the last run: do not save half of them
        self._tab_save_failed = False
        self.model_ready = False
        self.events_handled = 0  # engine events handled to the end (app.events_posted counts those sent)
        self._cache_reads_asked = 0  # reads of the disk cache records started, and the newest one shown
        self._cache_reads_shown = 0

    def compose(self) -> ComposeResult:
        yield Header(icon="❖")
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield PersonaList(id="personas")
                yield RamGauge(self.budget_bytes, id="ram")
            with Vertical(id="chat-area"):
                with Vertical(id="model-progress"):
                    yield Label("Preparing the model…", id="model-label")
                    yield ProgressBar(total=1, show_eta=False, id="model-bar")
                yield Static("Choose a persona on the left and press enter to start a chat, or F8 for a scene.\n"
                             "F1 lists the keys; ctrl+p finds any action.", id="empty-hint")
                yield TabbedContent(id="tabs")
        yield Footer()

    def on_resize(self) -> None:
        """Below 100 columns the persona list would take a third of the width and cut the tab names: it narrows."""
        self.set_class(self.size.width < NARROW_BELOW, "-narrow")

    async def on_mount(self) -> None:
        self.refresh_personas()
        self.set_focus(self.query_one("#persona-filter"))
        self._update_empty()
        await self.restore_tabs()

    # -- tabs that survive a restart (app.ui.tab_state) -----------------------------
    def tab_state(self) -> tab_state.TabState:
        records = []
        for pane_id in self.pane_ids():
            pane = self.tabs.get_pane(pane_id)
            if pane is None or not pane.is_attached or pane._closing or pane._pruning:
                continue
            view = next(iter(pane.query(ChatPane)), None) or next(iter(pane.query(SceneTab)), None)
            if isinstance(view, ChatPane):
                records.append(tab_state.TabRecord("chat", view.conversation_id, view.persona.id, view.scroll_record()))
            elif isinstance(view, SceneTab):
                records.append(tab_state.TabRecord("scene", view.conversation_id, None, view.scroll_record()))
        ids = self.pane_ids()
        return tab_state.TabState(records, ids.index(self.tabs.active) if self.tabs.active in ids else 0)

    def save_tabs(self) -> None:
        if self._restoring or not self.is_mounted:
            return
        try:
            tab_state.save(self.tab_state())
        except (OSError, ParleyError) as exc:  # the tabs are a convenience: say so once, keep going
            if not self._tab_save_failed:
                self._tab_save_failed = True
                self.app.notify(f"Open tabs could not be saved ({exc}); they will not come back after a restart.",
                                severity="warning", timeout=6)

    async def restore_tabs(self) -> None:
        state = tab_state.load()
        if not state.tabs:
            return
        self._restoring = True
        try:
            found = await off_ui_thread(self, conversations_by_id, [r.conversation_id for r in state.tabs])
            for record in state.tabs:
                conv = found.get(record.conversation_id)
                if conv is None:
                    continue
                if record.kind == "chat" and conv.kind == "chat" and conv.persona_id in self.app.personas:
                    view = await self.open_persona(conv.persona_id, conversation_id=conv.id, activate=False)
                elif record.kind == "scene" and conv.kind == "scene":
                    view = await self.open_scene(conv.id, activate=False)
                else:
                    continue
                if view is not None and record.scroll_y is not None:
                    view.restore_scroll = record.scroll_y
            ids = self.pane_ids()
            if ids:
                self.tabs.active = ids[min(max(state.active, 0), len(ids) - 1)]
                self._tab_shown()
                self.set_focus(self.active_view().composer)
        finally:
            self._restoring = False

    # -- helpers ---------------------------------------------------------------
    @property
    def tabs(self) -> TabbedContent:
        return self.query_one("#tabs", TabbedContent)

    def panes(self) -> list[ChatPane]:
        return list(self.query(ChatPane))

    def pane_ids(self) -> list[str]:
        return [pane.id for pane in self.tabs.query(TabPane) if pane.id]

    def active_pane(self) -> ChatPane | None:
        active = self.tabs.active
        if not active:
            return None
        try:
            return self.tabs.get_pane(active).query_one(ChatPane)
        except NoMatches:  # a scene's tab, or one being closed
            return None

    def scenes(self) -> list[SceneTab]:
        return list(self.query(SceneTab))

    def scene_for_conversation(self, conversation_id: int | None) -> SceneTab | None:
        return next((t for t in self.scenes() if t.conversation_id == conversation_id), None)

    def active_scene(self) -> SceneTab | None:
        active = self.tabs.active
        if not active:
            return None
        try:
            return self.tabs.get_pane(active).query_one(SceneTab)
        except NoMatches:  # a chat's tab, or one being closed
            return None

    def active_view(self) -> ChatPane | SceneTab | None:
        """The tab on screen, a chat or a scene (both have a `composer`)."""
        return self.active_pane() or self.active_scene()

    def pane_for_conversation(self, conversation_id: int | None) -> ChatPane | None:
        return next((p for p in self.panes() if p.conversation_id == conversation_id), None)

    def view_for_conversation(self, conversation_id: int | None) -> ConversationTab | None:
        """The tab (chat or scene) showing this conversation, if one is open."""
        return self.pane_for_conversation(conversation_id) or self.scene_for_conversation(conversation_id)

    def running_name(self, scene_prefix: str = "", fallback: str = "another conversation") -> str:
        """Whom the engine is writing for now, in words (a persona's name, a scene's title)."""
        other = self.pane_for_conversation(self.running)
        scene = self.scene_for_conversation(self.running)
        return other.persona.name if other else f"{scene_prefix}{scene.scene_title}" if scene else fallback

    def pane_for_persona(self, persona_id: str) -> ChatPane | None:
        return next((p for p in self.panes() if p.persona.id == persona_id), None)

    def set_running(self, conversation_id: int | None) -> None:
        """The conversation the engine is writing in now; the tabs waiting behind it say whom they wait for."""
        if conversation_id != self.running:
            self.running = conversation_id
            for view in self.panes() + self.scenes():
                if view.generating:
                    view.refresh_chrome()

    def _update_empty(self) -> None:
        self.set_class(not self.pane_ids(), "-empty")

    def refresh_personas(self) -> None:
        self.query_one(PersonaList).set_personas(self.app.personas)
        self.refresh_caches()

    def refresh_caches(self) -> None:
        """Show the cache states again once the catalog's disk records are read (on a worker thread, see below)."""
        self._cache_reads_asked += 1
        self._read_disk_caches(self._cache_reads_asked)

    @property
    def reads_pending(self) -> bool:
        """A catalog read for a tab (its transcript) is under way: a tab may be one read behind the catalog."""
        return any(view.transcript_pending for view in self.query(ConversationTab))

    @property
    def caches_pending(self) -> bool:
        """A read of the disk records is under way: the cache states shown may be one read behind."""
        return self._cache_reads_shown < self._cache_reads_asked

    @work(thread=True, exclusive=True, group="disk-caches")
    def _read_disk_caches(self, number: int) -> None:
        """The catalog read happens here, never on the UI thread (a busy catalog must not stall typing); only the
        newest read is shown. A thread worker may read SQLite; it never touches MLX (that is the engine's thread)."""
        rows = self.app.disk_caches()
        if not get_current_worker().is_cancelled:
            self.post_message(msg.DiskCachesRead(rows, number))

    def on_disk_caches_read(self, message: msg.DiskCachesRead) -> None:
        self._cache_reads_shown = max(self._cache_reads_shown, message.number)
        self._disk_rows = message.rows
        self.show_caches()

    def show_caches(self) -> None:
        """Cache state per persona and per open chat, by the catalog's one rule (app.catalog.caches): RAM (from
        the engine's last report) beats disk (from the catalog) beats none."""
        personas = cache_states_by_persona(self._disk_rows, self.ram_list or self.ram_states.values())
        self.query_one(PersonaList).set_caches(personas)
        for pane in self.panes():
            state = conversation_cache_state(pane.conversation_id, self._disk_rows, self.ram_states.values())
            pane.set_live_cache(None if state.where == "none" else state)
        for scene in self.scenes():
            scene.set_caches(scene_caches(scene.members, self.ram_list, self._disk_rows, scene.conversation_id))

    # -- tabs ------------------------------------------------------------------
    async def open_persona(self, persona_id: str, conversation_id: int | None = None, new: bool = False,
                           activate: bool = True) -> ChatPane | None:
        persona = self.app.personas.get(persona_id)
        if persona is None:
            self.app.notify(f"Persona {persona_id!r} is not loaded.", severity="error")
            return None
        catalog = self.app.catalog
        if new:
            conversation_id = catalog.create_conversation(persona_id)  # a write: one quick transaction
        pane = self.pane_for_persona(persona_id)
        if pane is None:
            if conversation_id is None:
                latest = await off_ui_thread(self, latest_conversation_id, persona_id)
                conversation_id = latest if latest is not None else catalog.create_conversation(persona_id)
            pane = ChatPane(persona, conversation_id)
            await self.tabs.add_pane(TabPane(persona.name, pane, id=f"{TAB_PREFIX}{persona_id}"))
        elif conversation_id is not None:
            await pane.switch_conversation(conversation_id)
        self._update_empty()
        tab_id = f"{TAB_PREFIX}{persona_id}"
        if not activate:
            return pane
        if self.tabs.active != tab_id:
            self.tabs.active = tab_id
        else:
            self._tab_shown()
        self.set_focus(pane.composer)
        return pane

    def _tab_shown(self) -> None:
        view = self.active_view()
        if view is not None:
            view.show_in_view()
        self.save_tabs()
        pane = self.active_pane()
        if pane is None:
            scene = self.active_scene()
            if scene is not None:
                self.sub_title = scene.scene_title
            return
        self.request_open(pane.conversation_id)
        ids = self.pane_ids()
        if pane.parent and pane.parent.id in ids:
            i = ids.index(pane.parent.id)
            for j in (i + 1, i - 1):
                if 0 <= j < len(ids) and j != i:
                    for neighbour in self.tabs.get_pane(ids[j]).query(ChatPane):  # scenes: none to prefetch
                        self.app.submit(cmd.Prefetch(neighbour.conversation_id))
        self.sub_title = f"{pane.persona.name}"

    def request_open(self, conversation_id: int) -> None:
        """Tell the engine which conversation is on screen (once per change: a repeat would report "ram")."""
        if conversation_id != self._last_open:
            self._last_open = conversation_id
            self.app.submit(cmd.Open(conversation_id))

    @on(TabbedContent.TabActivated, "#tabs")
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._tab_shown()
        pane = self.active_view()
        if pane is not None and not isinstance(self.app.focused, (TextArea,)):
            self.set_focus(pane.composer)

    def action_tab(self, step: int) -> None:
        ids = self.pane_ids()
        if not ids:
            return
        i = ids.index(self.tabs.active) if self.tabs.active in ids else 0
        self.tabs.active = ids[(i + step) % len(ids)]
        self.set_focus(self.active_view().composer)

    def action_show_tab(self, number: int) -> None:
        ids = self.pane_ids()
        if 1 <= number <= len(ids):
            self.tabs.active = ids[number - 1]
            self.set_focus(self.active_view().composer)
        elif ids:
            self.app.notify(f"There is no tab {number}: {len(ids)} open.", timeout=2)

    def action_go_to_tab(self) -> None:
        names = [str(self.tabs.get_tab(pid).label) for pid in self.pane_ids()]

        def chosen(number: int | None) -> None:
            if number:
                self.action_show_tab(number)

        self.app.push_screen(GoToTabScreen(names), chosen)

    def on_tab_character(self, message: msg.TabCharacter) -> None:
        self.action_show_tab(message.number)

    async def action_close_tab(self) -> None:
        pane = self.active_view()
        if pane is None:
            return
        if pane.generating:
            pane.stop()
        await self.tabs.remove_pane(self.tabs.active)
        self._update_empty()
        if self.active_view() is not None:
            self._tab_shown()
            self.set_focus(self.active_view().composer)
        else:
            self.set_focus(self.query_one("#persona-filter"))
        self.save_tabs()

    # -- sidebar -----------------------------------------------------------------
    async def on_persona_chosen(self, message: msg.PersonaChosen) -> None:
        await self.open_persona(message.persona_id)

    def on_persona_highlighted(self, message: msg.PersonaHighlighted) -> None:
        self._find_latest_conversation(message.persona_id)

    @work(thread=True, group="latest-conversation")
    def _find_latest_conversation(self, persona_id: str) -> None:
        """On a worker thread: the persona's latest chat, whose cache the engine then reads ahead (a prefetch)."""
        try:
            latest = latest_conversation_id(self.app.catalog, persona_id)
        except READ_ERRORS:  # a prefetch is only a head start: a catalog busy past its timeout skips it
            return
        self.post_message(msg.LatestConversationFound(persona_id, latest))

    def on_latest_conversation_found(self, message: msg.LatestConversationFound) -> None:
        if message.conversation_id is not None:
            self.app.submit(cmd.Prefetch(message.conversation_id))

    def action_filter_personas(self) -> None:
        self.query_one("#sidebar").display = True
        self.set_focus(self.query_one("#persona-filter", Input))

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display
        if not sidebar.display and self.focused is not None and sidebar in self.focused.ancestors:
            pane = self.active_pane()
            if pane is not None:
                self.set_focus(pane.composer)

    # -- chat actions --------------------------------------------------------------
    async def on_composer_submitted(self, message: msg.ComposerSubmitted) -> None:
        pane = self.active_view()
        if pane is not None and await pane.send(message.text):
            pane.composer.text = ""

    def on_alternative_requested(self, message: msg.AlternativeRequested) -> None:
        pane = self.active_pane()
        if pane is not None:
            pane.browse(message.message_id, message.step)

    def on_edit_requested(self, message: msg.EditRequested) -> None:
        pane = self.active_pane()
        if pane is not None:
            pane.begin_edit(message.message_id, message.text)

    def on_copy_requested(self, message: msg.CopyRequested) -> None:
        self.app.copy_to_clipboard(message.text)
        self.app.notify("Copied the message.", timeout=2)

    def action_stop(self) -> None:
        pane = self.active_view()
        if pane is None:
            return
        if pane.generating and self.running is not None and self.running != pane.conversation_id:
            who = self.running_name()
            self.app.notify(f"This reply waits for {who} to finish; stop that one first.", severity="warning")
            return
        if pane.stop():
            return
        if isinstance(pane, ChatPane) and pane.cancel_edit():
            return
        self.set_focus(pane.composer)

    async def action_regenerate(self) -> None:
        pane = self.active_pane()
        if pane is None and self.active_scene() is not None:
            self.app.notify("In a scene, enter on an empty box lets the personas go on.", severity="warning")
            return
        if pane is None:
            self.app.notify("Open a persona first.", severity="warning")
            return
        await pane.regenerate()

    def action_copy_last(self) -> None:
        pane = self.active_view()
        reply = pane.last_reply() if pane else None
        if reply is None:
            self.app.notify("There is no reply to copy yet.", severity="warning")
            return
        self.on_copy_requested(msg.CopyRequested(reply.text))

    def action_edit_last(self) -> None:
        if self.active_scene() is not None:
            self.app.notify("Scene lines cannot be edited; send a new message instead.", severity="warning")
            return
        pane = self.active_pane()
        target = (pane.focused_message() or pane.last_user()) if pane else None
        if target is None or target.role != "user":
            target = pane.last_user() if pane else None
        if target is None:
            self.app.notify("There is no message of yours to edit yet.", severity="warning")
            return
        pane.begin_edit(target.message_id, target.text)

    async def action_new_conversation(self) -> None:
        if self.active_scene() is not None:
            await self.action_new_scene()
            return
        pane = self.active_pane()
        persona_id = pane.persona.id if pane else self.query_one(PersonaList).highlighted_id
        if persona_id is None:
            self.app.notify("Choose a persona first.", severity="warning")
            return
        if pane is not None and pane.generating:
            self.app.notify("Wait for the reply (or press escape) first.", severity="warning")
            return
        if pane is not None and not await off_ui_thread(self, message_count, pane.conversation_id):
            self.app.notify("This conversation is new already: type a message.", timeout=2)
            self.set_focus(pane.composer)
            return
        await self.open_persona(persona_id, new=True)
        self.app.notify(f"New conversation with {self.app.personas[persona_id].name}.", timeout=2)

    def action_conversations(self) -> None:
        pane = self.active_pane()
        persona_id = pane.persona.id if pane else None

        async def chosen(result) -> None:
            if result is None:
                return
            conv = await off_ui_thread(self, conversation_of, result)
            if conv is not None and conv.persona_id in self.app.personas:
                await self.open_persona(conv.persona_id, conversation_id=conv.id)

        self.app.push_screen(ConversationsScreen(persona_id), chosen)

    async def conversation_deleted(self, conversation_id: int) -> None:
        pane = self.pane_for_conversation(conversation_id)
        if pane is not None:
            latest = await off_ui_thread(self, latest_conversation_id, pane.persona.id)
            target = latest if latest is not None else self.app.catalog.create_conversation(pane.persona.id)
            await pane.switch_conversation(target)
        self.refresh_caches()

    # -- scenes ----------------------------------------------------------------------
    async def open_scene(self, conversation_id: int, activate: bool = True) -> SceneTab | None:
        conv = await off_ui_thread(self, conversation_of, conversation_id)
        if conv is None or conv.kind != "scene":
            self.app.notify(f"Scene {conversation_id} does not exist (deleted?).", severity="error")
            return None
        tab = self.scene_for_conversation(conversation_id)
        tab_id = scene_tab_id(conversation_id)
        if tab is None:
            tab = SceneTab(conv)
            await self.tabs.add_pane(TabPane(f"⁂ {tab.scene_title}", tab, id=tab_id))
        self._update_empty()
        if not activate:
            return tab
        if self.tabs.active != tab_id:
            self.tabs.active = tab_id
        else:
            self._tab_shown()
        self.refresh_caches()
        self.set_focus(tab.composer)
        return tab

    async def close_scene(self, conversation_id: int) -> None:
        tab = self.scene_for_conversation(conversation_id)
        if tab is not None:
            await self.tabs.remove_pane(scene_tab_id(conversation_id))
            self._update_empty()
            if self.active_view() is not None:
                self._tab_shown()
            self.save_tabs()

    async def action_new_scene(self) -> None:
        async def created(conversation_id) -> None:
            if conversation_id is not None:
                await self.open_scene(conversation_id)

        self.app.push_screen(NewSceneScreen(), created)

    def action_scenes(self) -> None:
        async def chosen(result) -> None:
            if result == "new":
                await self.action_new_scene()
            elif result is not None:
                await self.open_scene(result)

        self.app.push_screen(ScenesScreen(), chosen)

    def action_toggle_speaker(self, persona_id: str) -> None:
        scene = self.active_scene()
        if scene is not None:
            scene.toggle_speaker(persona_id)

    # -- personas ------------------------------------------------------------------
    def _current_persona(self):
        pane = self.active_pane()
        if pane is not None:
            return self.app.personas.get(pane.persona.id, pane.persona)
        pid = self.query_one(PersonaList).highlighted_id
        return self.app.personas.get(pid) if pid else None

    async def action_notes(self) -> None:
        from app.ui.notes import open_notes, open_scene_notes

        pane = self.active_pane()
        scene = self.active_scene() if pane is None else None
        if scene is not None:
            open_scene_notes(self.app, scene)  # a scene keeps notes per seat: pick whose first
            return
        if pane is None:
            self.app.notify("Open a chat or a scene to see its notes.", severity="warning")
            return
        await open_notes(self, pane.conversation_id, pane.persona.name)

    def action_edit_persona(self) -> None:
        persona = self._current_persona()
        if persona is None:
            self.app.notify("Choose a persona to edit.", severity="warning")
            return
        self.app.push_screen(PersonaEditorScreen(persona), self._persona_saved)

    def action_new_persona(self) -> None:
        self.app.push_screen(PersonaEditorScreen(None), self._persona_saved)

    async def _persona_saved(self, persona) -> None:
        if persona is None:
            return
        self.app.reload_personas()
        for pane in self.panes():
            if pane.persona.id == persona.id:
                pane.persona = self.app.personas.get(persona.id, persona)
                await pane.refresh_greeting()
                try:
                    self.tabs.get_tab(f"{TAB_PREFIX}{persona.id}").label = pane.persona.name
                except NoMatches:  # the tab closed meanwhile: no label to change
                    pass
        for scene in self.scenes():
            if persona.id in scene.members:
                scene.persona_changed()
        self.app.notify(f"Saved persona {persona.name} ({persona.id}).", timeout=3)
        if persona.id in self.app.personas:
            await self.open_persona(persona.id)

    def action_import_card(self) -> None:
        self.app.push_screen(ImportCardScreen(), self._persona_saved)

    def action_export_card(self) -> None:
        persona = self._current_persona()
        if persona is None:
            self.app.notify("Choose a persona to export.", severity="warning")
            return
        self.app.push_screen(ExportCardScreen(persona))

    # -- engine events ---------------------------------------------------------------
    async def on_engine_reported(self, message: msg.EngineReported) -> None:
        """Every engine event: who is writing now, the screen's own part (`SCREEN_HANDLERS`), then the tab of
        its conversation (`ConversationTab.route`); a finished reply in a hidden tab is announced."""
        try:
            await self._handle_engine_event(message.event, message.conversation_id)
        finally:
            self.events_handled += 1

    async def _handle_engine_event(self, event: ev.Event, conversation_id: int | None) -> None:
        if isinstance(event, RUNNING_STARTS):
            self.set_running(conversation_id)
        elif isinstance(event, RUNNING_ENDS) and self.running == conversation_id:
            self.set_running(None)
        own = self.SCREEN_HANDLERS.get(type(event))
        if own is not None:
            own(self, event)
        view = self.view_for_conversation(conversation_id)
        handled = view is not None and await view.route(event)
        if isinstance(event, REPLY_ENDS):
            if handled and view is not self.active_view() and not event.cancelled:
                self.app.notify(view.replied_note(), timeout=3)
            self.refresh_caches()

    def _model_load_progressed(self, event: ev.ModelLoadProgressed) -> None:
        self.add_class("-loading")
        self.query_one("#model-label", Label).update(f"Preparing the model: {event.label}")
        self.query_one("#model-bar", ProgressBar).update(total=max(1, event.total), progress=event.done)

    def _model_loaded(self, event: ev.ModelLoaded) -> None:
        self.model_ready = True
        self.remove_class("-loading", "-failed")
        self.app.model_name = event.name
        self.title = f"Parley · {event.name}"

    def _reply_finished(self, event: ev.ReplyFinished) -> None:
        stats = event.stats
        reading_ms = stats.ttft_ms - getattr(stats, "queued_ms", 0.0)
        if stats.prefilled_tokens >= 16 and reading_ms > 0:  # the reading speed a long paste is estimated with
            self.app.prefill_tps = stats.prefilled_tokens / reading_ms * 1000

    def _context_trimmed(self, event: ev.ContextTrimmed) -> None:
        self.app.notify(f"The conversation outgrew the model's context: its {event.dropped_messages} oldest "
                        "messages are no longer seen by the model (the transcript keeps them).", timeout=6)

    def _cache_states_changed(self, event: ev.CacheStatesChanged) -> None:
        self.ram_states = {s.conversation_id: s for s in event.states}
        self.ram_list = list(event.states)
        self.query_one(RamGauge).update_usage(event.ram_bytes, event.budget_bytes)
        self.refresh_caches()

    def _cache_discarded(self, event: ev.CacheDiscarded) -> None:
        self.app.notify(f"A stored cache was dropped ({event.reason}); it is rebuilt from the transcript.",
                        title="Cache discarded", severity="warning", timeout=6)

    def _cache_not_saved(self, event: ev.CacheNotSaved) -> None:
        self.app.notify(f"The reply is saved; its cache could not be ({event.reason}). The next reply "
                        "rebuilds it from the transcript.", title="Cache not saved", severity="warning", timeout=8)

    def _engine_failed(self, event: ev.EngineFailed) -> None:
        title = "Reply not saved" if event.unsaved_reply is not None else "Engine"
        self.app.notify(event.message, title=title, severity="error", timeout=10)
        if not self.model_ready and event.conversation_id is None:
            # the model could not start: say so where the progress bar would be, for good
            self.add_class("-loading", "-failed")
            self.query_one("#model-label", Label).update(Text(event.message, style="bold red"))

    SCREEN_HANDLERS = {
        ev.ModelLoadProgressed: _model_load_progressed,
        ev.ModelLoaded: _model_loaded,
        ev.ReplyFinished: _reply_finished,
        ev.ContextTrimmed: _context_trimmed,
        ev.CacheStatesChanged: _cache_states_changed,
        ev.CacheDiscarded: _cache_discarded,
        ev.CacheNotSaved: _cache_not_saved,
        ev.EngineFailed: _engine_failed,
    }
