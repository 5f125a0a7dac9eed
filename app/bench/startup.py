"""`parley bench startup`: `parley chat` start-up and exit, in fresh processes (a minute, not peer's many).

Runs `parley chat assistant hi --new --max-tokens 1 --json` in a new process `--rounds` times (default 5; 3 with
`--quick`) under one temporary PARLEY_HOME, after one first start there that converts the model and stores
the persona's preamble cache (what a user's second start finds). Prints the medians of

- wall: the process from launch to exit;
- ttft: the turn's own time to first token (`ttft_ms - queued_ms`: from the moment the model is up);
- wall - ttft: start-up and exit, the figure `parley bench peer` compares with llama.cpp;
- model load: `queued_ms` (the message waited that long for the model);
- launch to main: the interpreter and the imports before `app.cli.main` runs;
- command done to process gone: the exit (`parley chat` ends with `os._exit`);
- CPU time: user + system seconds of the whole process (less sensitive than wall times to other work
  sharing the cores; the turn included);

and records what was active: the child's fp32 weight copies built (`app.model.cpu_linear`), whether Python
could use its bytecode cache (`PYTHONDONTWRITEBYTECODE` makes every start compile Parley's modules again), the
kernels, CPU and BLAS. The child reports its own moments through `PARLEY_STARTUP_TRACE` (`app.cli`).
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

from app.bench import common
from app.bench.peer import ParleyHalf, turn_ttft_s

ROUNDS = 5
FIGURES = (("wall_s", "wall"), ("ttft_s", "ttft (the turn's own)"), ("startup_s", "wall - ttft (start-up and exit)"),
           ("load_s", "model load (queued_ms)"), ("to_main_s", "launch to app.cli.main"),
           ("after_done_s", "command done to process gone"),
           ("cpu_s", "CPU time of the whole process (user + system)"), ("fp32_layers", "fp32 weight copies built"))


def run(lm, args) -> dict:
    """The part's entry point (`lm` is not used: every measurement loads the model in its own process)."""
    rounds = max(1, int(getattr(args, "rounds", None) or (3 if common.quick(args) else ROUNDS)))
    samples: list[dict] = []
    with common.temp_home(prefix="parley-startup-") as home, tempfile.TemporaryDirectory() as tmp:
        half = TracedHalf(home, getattr(args, "model", None), Path(tmp) / "trace.json")
        half.warm_up()
        for r in range(rounds):
            samples.append(half.one_start())
            common.log(args, f"  startup round {r + 1}/{rounds}: wall {samples[-1]['wall_s']:.2f} s, "
                             f"wall - ttft {samples[-1]['startup_s']:.2f} s")
    medians = {key: round(common.median([s[key] for s in samples]), 3) for key, _ in FIGURES}
    return {"rounds": rounds, **medians, "samples": samples,
            "bytecode_cache": not os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "setup": common.machine()}


class TracedHalf(ParleyHalf):
    """`parley chat` in fresh processes that write their start-up moments to a trace file."""

    def __init__(self, home: Path, model: str | None, trace: Path):
        super().__init__(home, model, decode=1)
        self.trace = trace

    def chat(self, message: str, *options: str):
        os.environ["PARLEY_STARTUP_TRACE"] = str(self.trace)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            self.launched = time.time()
            return super().chat(message, *options)
        finally:
            os.environ.pop("PARLEY_STARTUP_TRACE", None)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def one_start(self) -> dict:
        self.trace.unlink(missing_ok=True)
        reply, wall = self.chat("hi", "--new", "--max-tokens", "1")
        trace = json.loads(self.trace.read_text()) if self.trace.is_file() else {}
        ttft = turn_ttft_s(reply)
        return {"wall_s": round(wall, 4), "ttft_s": round(ttft, 4), "startup_s": round(wall - ttft, 4),
                "cpu_s": round(self.cpu_s, 4),
                "load_s": round(reply.get("queued_ms", 0.0) / 1000, 4),
                "to_main_s": round(trace.get("main_at", self.launched) - self.launched, 4),
                "after_done_s": round(self.launched + wall - trace.get("done_at", self.launched + wall), 4),
                "fp32_layers": trace.get("fp32_layers", -1), "prefilled_tokens": reply["prefilled_tokens"],
                "cache": reply["cache"]}


def report(result: dict) -> str:
    rows = [[label, common.fmt(float(result[key]))] for key, label in FIGURES]
    rows.append(["Python bytecode cache", "used" if result["bytecode_cache"] else "off (PYTHONDONTWRITEBYTECODE)"])
    title = f"`parley chat` start-up in fresh processes: medians of {result['rounds']} (seconds)"
    return common.table(["figure", "median"], rows, title)

