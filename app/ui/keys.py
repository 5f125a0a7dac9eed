"""Keys that act in every terminal, and what alt keys turn into where they do not.

With default settings tmux, GNOME Terminal/VTE and Windows Terminal send alt+digit as ESC then the digit,
and Textual turns ESC 1 … ESC 9 into the characters a Mac's option key composes ("¡", "™", "£", …: its
table does that for WezTerm); the macOS Terminal and iTerm2 send those characters themselves, and an xterm
in 8-bit mode sends the digit with its high bit set (alt+1 is "±"). So alt+digit never arrives as alt+digit
and used to be typed into the message box. Every action therefore has a ctrl or function key that reaches
the app everywhere; and one of those characters arriving in an empty message box while several tabs are
open is taken as the tab switch it was meant to be, never typed. (To start a message with "¡" while several
tabs are open, type it after another character, or paste it.)
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

# option+1…9 on a US/UK Mac keyboard, then the 8-bit meta forms of 1…9 (0xB1…0xB9) where they differ
OPTION_DIGITS = {ch: n for n, ch in enumerate("¡™£¢∞§¶•ª", start=1)}
EIGHT_BIT_DIGITS = {chr(0xB0 + n): n for n in range(1, 10) if chr(0xB0 + n) not in OPTION_DIGITS}
TAB_CHARACTERS = {**EIGHT_BIT_DIGITS, **OPTION_DIGITS}


class TabCharacterGuard:
    """Decides whether a typed character is a tab switch (see the module docstring); one per app."""

    def tab_for(self, character: str | None, box_empty: bool, tabs: int) -> int | None:
        """The tab number `character` asks for, or None to type it."""
        number = TAB_CHARACTERS.get(character or "")
        if number is None or not box_empty or tabs < 2:
            return None
        return number


class GoToTabScreen(ModalScreen[int | None]):
    """ctrl+g, then a digit: go to that tab (works where alt+digit does not)."""

    BINDINGS = [*[Binding(str(n), f"go({n})", f"Tab {n}", show=False) for n in range(1, 10)],
                Binding("escape,ctrl+g", "go(0)", "Cancel")]

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def compose(self) -> ComposeResult:
        with Vertical(id="goto-box", classes="dialog"):
            yield Label("Go to tab: press its number", classes="dialog-title")
            yield Static("\n".join(f"{i}  {name}" for i, name in enumerate(self.names[:9], start=1)) or "No tabs open.")
            yield Static("1–9 go · escape cancels", classes="dialog-hint")

    def action_go(self, number: int) -> None:
        self.dismiss(number or None)
