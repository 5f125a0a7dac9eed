"""Where Parley keeps user data.

`PARLEY_HOME` moves everything (catalog, caches, converted models, user
personas); without it Parley uses the platform's user data folder. Tests set
it to a temporary folder so no test touches a real home.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from app.errors import ParleyError


def default_home() -> Path:
    """Where user data lives when PARLEY_HOME is not set (the platform's usual place)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "parley"
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", Path.home())) / "parley"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "parley"


def parley_home() -> Path:
    """The user data folder, created on first use, readable by its owner only."""
    home = Path(os.environ.get("PARLEY_HOME") or default_home()).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        # a probe name of its own: the engine thread and the UI may check at the same moment
        probe = home / f".write-test-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ParleyError(
            f"Cannot write to the Parley data folder {home}: {exc.strerror or exc}. "
            "Set PARLEY_HOME to a folder you can write to."
        ) from exc
    return home


def models_dir() -> Path:
    return _subdir("models")


def caches_dir() -> Path:
    return _subdir("caches")


def user_personas_dir() -> Path:
    return _subdir("personas")


def user_profile_path() -> Path:
    """Your global persona (name, description), see app.personas.user."""
    return parley_home() / "user.toml"


def catalog_path() -> Path:
    return parley_home() / "catalog.db"


def _subdir(name: str) -> Path:
    path = parley_home() / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
