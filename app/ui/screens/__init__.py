"""The screens, one per module; importing them from `app.ui.screens` keeps working.

- `chat`: ChatScreen, the main screen (sidebar and tabs); it routes engine events to their tab.
- `help`: HelpScreen, the keys (generated from the bindings).
- `persona_editor`, `import_card`, `export_card`: create, edit, import and export personas.
- `conversations`, `scenes`, `new_scene`: list, reopen and delete conversations and scenes; make a scene.
- `listed`: ListedDialog, what the two list dialogs share (their list is read on a worker thread).
- `confirm`: the yes/no question before a delete.
"""

from app.ui.screens.export_card import ExportCardScreen, export_folder
from app.ui.screens.import_card import ImportCardScreen
from app.ui.screens.chat import NARROW_BELOW, TAB_PREFIX, ChatScreen
from app.ui.screens.confirm import ConfirmScreen
from app.ui.screens.conversations import ConversationsScreen
from app.ui.screens.help import HelpScreen, help_text
from app.ui.screens.new_scene import NewSceneScreen
from app.ui.screens.persona_editor import PersonaEditorScreen
from app.ui.screens.scenes import ScenesScreen

__all__ = ["NARROW_BELOW", "TAB_PREFIX", "ChatScreen", "ConfirmScreen", "ConversationsScreen",
           "ExportCardScreen", "HelpScreen", "ImportCardScreen", "NewSceneScreen", "PersonaEditorScreen",
           "ScenesScreen", "export_folder", "help_text"]
