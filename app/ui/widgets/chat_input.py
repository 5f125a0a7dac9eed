"""The message box of a chat or scene tab."""

from __future__ import annotations

from textual import events
from textual.widgets import TextArea

from app.ui import messages as msg


class ChatInput(TextArea):
    """The message box: enter sends, shift+enter or ctrl+j starts a new line."""

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(msg.ComposerSubmitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        number = self._tab_character(event.character)
        if number is not None:
            event.stop()
            event.prevent_default()
            self.post_message(msg.TabCharacter(number))
            return
        if event.key == "up" and self.cursor_location == (0, 0):
            pane = next((a for a in self.ancestors if hasattr(a, "focus_message")), None)  # a chat or a scene
            if pane is not None and pane.focus_message(-1):
                event.stop()
                event.prevent_default()
                return
        await super()._on_key(event)

    def _tab_character(self, character: str | None) -> int | None:
        """The tab an option/8-bit digit character asks for (app.ui.keys), or None to type it."""
        from app.ui.keys import TAB_CHARACTERS, TabCharacterGuard

        if character not in TAB_CHARACTERS:
            return None
        guard = getattr(self.app, "tab_character_guard", None)
        if guard is None:
            guard = self.app.tab_character_guard = TabCharacterGuard()
        screen = getattr(self.app, "chat_screen", None)
        tabs = len(screen.pane_ids()) if screen is not None and screen.is_mounted else 0
        return guard.tab_for(character, not self.text, tabs)
