"""The command palette (ctrl+p): every action of the app, 'Chat with <persona>' for each persona, 'Scene: <name>'
for each scene, and in a scene tab 'Toggle <persona>' for who replies."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

ACTIONS = [
    ("Stop the reply", "Stop the reply being written (escape)", "stop"),
    ("Regenerate the last reply", "Reply again; the old reply stays as an alternative (ctrl+r)", "regenerate"),
    ("Edit my last message and resend", "Branch the conversation from an edited message (e on a message)", "edit_last"),
    ("Copy the last reply", "Copy the last reply to the clipboard (ctrl+l)", "copy_last"),
    ("New conversation", "Start a new conversation with this persona (ctrl+n)", "new_conversation"),
    ("Conversations…", "List, reopen and delete old conversations (ctrl+o)", "conversations"),
    ("Conversation notes…", "Read or edit the notes the model keeps of turns that left its view", "notes"),
    ("Next tab", "Go to the next tab (F7 or ctrl+pagedown)", "tab(1)"),
    ("Previous tab", "Go to the previous tab (F6 or ctrl+pageup)", "tab(-1)"),
    ("Go to tab…", "Go to tab 1 to 9 by its number (ctrl+g, then the number)", "go_to_tab"),
    ("Close tab", "Close this tab (ctrl+w)", "close_tab"),
    ("Find a persona", "Filter the persona list (ctrl+f)", "filter_personas"),
    ("Hide / show the persona list", "More room for the chat (ctrl+b)", "toggle_sidebar"),
    ("New persona…", "Create a persona (F3)", "new_persona"),
    ("Edit persona…", "Edit this persona's name, prompt, greetings and sampling (F2)", "edit_persona"),
    ("Import a character card…", "Import a V2/V3 card from JSON, PNG or CHARX (F4)", "import_card"),
    ("Export persona as a card…", "Write this persona as a V2 card, JSON or PNG (F5)", "export_card"),
    ("New scene…", "Put 2 to 6 personas in one room (F8)", "new_scene"),
    ("Scenes…", "List, reopen and delete scenes (F9)", "scenes"),
]
APP_ACTIONS = [
    ("Toggle light / dark theme", "Switch between the light and the dark theme (ctrl+t)", "toggle_theme"),
    ("Help: keys", "Show every key (F1 or ?)", "help"),
]


class ParleyCommands(Provider):
    """The palette's entries. The scenes are read once per opening, on a worker thread (`startup`)."""

    scenes: list = []

    async def startup(self) -> None:
        from app.ui.catalog_reads import READ_ERRORS, list_scenes, off_ui_thread

        if self.app.catalog is not None and self.app.chat_screen is not None:
            try:
                self.scenes = await off_ui_thread(self.app, list_scenes)
            except READ_ERRORS:  # a catalog busy past its timeout: the palette offers everything but the scenes
                self.scenes = []

    def _commands(self):
        app = self.app
        screen = app.chat_screen
        out = []
        if screen is not None:
            for title, help_text, action in ACTIONS:
                out.append((title, help_text, partial(screen.run_action, action)))
        for title, help_text, action in APP_ACTIONS:
            out.append((title, help_text, partial(app.run_action, action)))
        if screen is not None:
            for persona in sorted(app.personas.values(), key=lambda p: p.name.lower()):
                out.append((f"Chat with {persona.name}", persona.description or persona.id,
                            partial(screen.open_persona, persona.id)))
            for scene in self.scenes:
                names = ", ".join(app.personas[p].name if p in app.personas else p for p in scene.members)
                out.append((f"Scene: {scene.title or scene.id}", names, partial(screen.open_scene, scene.id)))
            tab = screen.active_scene()
            if tab is not None:
                for pid in tab.members:
                    out.append((f"Toggle {tab.name_of(pid)} in this scene's rounds",
                                "Tick or untick who replies (or start a message with @name)",
                                partial(screen.action_toggle_speaker, pid)))
        return out

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
