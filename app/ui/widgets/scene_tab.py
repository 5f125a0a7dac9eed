"""A scene's tab: several personas share one room (the dialogs to create and list scenes are in app.ui.screens).

A scene is a catalog conversation of kind "scene" with members (app.engine.scene). Its tab shows the
transcript (each persona's lines in its accent colour, the user's as "You"), one tick per member for
who replies this round, and the message box. A round streams every speaker's reply at once into its own
bubble; `@name` at the start of a message picks the speakers of that round only. Enter on an empty box
lets the personas go on without the user. The screen routes the scene's events here (`ENGINE_HANDLERS`).
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Checkbox, Label, Static

from app.catalog.caches import conversation_cache_state
from app.engine import commands as cmd
from app.engine import events as ev
from app.errors import ParleyError
from app.ui.catalog_reads import MessageDetails
from app.ui.handles import handle_hint, take_handles
from app.ui.widgets.conversation_tab import ConversationTab
from app.ui.widgets.message_view import MessageView
from app.ui.widgets.text import lore_entries, lore_mark, stats_line

SCENE_TAB_PREFIX = "scene-"
DEFAULT_COLOR = "#8a8a8a"


def scene_tab_id(conversation_id: int) -> str:
    return f"{SCENE_TAB_PREFIX}{conversation_id}"


def round_line(speakers: int, batch_tps: float, cancelled: bool = False) -> str:
    """The figures of a whole round: how many spoke together and their tokens/s as one batch."""
    line = f"round · {speakers} speaker{'s' if speakers != 1 else ''} · batch {batch_tps:.0f} tok/s"
    return line + (" · stopped" if cancelled else "")


def scene_lore_of(catalog, message) -> tuple[dict, ...]:
    """Lorebook entries that entered this speaker's view with the round of this reply.

    app.engine.lore keeps them on the round's newest message (meta["lore_by"][speaker]); every reply of that
    round carries that message's id as meta["round"] (app.engine.scene), so a reopened scene finds them again.
    """
    if message is None or message.role != "assistant" or not message.persona_id:
        return ()
    anchor_id = message.meta.get("round")
    anchor = catalog.get_message(anchor_id) if isinstance(anchor_id, int) and anchor_id else None
    if anchor is None or anchor.conversation_id != message.conversation_id:
        return ()
    by = anchor.meta.get("lore_by")
    return lore_entries(by.get(message.persona_id)) if isinstance(by, dict) else ()


class SceneLine(MessageView):
    """One line of a scene: the user's ("You") or one persona's, in its colour. No alternatives, no edits."""

    def __init__(self, role: str, text: str, message_id: int | None = None, *, persona_id: str | None = None,
                 **kwargs) -> None:
        super().__init__(role, text, message_id, **kwargs)
        self.persona_id = persona_id

    def action_alternative(self, step: int) -> None:
        pass

    def action_edit(self) -> None:
        self.app.notify("Scene lines cannot be edited; send a new message instead.", severity="warning")


class SceneTab(ConversationTab):
    """One scene's tab: header, transcript, who replies (ticks), prefill progress, the message box."""

    def __init__(self, conversation, **kwargs) -> None:
        super().__init__(classes="chat-pane scene-pane", **kwargs)
        self.conversation_id = conversation.id
        self.scene_title = conversation.title or "Scene"
        self.members: list[str] = list(conversation.members)
        self.generating = False
        self.live: dict[str, SceneLine] = {}  # the replies streaming now, by persona
        self.last_round = ""  # the last round's figures line
        self.last_sent = ""  # given back to the message box when the engine refuses the round
        self.last_said = ""  # the same without its @names: what the transcript would show
        self.caches: dict[str, str] = {}  # persona -> "ram" | "disk" | "none"

    # who is who ---------------------------------------------------------------
    def name_of(self, persona_id: str) -> str:
        persona = self.app.personas.get(persona_id)
        return persona.name if persona else persona_id

    def color_of(self, persona_id: str) -> str:
        persona = self.app.personas.get(persona_id)
        return persona.color if persona and persona.color else DEFAULT_COLOR

    # layout ---------------------------------------------------------------------
    PREFILL_LABEL = "Reading the room"
    BUSY_HINT = "They are replying… escape stops the round"
    QUEUED_HINT = "Queued: waits for {who} to finish replying, then this round starts"
    WAITING_FALLBACK = "another tab"

    def compose_controls(self) -> ComposeResult:
        with Horizontal(classes="speakers"):
            yield Label("Replies:", classes="speakers-label")
            for i, pid in enumerate(self.members):
                yield Checkbox(self._speaker_label(pid, True), True, id=f"speaker-{i}", classes="speaker")

    def _header(self) -> Text:
        text = Text()
        text.append(self.scene_title, style="bold")
        text.append(" — ")
        for i, pid in enumerate(self.members):
            if i:
                text.append(" · ", style="dim")
            text.append(self.name_of(pid), style=f"bold {self.color_of(pid)}")
        if self.caches:
            counts = {w: sum(1 for v in self.caches.values() if v == w) for w in ("ram", "disk")}
            parts = [f"{w} {n}" for w, n in counts.items() if n]
            if parts:
                text.append(f"   caches {' · '.join(parts)}/{len(self.members)}", style="dim")
        if self.last_round:
            text.append(f"   last {self.last_round}", style="dim")
        return text

    def _idle_hint(self) -> str:
        return "enter send (empty: they go on) · @name picks who replies · tab to the ticks · F1 keys"

    def replied_note(self) -> str:
        return f"The scene {self.scene_title} replied."

    def set_caches(self, caches: dict[str, str]) -> None:
        if caches != self.caches:
            self.caches = caches
            self.refresh_chrome()

    # speakers ---------------------------------------------------------------------
    def _speaker_label(self, persona_id: str, ticked: bool) -> Text:
        """A ticked member in its colour; an unticked one dim and struck through, so the two cannot be confused."""
        if ticked:
            return Text(self.name_of(persona_id), style=f"bold {self.color_of(persona_id)}")
        return Text(self.name_of(persona_id), style="dim strike")

    @on(Checkbox.Changed, ".speaker")
    def _speaker_ticked(self, event: Checkbox.Changed) -> None:
        index = int(event.checkbox.id.removeprefix("speaker-"))
        event.checkbox.label = self._speaker_label(self.members[index], event.value)

    def ticked(self) -> list[str]:
        """The members ticked to reply, in speaking order."""
        return [pid for i, pid in enumerate(self.members) if self.query_one(f"#speaker-{i}", Checkbox).value]

    def toggle_speaker(self, persona_id: str) -> None:
        if persona_id in self.members:
            box = self.query_one(f"#speaker-{self.members.index(persona_id)}", Checkbox)
            box.value = not box.value

    def parse(self, text: str) -> tuple[list[str], str]:
        """`@ann @bob what now?` -> (["ann", "bob"], "what now?"); no @ -> (the ticked members, text).

        An @name matches a member's id, any word of its name, or its whole name (app.ui.handles)."""
        picked, rest, bad = take_handles(text, self.members, self.name_of)
        if bad is not None:
            raise ParleyError(f"No one (or more than one) in this scene is called {bad}: use an id, a first name "
                              f"or a full name ({handle_hint(self.members, self.name_of)}).")
        if picked:
            return [pid for pid in self.members if pid in picked], rest
        return self.ticked(), text.strip()

    # transcript -------------------------------------------------------------------
    def message_views(self) -> list[SceneLine]:
        return [v for v in self.transcript.query(SceneLine) if "streaming" not in v.classes]

    def _details_of(self, catalog, message) -> MessageDetails:
        """On the transcript's worker thread: the lore that entered this speaker's view with the round."""
        return MessageDetails(lore=scene_lore_of(catalog, message))

    def _view_for(self, message, details: MessageDetails) -> SceneLine:
        if message.role == "user" or message.persona_id is None:
            return SceneLine("user", message.content, message.id)
        stats = stats_line(message.meta.get("stats"), bool(message.meta.get("cancelled")))
        return SceneLine("assistant", message.content, message.id, persona_id=message.persona_id,
                         speaker=self.name_of(message.persona_id), color=self.color_of(message.persona_id),
                         stats=stats + lore_mark(details.lore), lore=details.lore)

    def _live_view(self) -> SceneLine | None:
        return next(iter(self.live.values()), None)

    def _scroll_after_reload(self) -> None:
        self.transcript.scroll_end(animate=False)

    async def _start_round(self, text: str, speakers: list[str]) -> None:
        transcript = self.transcript
        if text:
            await transcript.mount(SceneLine("user", text))
        self.live = {pid: SceneLine("assistant", "", persona_id=pid, speaker=self.name_of(pid),
                                    color=self.color_of(pid), streaming=True) for pid in speakers}
        await transcript.mount_all(list(self.live.values()))
        self.generating = True
        self.refresh_chrome()
        transcript.scroll_end(animate=False)

    # user actions -------------------------------------------------------------------
    async def send(self, text: str) -> bool:
        """Start a round; False (the text stays in the box) when it cannot start."""
        if self.generating:
            self.app.notify("The round is still going: your message stays in the box; send it when they have "
                            "finished, or press escape to stop the round.", severity="warning")
            return False
        try:
            speakers, said = self.parse(text)
        except ParleyError as exc:
            self.app.notify(str(exc), severity="warning")
            return False
        if not speakers:
            self.app.notify("Tick at least one persona to reply (or start the message with @name).",
                            severity="warning")
            return False
        self.last_sent, self.last_said = text, said
        await self._start_round(said, speakers)
        self.app.submit(cmd.SceneRound(self.conversation_id, said, tuple(speakers), self.app.sampling))
        return True

    # engine events (the screen routes this scene's here) ---------------------------------
    async def on_engine_round_started(self, event: ev.SceneRoundStarted) -> None:
        if not self.live:  # a round this tab did not start (another client): show it all the same
            self.reload()  # what was said before it goes above its bubbles when read
            await self._start_round("", list(event.speakers))

    async def on_engine_saved(self, event: ev.MessageSaved) -> None:
        if event.role == "user":
            user = next((v for v in reversed(self.message_views()) if v.role == "user" and v.message_id is None), None)
            if user is not None:
                user.message_id = event.message_id

    async def on_engine_tokens(self, event: ev.SceneTokensGenerated) -> None:
        self.remove_class("-prefilling")
        live = self.live.get(event.persona_id)
        if live is None:
            return
        transcript = self.transcript
        following = transcript.scroll_y >= transcript.max_scroll_y - 2  # a reader who scrolled up stays put
        await live.write(event.text)
        if following:
            transcript.scroll_end(animate=False)

    async def on_engine_reply_finished(self, event: ev.SceneReplyFinished) -> None:
        live = self.live.pop(event.persona_id, None)
        if live is None:
            return
        if event.message_id:  # its lore mark comes with the transcript read at the round's end
            await live.finish(event.text, event.message_id, stats_line(event.stats, event.cancelled))
        else:
            await live.stop_stream()
            await live.remove()

    async def on_engine_round_finished(self, event: ev.SceneRoundFinished) -> None:
        self.remove_class("-prefilling")
        for live in self.live.values():
            await live.stop_stream()
            await live.remove()
        self.live = {}
        self.generating = False
        self.last_sent = ""
        self.last_round = round_line(len(event.speakers), event.batch_tps, event.cancelled)
        self.reload(then=self._show_round_line)

    async def _show_round_line(self) -> None:
        """The round's figures, under its replies once the transcript shows them."""
        await self.mount_after_read(Static(self.last_round, classes="round-stats"))
        self.transcript.scroll_end(animate=False)

    async def on_engine_failed(self, event: ev.EngineFailed) -> None:
        for live in self.live.values():
            await live.stop_stream()
            await live.remove()
        self.live = {}
        self.generating = False
        self.remove_class("-prefilling")
        last_sent, last_said, self.last_sent = self.last_sent, self.last_said, ""
        self.reload(then=lambda: self._give_back_unsaved(last_sent, last_said))

    def _give_back_unsaved(self, last_sent: str, last_said: str) -> None:
        """Once the transcript shows what was saved: a message that was not goes back into the box."""
        saved = any(v.message_id is not None and v.role == "user" and v.text == last_said
                    for v in self.message_views()[-1:])
        if last_sent and not self.composer.text and not saved:
            self.composer.text = last_sent  # nothing was saved: let the user fix it and send again

    def persona_changed(self) -> None:
        """A member was edited: show its name and colour as they are now (new lines; the ticks too)."""
        for i, pid in enumerate(self.members):
            box = self.query_one(f"#speaker-{i}", Checkbox)
            box.label = self._speaker_label(pid, box.value)
        self.refresh_chrome()

    ENGINE_HANDLERS = {
        ev.SceneRoundStarted: on_engine_round_started,
        ev.MessageSaved: on_engine_saved,
        ev.PrefillProgressed: ConversationTab.on_engine_prefill,
        ev.SceneTokensGenerated: on_engine_tokens,
        ev.SceneReplyFinished: on_engine_reply_finished,
        ev.SceneRoundFinished: on_engine_round_finished,
        ev.EngineFailed: on_engine_failed,
    }


def scene_caches(members, ram_states, disk_rows, conversation_id: int) -> dict[str, str]:
    """Where each member's cache of this scene is: "ram", "disk" or "none", by the catalog's one rule
    (app.catalog.caches.conversation_cache_state: RAM beats disk beats none)."""
    ram, rows = list(ram_states), list(disk_rows)
    return {pid: conversation_cache_state(conversation_id, rows, ram, persona_id=pid).where for pid in members}
