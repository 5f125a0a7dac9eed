"""The catalog: one SQLite file (via sqlite-utils) for personas, conversations and the message tree.

Schema lives only in `migrations.py` (append-only). See `store.Catalog` for the API.
"""

from app.catalog.records import Conversation, Message, PersonaRecord
from app.catalog.store import LEAF, Catalog, short_title

__all__ = ["Catalog", "Conversation", "Message", "PersonaRecord", "LEAF", "short_title"]
