"""Drive a real Engine (tiny model) from tests: submit a command, wait for its events."""

from __future__ import annotations

import queue
import time
from pathlib import Path

from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.worker import Engine

TEST_PERSONA = """
id = "{id}"
name = "{name}"
description = "A test persona"
system_prompt = "You are {name}, a terse test persona."
greetings = ["Hello from {name}."]
color = "#336699"

[sampling]
temperature = 0.0
top_p = 1.0
max_tokens = {max_tokens}
"""


def write_persona(folder: Path, persona_id: str, max_tokens: int = 6, name: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = TEST_PERSONA.format(id=persona_id, name=name or persona_id.title(), max_tokens=max_tokens)
    (folder / f"{persona_id}.toml").write_text(text)


class EngineRunner:
    """An Engine plus a queue of its events, with blocking helpers for tests."""

    def __init__(self, model_dir: Path, personas_dir: Path, budget_mb: float = 512, scheme: str = "q4"):
        self.events: queue.Queue = queue.Queue()
        self.seen: list[ev.Event] = []
        self.cancel_at: type | None = None  # cancel the moment the engine emits this kind of event (see _event)
        self.engine = Engine(self._event, model=str(model_dir), scheme=scheme, budget_mb=budget_mb,
                             personas_dirs=[personas_dir]).start()

    def _event(self, event: ev.Event) -> None:
        """On the engine thread. `cancel_at` cancels right there, before the engine takes its next step: a test
        thread that cancels after reading the event may run much later on a loaded machine."""
        self.events.put(event)
        if self.cancel_at is not None and isinstance(event, self.cancel_at):
            self.cancel_at = None
            self.engine.cancel()

    def until(self, kinds, timeout: float = 60.0) -> ev.Event:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            self.seen.append(event)
            if isinstance(event, kinds):
                return event

    def run(self, command: cmd.Command, timeout: float = 60.0):
        """Submit and wait for the reply (or failure); returns the final event."""
        start = len(self.seen)
        self.engine.submit(command)
        final = self.until((ev.ReplyFinished, ev.EngineFailed), timeout)
        return final, self.seen[start:]

    def close(self) -> None:
        self.engine.shutdown()


def teacher_forced_logits(lm, prompt: list[int], forced: list[int], chunk: int) -> list:
    """The engine's path as numpy rows: `prefill` in chunks (last position's logits only), then one
    model call per forced token; compared with mlx-lm's own model by the architecture and GGUF tests."""
    import mlx.core as mx
    import numpy as np

    from app.engine.generation import prefill
    from app.kvstore.conversation_cache import ConversationCache
    from app.kvstore.schemes import get_scheme

    cache = ConversationCache.empty(lm.n_layers, get_scheme("f16"), lm.fingerprint)
    logits = None
    for step in prefill(lm.model, cache, prompt, chunk=chunk):
        logits = step.logits
    out = [logits[0]]
    for t in forced:
        out.append(lm.model(mx.array([[t]]), cache=cache.layers)[0, -1])
        cache.appended([t])
    return [np.array(o) for o in out]
