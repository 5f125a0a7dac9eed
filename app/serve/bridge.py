"""The server's side of the engine: one `Engine` thread, events routed to the request that asked.

The engine calls back on its own thread; each event that names a request is
handed to that request's asyncio queue on the server's event loop
(`call_soon_threadsafe`). Requests queue to the one engine thread in arrival
order; the event loop itself never waits on the engine, so /health and the
tokenizer endpoints answer while a reply is being generated.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.engine import commands as cmd
from app.engine import events as ev


@dataclass(frozen=True)
class ModelInfo:
    name: str
    folder: str
    fingerprint: str
    context_window: int
    scheme: str


class EngineBridge:
    def __init__(self, model: str | None = None, scheme: str = "q4", budget_mb: float = 512.0):
        from app.engine.worker import Engine

        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.engine = Engine(self._on_event, model=model, scheme=scheme, budget_mb=budget_mb)
        self.model: ModelInfo | None = None
        self.tokenizer = None
        self.failure: str | None = None
        self.ready = False
        self._counts = {"finished": 0, "cancelled": 0, "failed": 0, "last_cancelled_after_tokens": None}

    def counters(self) -> dict:
        """Requests finished, cancelled (client gone) and failed since start: /health reports them."""
        with self._lock:
            return dict(self._counts)

    async def start(self) -> None:
        """Start the engine thread and wait (off the event loop) until its model is loaded and described."""
        self.engine.start()
        await asyncio.to_thread(self.engine.ready.wait)
        if self.failure:
            return
        request_id = uuid.uuid4().hex
        events = self.subscribe(request_id)
        self.engine.submit(cmd.DescribeModel(request_id))
        try:
            described = await events.get()
        finally:
            self.unsubscribe(request_id)
        if isinstance(described, ev.ModelDescribed):
            from app.model.chat_tokenizer import ChatTokenizer

            self.model = ModelInfo(described.name, described.folder, described.fingerprint, described.context_window,
                                   described.scheme)
            self.tokenizer = ChatTokenizer(Path(described.folder))
            self.ready = True
        else:
            self.failure = getattr(described, "message", "the model could not be described")

    async def stop(self) -> None:
        """Finish the running step, save every cache, stop the engine."""
        await asyncio.to_thread(self.engine.shutdown, 60.0)

    # -- per request ---------------------------------------------------------------
    def subscribe(self, request_id: str) -> asyncio.Queue:
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers[request_id] = (asyncio.get_running_loop(), events)
        return events

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._subscribers.pop(request_id, None)

    def submit(self, command: cmd.Command) -> None:
        self.engine.submit(command)

    def cancel(self, request_id: str) -> None:
        self.engine.submit(cmd.CancelCompletion(request_id))

    # -- the engine thread ----------------------------------------------------------
    def _on_event(self, event: ev.Event) -> None:
        request_id = getattr(event, "request_id", None)
        if request_id is None:
            if isinstance(event, ev.EngineFailed) and not self.engine.ready.is_set():
                self.failure = event.message
            return
        with self._lock:
            self._count(event)
            target = self._subscribers.get(request_id)
        if target is not None:
            loop, events = target
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

    def _count(self, event: ev.Event) -> None:
        if isinstance(event, ev.CompletionFinished) and event.finish_reason == "cancelled":
            self._counts["cancelled"] += 1
            self._counts["last_cancelled_after_tokens"] = event.generated_tokens
        elif isinstance(event, ev.CompletionFinished) and event.index == 0:
            self._counts["finished"] += 1
        elif isinstance(event, ev.CompletionFailed):
            self._counts["cancelled" if "cancelled" in event.message else "failed"] += 1
