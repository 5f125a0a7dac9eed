"""What a turn does when the world misbehaves: another process on the same conversation, a full or read-only disk.

- Two writers on one conversation *queue*: a turn (user message, prompt, reply) holds an advisory lock on
  that conversation for its whole length (`conversation_lock`), so a second process's turn starts after the
  first one's reply is stored and answers from there: every message stays on the visible path, no two user
  messages in a row. A process that dies releases its lock with it (flock).
- A cache is disposable: a save that fails is a warning (`CacheNotSaved`), never a failed turn.
- A reply the catalog could not store (full disk) is not thrown away: it travels in the failure event
  (`unsaved_reply`), so the command line prints it and the app keeps it on screen.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from app import paths
from app.engine import events as ev
from app.errors import ParleyError

log = logging.getLogger(__name__)
LOCK_WAIT_S = 600.0  # a turn of another process longer than this: give up and say so
LOCK_POLL_S = 0.02


class ReplyNotSaved(ParleyError):
    """The reply was generated but the catalog could not store it; `text` is the reply."""

    def __init__(self, cause: ParleyError, text: str) -> None:
        super().__init__(f"The reply could not be saved: {cause}")
        self.text = text
        self.exit_code = cause.exit_code


def locks_dir() -> Path:
    folder = paths.parley_home() / "locks"
    folder.mkdir(exist_ok=True, mode=0o700)
    return folder


@contextmanager
def conversation_lock(conversation_id: int, wait_s: float = LOCK_WAIT_S, on_wait=None):
    """Hold conversation `conversation_id` for one turn; another process's turn on it waits (a queue).

    `on_wait()` is called once if the lock is busy, so the caller can say why nothing happens yet.
    """
    path = locks_dir() / f"conversation-{int(conversation_id)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait()
                    told = True
                if time.monotonic() > deadline:
                    raise ParleyError(
                        f"Another Parley has been replying in conversation {conversation_id} for over "
                        f"{wait_s:.0f} s; try again when it is done.") from None
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def storage_problem(exc: BaseException) -> ParleyError | None:
    """The true user-facing error for a storage failure on the catalog, or None if `exc` is something else."""
    from app.catalog import health

    if isinstance(exc, ParleyError):
        return exc
    if health.is_storage_error(exc):
        return health.storage_error(exc, _catalog_path())
    return None


def _catalog_path() -> Path:
    """Where the catalog is, without `paths.parley_home()`'s write probe (which fails on the full disk we report)."""
    home = os.environ.get("PARLEY_HOME")
    return (Path(home).expanduser() if home else paths.default_home()) / "catalog.db"


def save_cache(session, key: str, conversation_id: int | None) -> bool:
    """Persist one cache; a failure (full disk, read-only caches/) is a `CacheNotSaved` warning. True if saved."""
    from app.kvstore.pool import CacheWriteFailed

    if key not in session.manager.entries:
        return False
    try:
        session.manager.save(key)
        return True
    except (CacheWriteFailed, sqlite3.Error) as exc:
        log.info("cache %s not saved: %s", key, exc)  # the event tells the user
        session.emit(ev.CacheNotSaved(conversation_id, str(exc)))
        return False
