"""Create or edit a persona (F2, F3)."""

from __future__ import annotations

import dataclasses

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from app.errors import ParleyError


class PersonaEditorScreen(ModalScreen):
    """Create or edit a persona; saving writes `<id>.toml` into the user's persona folder."""

    # tab as a priority binding: the app moves the focus before it hands the next key to a widget, so text typed
    # right after tab (a fast typist, a paste) lands in the next field, not in the one tab left
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "cancel", "Cancel"),
                Binding("tab", "app.focus_next", "Next field", show=False, priority=True),
                Binding("shift+tab", "app.focus_previous", "Previous field", show=False, priority=True)]

    def __init__(self, persona=None) -> None:
        super().__init__()
        self.persona = persona
        self.id_edited = False  # the user typed an id: the name no longer proposes one
        self.warned = ""  # the warning shown on the last ctrl+s (the next ctrl+s saves anyway)

    def compose(self) -> ComposeResult:
        p = self.persona
        title = f"Edit persona {p.name} ({p.id})" if p else "New persona"
        with VerticalScroll(id="editor-box", classes="dialog"):
            yield Label(title, classes="dialog-title")
            yield Static("ctrl+s saves to your persona folder · escape cancels", classes="dialog-hint")
            yield Label("Name")
            yield Input(p.name if p else "", placeholder="Captain Mara Vell", id="ed-name")
            yield Label("Id (the file name; a new id saves a copy under that id)" if p else
                        "Id (the file name; proposed from the name, edit it if you like)")
            yield Input(p.id if p else "", placeholder="captain-mara-vell", id="ed-id", select_on_focus=False)
            yield Label("Short description")
            yield Input(p.description if p else "", placeholder="What this persona is for", id="ed-description")
            yield Label("System prompt")
            yield TextArea(p.system_prompt if p else "", id="ed-system", soft_wrap=True)
            yield Label("Greetings (separate several with a line holding only ---)")
            yield TextArea("\n---\n".join(p.greetings) if p else "", id="ed-greetings", soft_wrap=True)
            yield Label("Scenario")
            yield TextArea(p.scenario if p else "", id="ed-scenario", soft_wrap=True)
            with Horizontal(classes="editor-row"):
                with Vertical():
                    yield Label("Colour")
                    yield Input(p.color if p else "#5b8def", id="ed-color")
                with Vertical():
                    yield Label("Temperature")
                    yield Input(str(p.temperature) if p else "0.7", id="ed-temperature")
                with Vertical():
                    yield Label("Top p")
                    yield Input(str(p.top_p) if p else "0.95", id="ed-top-p")
                with Vertical():
                    yield Label("Max tokens")
                    yield Input(str(p.max_tokens) if p else "512", id="ed-max-tokens")
            yield Static("", id="ed-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="ed-save")
                yield Button("Cancel (esc)", id="ed-cancel")

    def on_mount(self) -> None:
        self.query_one("#ed-name").focus()

    @on(Input.Changed, "#ed-name")
    def _name_changed(self, event: Input.Changed) -> None:
        from app.personas import new_persona_id

        if self.persona is None and not self.id_edited:
            box = self.query_one("#ed-id", Input)
            with box.prevent(Input.Changed):
                box.value = new_persona_id(event.value, self.app.persona_dirs()) if event.value.strip() else ""
                box.cursor_position = len(box.value)

    @on(Input.Changed, "#ed-id")
    def _id_changed(self) -> None:
        self.id_edited = True

    @on(Input.Submitted)
    def _next_field(self, event: Input.Submitted) -> None:
        """enter in a one-line field goes on to the next field, as tab does."""
        event.stop()
        self.focus_next()

    def _number(self, widget_id: str, kind):
        raw = self.query_one(widget_id, Input).value.strip()
        try:
            return kind(raw)
        except ValueError:
            return raw  # build_persona reports it, naming the field

    def build(self):
        from app.personas import build_persona, new_persona_id

        p = self.persona
        fields = {}
        if p is not None:
            fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "source"}
        greetings = [g.strip() for g in self.query_one("#ed-greetings", TextArea).text.split("\n---\n")]
        name = self.query_one("#ed-name", Input).value.strip()
        fields.update(
            name=name,
            description=self.query_one("#ed-description", Input).value,
            system_prompt=self.query_one("#ed-system", TextArea).text,
            greetings=[g for g in greetings if g],
            scenario=self.query_one("#ed-scenario", TextArea).text,
            color=self.query_one("#ed-color", Input).value.strip(),
            temperature=self._number("#ed-temperature", float),
            top_p=self._number("#ed-top-p", float),
            max_tokens=self._number("#ed-max-tokens", int),
        )
        if not name:
            raise ParleyError("The persona editor: field 'name' is empty. Give the persona a name.")
        typed_id = self.query_one("#ed-id", Input).value.strip()
        if p is None:
            fields["id"] = typed_id or new_persona_id(name, self.app.persona_dirs())
        elif typed_id:
            fields["id"] = typed_id
        return build_persona(fields, "the persona editor")

    def missing_voice(self, persona) -> str:
        """A warning for a persona with no system prompt (and perhaps no greeting either), or ''.

        A greeting alone is optional; without a system prompt the model does not know who to be."""
        if persona.system_prompt.strip():
            return ""
        missing = ["system prompt"] + (["greeting"] if not persona.greetings else [])
        return (f"This persona has no {' and no '.join(missing)}: the model will not know who to be and will answer "
                "as a plain assistant. Press ctrl+s again to save it as it is.")

    def action_save(self) -> None:
        from app.personas import save_persona

        try:
            persona = self.build()
            warning = self.missing_voice(persona)
            if warning and warning != self.warned:
                self.warned = warning
                self.query_one("#ed-error", Static).update(Text(warning, style="bold yellow"))
                self.query_one("#ed-error").scroll_visible(animate=False)
                return
            if self.persona is None or persona.id != self.persona.id:
                taken = persona.id in self.app.personas
                if taken:
                    raise ParleyError(f"The persona editor: id {persona.id!r} is taken by {self.app.personas[persona.id].name}. "
                                      "Choose another id.")
            path = save_persona(persona, self.app.user_persona_dir())
        except ParleyError as exc:
            self.query_one("#ed-error", Static).update(Text(str(exc), style="bold red"))
            self.query_one("#ed-error").scroll_visible(animate=False)  # below the fold on a small terminal
            return
        self.dismiss(dataclasses.replace(persona, source=path))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#ed-save")
    def _save_pressed(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#ed-cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)
