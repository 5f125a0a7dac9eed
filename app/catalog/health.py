"""The catalog's health: private permissions, a quick integrity check, a backup copy, true error messages.

The catalog holds every conversation, so three rules:
- it is readable by its owner only (0600, with its -wal and -shm), tightened if an older Parley left it wider;
- a damaged file is found at start-up (`PRAGMA quick_check`, once per process) and never written to
  afterwards: the user is told how to recover (SQLite's `.recover`, or the backup Parley keeps);
- SQLite's errors become messages that say what really happened: a full disk is not a damaged catalog,
  and advice to move the file aside is given only when the file is damaged.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

from app.errors import CatalogDamaged, ParleyError, StorageFull, StorageReadOnly

BACKUP_EVERY_S = 24 * 3600  # the backup is refreshed at start-up when older than this
LOW_SPACE_BYTES = 1024 * 1024  # less free than this on the catalog's disk: call it full
SIDE_FILES = ("-wal", "-shm")
_checked: set[str] = set()
_checked_lock = threading.Lock()


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".backup")


# -- permissions ------------------------------------------------------------------------

def create_private(path: Path) -> None:
    """Create the catalog file 0600 before SQLite does (SQLite gives -wal/-shm the file's own mode)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        pass  # SQLite reports it with its own words when it opens the file


def tighten(path: Path) -> None:
    """Owner-only permissions on the catalog and its side files (an older Parley made them 0644)."""
    for p in (path, *(Path(f"{path}{s}") for s in SIDE_FILES), backup_path(path)):
        try:
            mode = p.stat().st_mode
            if stat.S_ISREG(mode) and mode & 0o077:
                os.chmod(p, stat.S_IMODE(mode) & 0o600)
        except OSError:
            pass  # missing, or not ours to change: nothing better to do here


# -- integrity -------------------------------------------------------------------------

def check_once(conn: sqlite3.Connection, path: Path, force: bool = False) -> bool:
    """At the first open in this process (or when `force`d, as the app's start does): a quick integrity check.

    A damaged catalog raises `CatalogDamaged`. Returns True when it checked now.
    """
    key = str(path.resolve())
    with _checked_lock:
        if key in _checked and not force:
            return False
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise damaged(path, str(exc)) from exc
        raise
    if rows != ["ok"]:
        raise damaged(path, "; ".join(str(r) for r in rows[:3]))
    with _checked_lock:
        _checked.add(key)
    return True


def is_damage(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


def damaged(path: Path, detail: str) -> CatalogDamaged:
    backup = backup_path(path)
    steps = []
    if backup.is_file():
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(backup.stat().st_mtime))
        steps.append(f"  - put back the copy Parley keeps: {backup} (from {stamp}; newer messages are not in it):"
                     f" mv {path} {path}.damaged && cp {backup} {path}")
    steps.append(f"  - {'or ' if steps else ''}rescue what SQLite can still read (the sqlite3 shell, 3.29 or later):"
                 f" sqlite3 {path} .recover | sqlite3 {path}.recovered && mv {path} {path}.damaged && "
                 f"mv {path}.recovered {path}")
    return CatalogDamaged(
        f"The catalog {path} is damaged ({detail}). Parley will not write to it, so nothing more is lost.\n"
        "To recover, quit every Parley, then:\n" + "\n".join(steps) +
        "\nCaches are rebuilt from the transcript on their own."
    )


def keep_backup(conn: sqlite3.Connection, path: Path) -> None:
    """After a clean check: refresh `catalog.db.backup` (SQLite's online backup) when it is missing or a day old.

    A failure here (full disk) is not the user's concern at start-up: the old backup stays.
    """
    target = backup_path(path)
    try:
        if target.is_file() and time.time() - target.stat().st_mtime < BACKUP_EVERY_S:
            return
        tmp = target.with_name(f".{target.name}-{os.getpid()}-{os.urandom(4).hex()}")
        create_private(tmp)
        try:
            dest = sqlite3.connect(str(tmp))
            try:
                conn.backup(dest)
                dest.execute("PRAGMA journal_mode = DELETE")
            finally:
                dest.close()
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except (OSError, sqlite3.Error):
        pass


# -- true messages ---------------------------------------------------------------------------

def check_writable(path: Path) -> None:
    """Refuse at open a catalog SQLite could open only read-only (read-only file or file system, immutable file).

    The kernel's own answer (access(2) says EROFS or EPERM for those, even to root), so no write lock is taken:
    opening stays cheap while other threads and processes write.
    """
    if path.exists() and not os.access(path, os.W_OK):
        raise read_only(path, "the file cannot be opened for writing")


def read_only(path: Path, detail: str) -> StorageReadOnly:
    return StorageReadOnly(
        f"The catalog {path} cannot be written ({detail}): the file, its folder or the disk is read-only "
        "(or the file is immutable: lsattr shows 'i'). Make them writable (chmod u+w, chattr -i, remount), "
        "or set PARLEY_HOME to a folder you can write to. The catalog itself is fine."
    )


def free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full(where: Path, detail: str) -> StorageFull:
    free = free_bytes(where)
    left = f"{free // 1024} KB free" if free is not None else "no space left"
    return StorageFull(
        f"The disk holding {where} is full ({left}; {detail}). Free some space and try again: "
        "nothing is damaged, and your conversations are all still there."
    )


def storage_error(exc: BaseException, path: Path) -> ParleyError:
    """The true `ParleyError` for a SQLite or OS error on the catalog at `path`."""
    text = str(exc).lower()
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "disk is full" in text or "no space" in text:
        return disk_full(path.parent, str(exc))
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text:
        return read_only(path, str(exc))
    if is_damage(exc):
        return damaged(path, str(exc))
    free = free_bytes(path.parent)
    if free is not None and free < LOW_SPACE_BYTES:
        return disk_full(path.parent, str(exc))
    return ParleyError(
        f"The catalog {path} could not be read or written ({exc}). Check the disk (free space, errors in the "
        "system log) and try again; the file itself was not found to be damaged, so do not move it aside."
    )


def is_storage_error(exc: BaseException) -> bool:
    """SQLite or OS errors that mean the storage failed (not a bug in Parley)."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(w in text for w in ("disk", "full", "readonly", "read-only", "i/o", "malformed", "not a database"))
    if isinstance(exc, sqlite3.DatabaseError):
        return is_damage(exc)
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO)


__all__ = ["backup_path", "check_once", "check_writable", "create_private", "damaged", "disk_full", "free_bytes",
           "is_storage_error", "keep_backup", "read_only", "storage_error", "tighten"]
