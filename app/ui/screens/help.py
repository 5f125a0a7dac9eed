"""The keys, one table (F1)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, Static

HELP = """\
# Parley keys

| Key | What it does |
|---|---|
| **enter** | send the message |
| **shift+enter**, **ctrl+j** | new line in the message |
| **escape** | stop the reply · cancel an edit · back to the message box |
| **↑** (in an empty message box) | select the last message; **↑/↓** move between messages |
| **← / →** (on a message) | browse its alternatives (regenerations, edits) |
| **e** (on your message) | edit it and resend (a new branch) |
| **c** (on a message) | copy it |
| **ctrl+r** | regenerate the last reply (the old one stays as an alternative) |
| **ctrl+l** | copy the last reply |
| **ctrl+n** | new conversation with this persona |
| **ctrl+o** | list, reopen and delete conversations |
| **F8** | new scene: a name and 2–6 personas in one room |
| **F9** | list, reopen and delete scenes |
| **F6 / F7** (or **ctrl+pageup / ctrl+pagedown**) | previous / next tab |
| **ctrl+g**, then **1 … 9** | go to tab 1 … 9 (**alt+1 … 9** too, where the terminal sends alt) |
| **ctrl+w** | close the tab (it comes back from **ctrl+o**; open tabs come back after a restart) |
| **ctrl+f** | filter the persona list (enter opens, ↓ goes to the list) |
| **ctrl+b** | hide / show the persona list |
| **F2** | edit this persona · **F3** new persona |
| **F4** | import a character card · **F5** export this persona as a card |
| **ctrl+t** | light / dark theme |
| **ctrl+p** | command palette: every action |
| **F1** (or **?** outside a text box) | this help |
| **ctrl+q** | quit |

In a scene: **enter** sends to every persona ticked under the transcript; they all reply at once. Start the
message with **@name** (e.g. `@ann @bob what now?`) to pick who replies this round; **enter** on an empty box lets
them go on without you; **escape** stops the round; **tab** reaches the ticks (**space** toggles one).

Every key above works in tmux, GNOME Terminal, iTerm2, Windows Terminal and the macOS Terminal with their
default settings. Where alt/option+digit arrives as a character (¡ ™ £ …), that character in an empty message box
goes to the tab instead of being typed (type it after another character, or paste it, to write it).

Persona list: **ram** = cache in memory (instant), **disk** = on disk (loads in a moment), **none** = built on the first reply.
"""


class HelpScreen(ModalScreen):
    """The keys, one table."""

    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Markdown(HELP, id="help-text")
            yield Static("escape closes", classes="dialog-hint")
