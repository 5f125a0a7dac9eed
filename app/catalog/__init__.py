"""The catalog: one SQLite file (via sqlite-utils) for personas, conversations and the message tree.

Schema lives only in `migrations.py` (append-only). See `store.Catalog` for the API.
"""

from app.catalog import light_sqlite_utils

light_sqlite_utils.install()  # before any module here imports sqlite_utils: its CLI-only dependencies load later

from app.catalog.records import Conversation, Message, PersonaRecord  # noqa: E402
from app.catalog.store import LEAF, Catalog, short_title  # noqa: E402

__all__ = ["Catalog", "Conversation", "Message", "PersonaRecord", "LEAF", "short_title"]
