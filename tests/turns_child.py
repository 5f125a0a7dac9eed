"""Child process for test_faults.py: a bounded loop of chat turns on one conversation, started on a signal.

    python -m tests.turns_child MODEL_DIR PERSONAS_DIR CONVERSATION_ID LABEL TURNS GO_FILE

Prints "ready" once the model is loaded, waits (bounded) for GO_FILE to exist, then sends
"LABEL turn i" TURNS times, printing "reply <id>" or "failed <message>" for each.
"""

from __future__ import annotations

import sys
import time

from app import fastblas

fastblas.preload()

from pathlib import Path  # noqa: E402

from app.engine import commands as cmd  # noqa: E402
from app.engine import events as ev  # noqa: E402
from tests.engine_helpers import EngineRunner  # noqa: E402


def main(model_dir: str, personas_dir: str, conversation_id: int, label: str, turns: int, go_file: str) -> None:
    runner = EngineRunner(Path(model_dir), Path(personas_dir))
    runner.until((ev.ModelLoaded, ev.EngineFailed), timeout=120)
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while not Path(go_file).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, turns + 1):
        final, _ = runner.run(cmd.Generate(conversation_id, f"{label} turn {i}"), timeout=300)
        if isinstance(final, ev.EngineFailed):
            print(f"failed {final.message}", flush=True)
        else:
            print(f"reply {final.message_id}", flush=True)
    runner.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])
