"""Child process for test_crash: chat turns in a loop until killed.

Prints "saved <message id>" after each message reaches the catalog, so the
parent knows what must survive a SIGKILL.
"""

from __future__ import annotations

import sys

from app import fastblas

fastblas.preload()

from pathlib import Path  # noqa: E402

from app.engine import commands as cmd  # noqa: E402
from app.engine import events as ev  # noqa: E402
from tests.engine_helpers import EngineRunner  # noqa: E402


def main(model_dir: str, personas_dir: str, conversation_id: int) -> None:
    runner = EngineRunner(Path(model_dir), Path(personas_dir))
    turn = 0
    while True:
        turn += 1
        runner.engine.submit(cmd.Generate(conversation_id, f"turn {turn} " + "word " * 40))
        while True:
            event = runner.until((ev.MessageSaved, ev.ReplyFinished, ev.EngineFailed))
            if isinstance(event, ev.MessageSaved):
                print(f"saved {event.message_id}", flush=True)
            elif isinstance(event, ev.EngineFailed):
                print(f"failed {event.message}", flush=True)
                sys.exit(2)
            else:
                break


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
