"""Just enough PNG for character cards: read text chunks, write a small solid image with text.

Parsed by hand (struct + zlib) so a card never goes near an image library:
we only need the `chara`/`ccv3` text chunks, and every length is checked
against the data we actually have before it is trusted.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from app.errors import ParleyError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_BYTES = 200 * 1024 * 1024  # one decompressed text chunk


def iter_chunks(data: bytes, origin: str) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) for each chunk up to IEND; ParleyError on anything malformed."""
    if not data.startswith(SIGNATURE):
        raise ParleyError(f"{origin}: not a PNG file (bad signature).")
    pos, n = len(SIGNATURE), len(data)
    while pos < n:
        if pos + 12 > n:
            raise ParleyError(f"{origin}: PNG is truncated (chunk header at byte {pos}).")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n:
            raise ParleyError(f"{origin}: PNG chunk {kind!r} at byte {pos} runs past the end of the file.")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + body) != crc:
            raise ParleyError(f"{origin}: PNG chunk {kind!r} at byte {pos} is corrupt (CRC mismatch).")
        yield kind, body
        if kind == b"IEND":
            return
        pos = end


def _inflate(blob: bytes, origin: str, keyword: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(blob, MAX_TEXT_BYTES + 1)
    except zlib.error as exc:
        raise ParleyError(f"{origin}: PNG text chunk '{keyword}' is not valid compressed data ({exc}).") from exc
    if len(out) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise ParleyError(f"{origin}: PNG text chunk '{keyword}' expands past {MAX_TEXT_BYTES >> 20} MB; refusing it.")
    return out


def text_chunks(data: bytes, origin: str) -> dict[str, str]:
    """Keyword -> text of the tEXt, zTXt and iTXt chunks (the first of each keyword wins)."""
    found: dict[str, str] = {}
    for kind, body in iter_chunks(data, origin):
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or b"\x00" not in body:
            continue
        raw_key, rest = body.split(b"\x00", 1)
        keyword = raw_key.decode("latin-1")
        if keyword in found:
            continue
        if kind == b"tEXt":
            found[keyword] = rest.decode("latin-1")
        elif kind == b"zTXt":
            if not rest or rest[0] != 0:
                raise ParleyError(f"{origin}: PNG text chunk '{keyword}' uses an unknown compression method.")
            found[keyword] = _inflate(rest[1:], origin, keyword).decode("latin-1")
        else:  # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
            if len(rest) < 2 or rest[2:].count(b"\x00") < 2:
                raise ParleyError(f"{origin}: PNG text chunk '{keyword}' is malformed (iTXt header).")
            flag, method = rest[0], rest[1]
            text = rest[2:].split(b"\x00", 2)[2]
            if flag:
                if method != 0:
                    raise ParleyError(f"{origin}: PNG text chunk '{keyword}' uses an unknown compression method.")
                text = _inflate(text, origin, keyword)
            try:
                found[keyword] = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ParleyError(f"{origin}: PNG text chunk '{keyword}' is not UTF-8 text.") from exc
    return found


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def solid_png(color: str, size: int = 64, texts: dict[str, str] | None = None) -> bytes:
    """A `size`x`size` RGB square of `color` ('#rrggbb') with Latin-1 tEXt chunks."""
    rgb = bytes.fromhex(color.lstrip("#"))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    pixels = zlib.compress((b"\x00" + rgb * size) * size, 9)
    chunks = [_chunk(b"IHDR", header)]
    for keyword, text in (texts or {}).items():
        chunks.append(_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1")))
    chunks += [_chunk(b"IDAT", pixels), _chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(chunks)
