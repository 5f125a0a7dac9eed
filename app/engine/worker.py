"""The engine: one long-lived thread that owns the model and every MLX array.

Commands arrive on a queue (`submit`); events leave through one callback,
called on the engine thread. Cancel is out of band: it sets a flag the
generation loop checks between every two steps (prefill chunks and decode
tokens), so a reply stops within one token step.

The transcript in the catalog is the source of truth. The user's message is
written before any model work; the reply is written when it finishes (or is
cancelled); only then is the cache persisted. A cache that fails any check
is dropped and rebuilt from the transcript by prefill.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from typing import Callable

from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.faults import storage_problem
from app.engine.session import Session
from app.errors import ParleyError

log = logging.getLogger(__name__)
EventSink = Callable[[ev.Event], None]


class Engine:
    def __init__(self, on_event: EventSink, model: str | None = None, scheme: str = "q4",
                 budget_mb: float = 512.0, personas_dirs=None, catalog_path=None):
        self._on_event = on_event
        self._options = dict(model=model, scheme=scheme, budget_mb=budget_mb,
                             personas_dirs=personas_dirs, catalog_path=catalog_path)
        self._queue: queue.Queue[cmd.Command] = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="parley-engine", daemon=True)
        self._session: Session | None = None
        self._cancelled_requests: set[str] = set()  # shared with the session: per-request cancel, out of band
        self.ready = threading.Event()
        self.stopped = threading.Event()

    # -- called from any thread -------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, command: cmd.Command) -> None:
        if isinstance(command, cmd.Cancel):
            self._cancel.set()
            return
        if isinstance(command, cmd.CancelCompletion):
            self._cancelled_requests.add(command.request_id)
            return
        self._queue.put(command)

    def cancel(self) -> None:
        self._cancel.set()

    def shutdown(self, timeout: float | None = 30.0, release: bool = True) -> None:
        """Save and stop; `release=False` keeps the model in memory (for a process about to exit: see `_stop`)."""
        self._cancel.set()
        self._queue.put(cmd.Shutdown(release))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self.stopped.wait(timeout)

    def count_tokens(self, text: str) -> int | None:
        """Tokens in `text` by the loaded model's tokenizer, or None before the model is loaded.

        Safe from any thread: it uses only the tokenizer (no MLX), whose encode is thread-safe.
        """
        session = self._session
        if session is None:
            return None
        return len(session.lm.tokenizer.encode(text))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.stopped.is_set()

    # -- the engine thread ----------------------------------------------------
    def _emit(self, event: ev.Event) -> None:
        try:
            self._on_event(event)
        except Exception:  # a broken listener must not kill the engine
            log.exception("event listener failed on %r", event)

    def _run(self) -> None:
        try:
            self._session = Session.open(emit=self._emit, cancelled=self._cancel.is_set, **self._options)
            self._session.cancelled_requests = self._cancelled_requests
            self._session.take_queued = self._take_queued
        except Exception as exc:
            problem = storage_problem(exc)
            if problem is None:
                log.error("engine start failed:\n%s", traceback.format_exc())
                problem = ParleyError(f"The model could not be started: {exc}")
            self._emit(ev.EngineFailed(str(problem), exit_code=problem.exit_code))
        finally:
            self.ready.set()
        while True:
            command = self._queue.get()
            if isinstance(command, cmd.Shutdown):
                self._stop(command.release)
                return
            self._cancel.clear()
            self._handle(command)

    def _take_queued(self, kind: type) -> cmd.Command | None:
        """Take the first queued command of `kind` out of the queue (None if there is none before a Shutdown).

        Lets a running batch of server completions admit requests that arrived meanwhile.
        """
        with self._queue.mutex:
            for i, command in enumerate(self._queue.queue):
                if isinstance(command, cmd.Shutdown):
                    return None
                if isinstance(command, kind):
                    del self._queue.queue[i]
                    return command
        return None

    def _stop(self, release: bool = True) -> None:
        """Save, release the model (unless told not to), then park this thread for good.

        The thread never returns: when a thread that ran MLX work exits, MLX's
        thread-local CPU thread pool is torn down and the process aborts
        ("terminate called without an active exception", seen with mlx 0.32
        on Linux). A parked daemon thread simply ends with the process.
        Without `release` the parked thread keeps the session: freeing the model
        and caches (~20 ms of CPU holding the GIL) would only delay a process
        that exits next (`parley chat`).
        """
        session = self._session
        try:
            if session:
                session.close()
        except Exception:  # returning from here would end this thread, and with it the process (see above)
            log.error("closing the session failed:\n%s", traceback.format_exc())
        finally:
            self._session = None
            if release:
                del session
            self.stopped.set()
        threading.Event().wait()

    def _handle(self, command: cmd.Command) -> None:
        conversation_id = getattr(command, "conversation_id", None)
        if self._session is None:
            self._emit(ev.EngineFailed("The model is not loaded (see the earlier error).", conversation_id))
            return
        try:
            self._session.handle(command)
        except Exception as exc:
            problem = storage_problem(exc)
            if problem is None:
                log.error("command %r failed:\n%s", command, traceback.format_exc())
                problem = ParleyError(f"Internal error while handling {type(command).__name__}: {exc}")
            self._emit(ev.EngineFailed(str(problem), conversation_id, exit_code=problem.exit_code,
                                       unsaved_reply=getattr(problem, "text", None)))
