"""One exception type for problems a user can fix.

Every layer raises `ParleyError` with a message that names the thing at fault
and what to do about it; the command line prints it and exits non-zero, the app
shows it in a notification. Anything else is a bug and keeps its traceback.
"""


class ParleyError(Exception):
    """A user-facing problem: bad input, a missing file, a full disk."""

    exit_code = 1  # what `parley` exits with; the subclasses below say more


# Exit codes (sysexits.h) so scripts can tell the kinds apart; README "Exit codes" lists them.
class BadInput(ParleyError):
    """Input that can never work as given (not UTF-8, an impossible option value): fix it and retry."""

    exit_code = 65  # EX_DATAERR


class CatalogDamaged(ParleyError):
    """The catalog file has damaged pages: Parley does not write to it until it is recovered."""

    exit_code = 69  # EX_UNAVAILABLE


class StorageFull(ParleyError):
    """The disk holding Parley's data is full: nothing is damaged, free space and retry."""

    exit_code = 74  # EX_IOERR


class StorageReadOnly(ParleyError):
    """Parley's data cannot be written (read-only file system, immutable or read-only file)."""

    exit_code = 77  # EX_NOPERM

