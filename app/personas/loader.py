"""Finding, loading and saving persona files.

Shipped personas live in the repository's `personas/` folder, the user's in
`$PARLEY_HOME/personas/`; a user file with a shipped persona's id replaces
it. A broken file never stops the others: it becomes a line in `problems`.
Files are read afresh on every load, so an edit takes effect next time.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ParleyError
from app.personas.model import Persona, unique_id
from app.personas.tomlfile import dump_persona_toml, parse_persona_toml


@dataclass
class LoadResult:
    personas: dict[str, Persona] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def shipped_personas_dir() -> Path:
    """`personas/` at the repository root (this package lives at app/personas, installed editable)."""
    return Path(__file__).resolve().parents[2] / "personas"


def default_dirs() -> list[Path]:
    from app.paths import user_personas_dir

    return [shipped_personas_dir(), user_personas_dir()]


def load_persona_file(path: Path) -> tuple[Persona, list[str]]:
    """One file; raises ParleyError naming the file and field."""
    data = read_regular_file(path)
    return parse_persona_toml(data, str(path), default_id=path.stem, source=path)


def read_regular_file(path: Path) -> bytes:
    """A persona file's bytes; anything but a regular file (a named pipe, a folder, a device) is refused.

    Opened non-blocking and checked on the open descriptor: a named pipe called x.toml would
    otherwise block every command that lists personas until something writes to it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ParleyError(f"{path}: cannot be read ({exc.strerror or exc}); it was skipped. Fix or remove it.") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ParleyError(
                f"{path}: is not a regular file ({_kind(mode)}); it was skipped. Remove it or replace it with a "
                "persona file."
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise ParleyError(f"{path}: cannot be read ({exc.strerror or exc}); it was skipped. Fix or remove it.") from exc
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def load_personas(dirs: Iterable[Path | str] | None = None) -> LoadResult:
    """Every `*.toml` in `dirs` (default: shipped, then user); later folders override earlier ones by id."""
    result = LoadResult()
    for directory in default_dirs() if dirs is None else [Path(d) for d in dirs]:
        if not directory.is_dir():
            continue
        seen_here: dict[str, Path] = {}
        for path in sorted(directory.glob("*.toml")):
            try:
                persona, warnings = load_persona_file(path)
            except ParleyError as exc:
                result.problems.append(str(exc))
                continue
            result.problems.extend(warnings)
            if persona.id in seen_here:
                result.problems.append(
                    f"{path}: field 'id' is {persona.id!r}, already used by {seen_here[persona.id].name} in the "
                    "same folder; this file was skipped. Give it another id."
                )
                continue
            seen_here[persona.id] = path
            result.personas[persona.id] = persona
    return _with_global_user(result)


def _with_global_user(result: LoadResult) -> LoadResult:
    """Every persona learns the global user profile (a broken profile file is a problem, not a failure)."""
    import dataclasses

    from app.paths import user_profile_path
    from app.personas.user import read_profile

    try:
        profile = read_profile(user_profile_path())
    except ParleyError as exc:
        result.problems.append(str(exc))
        return result
    result.personas = {k: dataclasses.replace(p, global_user=profile) for k, p in result.personas.items()}
    return result


def save_persona(persona: Persona, directory: Path | str | None = None) -> Path:
    """Write `<id>.toml` in the user folder (atomically: a crash never leaves half a file)."""
    if directory is None:
        from app.paths import user_personas_dir

        directory = user_personas_dir()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{persona.id}.toml"
    text = dump_persona_toml(persona)
    fd, tmp = tempfile.mkstemp(prefix=f".{persona.id}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ParleyError(f"Cannot save persona {persona.id!r} to {target}: {exc.strerror or exc}.") from exc
    return target


def new_persona_id(name: str, dirs: Iterable[Path | str] | None = None) -> str:
    """A fresh id from `name` that clashes with no loaded persona and no file in the user folder."""
    dirs = default_dirs() if dirs is None else [Path(d) for d in dirs]
    taken = set(load_personas(dirs).personas)
    for directory in dirs:
        if directory.is_dir():
            taken |= {p.stem for p in directory.glob("*.toml")}
    return unique_id(name, taken)
