"""CHARX (Character Card V3 zip): find `card.json`, refusing zip bombs.

The zip's own size fields can lie, so the entry count and declared sizes are
checked first, and card.json is read through a stream capped at the limit.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from app.errors import ParleyError

MAX_ENTRIES = 1000
MAX_TOTAL_BYTES = 512 * 1024 * 1024  # declared uncompressed size of all entries
MAX_CARD_JSON_BYTES = 200 * 1024 * 1024
MAX_RATIO = 200  # uncompressed / compressed, for entries over 1 MB

_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError, ValueError,
               struct.error, OverflowError, KeyError, IndexError, UnicodeDecodeError)


def card_json_from_charx(data: bytes, origin: str) -> bytes:
    """The bytes of card.json inside a CHARX archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ENTRIES:
                raise ParleyError(f"{origin}: the archive has {len(entries)} entries (limit {MAX_ENTRIES}); refusing it.")
            total = sum(e.file_size for e in entries)
            if total > MAX_TOTAL_BYTES:
                raise ParleyError(
                    f"{origin}: the archive would expand to {total >> 20} MB (limit {MAX_TOTAL_BYTES >> 20} MB); refusing it."
                )
            cards = [e for e in entries if e.filename.lower().rstrip("/").split("/")[-1] == "card.json" and not e.is_dir()]
            if not cards:
                raise ParleyError(f"{origin}: no card.json in the archive; is it a CHARX file?")
            entry = min(cards, key=lambda e: e.filename.count("/"))  # the one nearest the root
            if entry.file_size > 1 << 20 and entry.file_size > MAX_RATIO * max(entry.compress_size, 1):
                raise ParleyError(f"{origin}: card.json is compressed suspiciously well (a zip bomb?); refusing it.")
            with archive.open(entry) as stream:
                blob = stream.read(MAX_CARD_JSON_BYTES + 1)
            if len(blob) > MAX_CARD_JSON_BYTES:
                raise ParleyError(f"{origin}: card.json is over {MAX_CARD_JSON_BYTES >> 20} MB; refusing it.")
            return blob
    except ParleyError:
        raise
    except _ZIP_ERRORS as exc:
        raise ParleyError(f"{origin}: not a readable CHARX (zip) archive: {exc}.") from exc
