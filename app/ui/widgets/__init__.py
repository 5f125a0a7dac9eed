"""The widgets, one component per module; importing them from `app.ui.widgets` keeps working.

- `persona_list`, `ram_gauge`: the sidebar. `cache_summary`: where a cache is and how big.
- `transcript`: the scrolling message list and the ↑/↓ navigation chat and scene tabs share.
- `message_view`, `chat_input`: one message; the message box.
- `chat_pane`: one persona's chat tab. `scene_tab`: one scene's tab.
- `text`: how figures and model text are drawn.
"""

from app.ui.widgets.cache_summary import cache_label
from app.ui.widgets.chat_input import ChatInput
from app.ui.widgets.chat_pane import PASTE_NOTE_CHARS, ChatPane, paste_note
from app.ui.widgets.message_view import MessageView
from app.ui.widgets.persona_list import PersonaList
from app.ui.widgets.ram_gauge import RamGauge
from app.ui.widgets.scene_tab import SceneLine, SceneTab
from app.ui.widgets.text import (QUEUE_SHOWN_MS, clean, duration, human_bytes, lore_entries, lore_mark, lore_of,
                                 stats_line)
from app.ui.widgets.transcript import Transcript, TranscriptNavigation

__all__ = ["PASTE_NOTE_CHARS", "QUEUE_SHOWN_MS", "ChatInput", "ChatPane", "MessageView", "PersonaList",
           "RamGauge", "SceneLine", "SceneTab", "Transcript", "TranscriptNavigation", "clean", "duration",
           "cache_label", "human_bytes", "lore_entries", "lore_mark", "lore_of", "paste_note", "stats_line"]
