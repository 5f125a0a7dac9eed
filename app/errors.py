"""One exception type for problems a user can fix.

Every layer raises `ParleyError` with a message that names the thing at fault
and what to do about it; the command line prints it and exits non-zero, the app
shows it in a notification. Anything else is a bug and keeps its traceback.
"""


class ParleyError(Exception):
    """A user-facing problem: bad input, a missing file, a full disk."""
