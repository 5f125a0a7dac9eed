"""Scene `@name` handles: who a word after "@" means.

A handle names a member by its id ("@chef"), by any single word of its name ("@Nonna", "@Rosa", "@Reyes"),
or by its whole name written as one word or in words ("@ChefNonnaRosa", "@Chef Nonna Rosa"). Case and
accents do not matter ("@lucia" is Lucía). A word that fits two members names neither.
"""

from __future__ import annotations

import unicodedata


def fold(text: str) -> str:
    """Lower case without accents or punctuation at the ends: "Lucía," -> "lucia", "Dr." -> "dr"."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return plain.lower().strip(".,:;!?()'\"")


def name_keys(persona_id: str, name: str) -> set[str]:
    """Every single word a member answers to."""
    words = [fold(w) for w in name.split() if fold(w)]
    keys = {fold(persona_id), fold(persona_id).replace("-", "").replace("_", ""), "".join(words)}
    keys.update(words)
    return {k for k in keys if k}


def take_handles(text: str, members: list[str], name_of) -> tuple[list[str], str, str | None]:
    """Read the @handles at the start of `text`: (members named, the rest of the text, a bad handle or None).

    Full names in words ("@Chef Nonna Rosa what now?") are matched longest first, so the rest starts after them.
    """
    words = text.strip().split()
    picked: list[str] = []
    i = 0
    while i < len(words) and words[i].startswith("@") and len(words[i]) > 1:
        member, used = _match(words, i, members, name_of)
        if member is None:
            return picked, " ".join(words[i:]), words[i]
        if member not in picked:
            picked.append(member)
        i += used
    rest = text.strip()
    for _ in range(i):  # keep the message's own spacing and line breaks after the handles
        rest = rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else ""
    return picked, rest, None


def _match(words: list[str], i: int, members: list[str], name_of) -> tuple[str | None, int]:
    first = words[i][1:]
    for pid in members:  # the whole name in words, longest first
        name_words = name_of(pid).split()
        n = len(name_words)
        if n > 1 and i + n <= len(words):
            said = [first, *words[i + 1:i + n]]
            if [fold(w) for w in said] == [fold(w) for w in name_words]:
                return pid, n
    wanted = fold(first)
    found = [pid for pid in members if wanted in name_keys(pid, name_of(pid))]
    return (found[0], 1) if len(found) == 1 else (None, 1)


def handle_hint(members: list[str], name_of) -> str:
    """How to name each member, for a message that names no one known."""
    return ", ".join(f"@{fold(name_of(p).split()[-1]) if name_of(p).split() else p}" for p in members)
