"""The keys, one table (F1), generated from the bindings.

The table's prose is written here; every key in it is a placeholder (`{action}`, or `{action#2}` for its second
key) filled from the bindings that run that action: ChatScreen's, the app's, a message's, the go-to-tab dialog's
and Textual's own (quit, command palette). A key rebound in a `BINDINGS` list changes here by itself; an action
that loses its key makes the help fail to build (tests/test_ui_layers.py checks every key action is here).
The message box's own keys (enter, shift+enter, ctrl+j, ↑) are not bindings (ChatInput handles them) and are
written out.
"""

from __future__ import annotations

import re
from functools import cache

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, Static

TEMPLATE = """\
# Parley keys

| Key | What it does |
|---|---|
| **enter** | send the message |
| **shift+enter**, **ctrl+j** | new line in the message |
| **{stop}** | stop the reply · cancel an edit · back to the message box |
| **↑** (in an empty message box) | select the last message; **{move(-1)}/{move(1)}** move between messages |
| **{alternative(-1)} / {alternative(1)}** (on a message) | browse its alternatives (regenerations, edits) |
| **{edit}** (on your message) | edit it and resend (a new branch) |
| **{copy}** (on a message) | copy it |
| **{regenerate}** | regenerate the last reply (the old one stays as an alternative) |
| **{copy_last}** | copy the last reply |
| **{new_conversation}** | new conversation with this persona |
| **{conversations}** | list, reopen and delete conversations |
| **{new_scene}** | new scene: a name and 2–6 personas in one room |
| **{scenes}** | list, reopen and delete scenes |
| **{tab(-1)#2} / {tab(1)#2}** (or **{tab(-1)} / {tab(1)}**) | previous / next tab |
| **{go_to_tab}**, then **{go(1)} … {go(9)}** | go to tab 1 … 9 (**{show_tab(1)} … 9** too, where the terminal sends alt) |
| **{close_tab}** | close the tab (it comes back from **{conversations}**; open tabs come back after a restart) |
| **{filter_personas}** | filter the persona list (enter opens, ↓ goes to the list) |
| **{toggle_sidebar}** | hide / show the persona list |
| **{edit_persona}** | edit this persona · **{new_persona}** new persona |
| **{import_card}** | import a character card · **{export_card}** export this persona as a card |
| **{toggle_theme}** | light / dark theme |
| **{command_palette}** | command palette: every action |
| **{help}** (or **{help#2}** outside a text box) | this help |
| **{quit}** | quit |

In a scene: **enter** sends to every persona ticked under the transcript; they all reply at once. Start the
message with **@name** (e.g. `@ann @bob what now?`) to pick who replies this round; **enter** on an empty box lets
them go on without you; **{stop}** stops the round; **tab** reaches the ticks (**space** toggles one).

Every key above works in tmux, GNOME Terminal, iTerm2, Windows Terminal and the macOS Terminal with their
default settings. Where alt/option+digit arrives as a character (¡ ™ £ …), that character in an empty message box
goes to the tab instead of being typed (type it after another character, or paste it, to write it).

Persona list: **ram** = cache in memory (instant), **disk** = on disk (loads in a moment), **none** = built on the first reply.
"""
PLACEHOLDER = re.compile(r"\{([^{}#]+)(?:#(\d))?\}")
KEY_LABELS = {"question_mark": "?", "left": "←", "right": "→", "up": "↑", "down": "↓"}


def key_label(key: str) -> str:
    """How a key is written in the table: "f6" -> "F6", "question_mark" -> "?", "ctrl+r" as it is."""
    if re.fullmatch(r"f\d+", key):
        return key.upper()
    return KEY_LABELS.get(key, key)


def keys_by_action(bindings) -> dict[str, list[str]]:
    """action -> its keys, in the order the bindings list them ("ctrl+l,alt+c" is two keys)."""
    out: dict[str, list[str]] = {}
    for binding in bindings:
        for key in binding.key.split(","):
            out.setdefault(binding.action.removeprefix("app."), []).append(key.strip())
    return out


def binding_sources() -> list:
    """Every binding the help describes (imported here: the app module imports the screens)."""
    from app.ui.app import ParleyApp
    from app.ui.keys import GoToTabScreen
    from app.ui.screens.chat import ChatScreen
    from app.ui.widgets.message_view import MessageView

    palette = Binding(App.COMMAND_PALETTE_BINDING, "command_palette")
    return [*ChatScreen.BINDINGS, *ParleyApp.BINDINGS, *App.BINDINGS, palette, *MessageView.BINDINGS,
            *GoToTabScreen.BINDINGS]


def render(template: str, keys: dict[str, list[str]]) -> str:
    """The template with each `{action}` / `{action#n}` replaced by that action's (n-th) key."""

    def fill(match: re.Match) -> str:
        action, nth = match.group(1), int(match.group(2) or 1)
        found = keys.get(action, [])
        if len(found) < nth:
            raise KeyError(f"the help names key {nth} of action {action!r}, which has {len(found)}")
        return key_label(found[nth - 1])

    return PLACEHOLDER.sub(fill, template)


def actions_in_help(template: str = TEMPLATE) -> set[str]:
    return {m.group(1) for m in PLACEHOLDER.finditer(template)}


@cache
def help_text() -> str:
    return render(TEMPLATE, keys_by_action(binding_sources()))


class HelpScreen(ModalScreen):
    """The keys, one table."""

    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Markdown(help_text(), id="help-text")
            yield Static("escape closes", classes="dialog-hint")
