"""The sidebar's persona list: a filter box over the personas, each with its cache state and size."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

from app.catalog.caches import CacheSummary
from app.ui import messages as msg
from app.ui.widgets.cache_summary import cache_label


class PersonaList(Vertical):
    """A filter box over the persona list; each line shows the persona's cache state and size."""

    BINDINGS = [Binding("down", "to_list", "Persona list", show=False)]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._personas: dict = {}
        self._caches: dict[str, CacheSummary] = {}
        self._last_highlighted: str | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Filter personas…", id="persona-filter")
        yield OptionList(id="persona-list")

    @property
    def filter_text(self) -> str:
        return self.query_one("#persona-filter", Input).value.strip().lower()

    def set_personas(self, personas: dict) -> None:
        self._personas = dict(personas)
        self.refresh_list()

    def set_caches(self, caches: dict[str, CacheSummary]) -> None:
        self._caches = dict(caches)
        self.refresh_list()

    def cache_of(self, persona_id: str) -> CacheSummary:
        return self._caches.get(persona_id, CacheSummary())

    def visible_ids(self) -> list[str]:
        needle = self.filter_text
        out = []
        for persona in sorted(self._personas.values(), key=lambda p: p.name.lower()):
            hay = f"{persona.id} {persona.name} {persona.description} {' '.join(persona.tags)}".lower()
            if not needle or needle in hay:
                out.append(persona.id)
        return out

    def _prompt(self, persona) -> Text:
        cache = self.cache_of(persona.id)
        text = Text()
        text.append("● ", style=persona.color)
        text.append(persona.name, style="bold")
        text.append("\n  ")
        style = {"ram": "#3fa34d", "disk": "#c98a00"}.get(cache.where, "dim")
        text.append(cache_label(cache), style=style)
        return text

    def refresh_list(self) -> None:
        options = self.query_one("#persona-list", OptionList)
        ids = self.visible_ids()
        current = [options.get_option_at_index(i).id for i in range(options.option_count)]
        if current == ids:  # same personas: only their cache lines changed
            for pid in ids:
                options.replace_option_prompt(pid, self._prompt(self._personas[pid]))
            return
        highlighted = options.highlighted_option.id if options.highlighted_option is not None else None
        options.clear_options()
        options.add_options([Option(self._prompt(self._personas[pid]), id=pid) for pid in ids])
        if ids:
            options.highlighted = ids.index(highlighted) if highlighted in ids else 0

    @property
    def highlighted_id(self) -> str | None:
        option = self.query_one("#persona-list", OptionList).highlighted_option
        return option.id if option is not None else None

    def action_to_list(self) -> None:
        self.query_one("#persona-list", OptionList).focus()

    @on(Input.Changed, "#persona-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.refresh_list()

    @on(Input.Submitted, "#persona-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.highlighted_id:
            self.post_message(msg.PersonaChosen(self.highlighted_id))
            event.input.value = ""  # the filter has done its job: new personas must not stay hidden behind it

    @on(OptionList.OptionHighlighted, "#persona-list")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option.id and event.option.id != self._last_highlighted:
            self._last_highlighted = event.option.id
            self.post_message(msg.PersonaHighlighted(event.option.id))

    @on(OptionList.OptionSelected, "#persona-list")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.post_message(msg.PersonaChosen(event.option.id))
