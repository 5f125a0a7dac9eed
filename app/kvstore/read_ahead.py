"""Run file reads on a helper thread, in order, while the caller works on earlier results.

Restoring a cache is read + verify (disk, CRC-32: both release the GIL) then
decode (a C call through ctypes: releases the GIL too). Done one after the
other on one thread they add up; with the reads one step ahead on a second
thread they overlap, and a restore costs about the read alone.

The helper thread never touches MLX or SQLite (both belong to the engine
thread): its jobs only read files into host memory and check them. A job's
exception is handed to the caller at that job's place in the order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class ReadAhead(Iterator[T]):
    """Each job's result in order; the jobs run on one helper thread, up to `depth` ahead.

    `hint` runs on the helper right after the first job, its result ignored: a
    readahead hint to the kernel can take milliseconds, and the caller should
    not wait for it before it has the first result to work on.
    `close()` (also on leaving a `with` block) tells the helper to stop after its
    current job and waits for it.
    """

    def __init__(self, jobs: list[Callable[[], T]], hint: Callable[[], object] | None = None, depth: int = 64):
        self._results: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._jobs, self._hint = jobs, hint
        self._thread = threading.Thread(target=self._run, name="parley-read-ahead", daemon=True)
        self._thread.start()

    @property
    def finished(self) -> bool:
        """Whether the helper has read everything (so the second core is free for the caller)."""
        return not self._thread.is_alive()

    def _run(self) -> None:
        for i, job in enumerate(self._jobs):
            if self._stop.is_set():
                break
            try:
                self._results.put((True, job()))
                if i == 0 and self._hint is not None:
                    self._hint()
            except BaseException as exc:  # handed to the caller, in order
                self._results.put((False, exc))
                break
        self._results.put((True, _DONE))

    def __next__(self) -> T:
        ok, value = self._results.get()
        if value is _DONE:
            self._results.put((True, _DONE))  # stays exhausted
            raise StopIteration
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a helper waiting on a full queue, then let it finish
            try:
                self._results.get(timeout=0.05)
            except queue.Empty:
                pass

    def __enter__(self) -> "ReadAhead[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
