"""A second `parley chat` start recomputes nothing: no fp32 weight copy for a short turn, no fingerprint hashing;
`parley bench startup` measures that in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

from app.model.cpu_linear import SHORT_ROWS

REPO = Path(__file__).resolve().parents[1]


def chat(model: Path, home: Path, trace: Path, message: str, *options: str) -> tuple[dict, dict]:
    """One `python -m app chat` process: (its JSON reply, its start-up trace)."""
    env = {**os.environ, "PARLEY_HOME": str(home), "PARLEY_STARTUP_TRACE": str(trace)}
    trace.unlink(missing_ok=True)
    command = [sys.executable, "-m", "app", "--model", str(model), "chat", "assistant", message, "--json",
               "--max-tokens", "2", *options]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), json.loads(trace.read_text())


def test_a_short_turn_in_a_new_process_builds_no_fp32_copy_and_hashes_nothing(tiny_model_dir, parley_home, tmp_path):
    trace = tmp_path / "trace.json"
    chat(tiny_model_dir, parley_home, trace, "hi", "--new")  # first start: fingerprints hashed, preamble cached
    memo = parley_home / "models" / "fingerprints.json"
    hashed = memo.stat().st_mtime_ns
    reply, second = chat(tiny_model_dir, parley_home, trace, "hi", "--new")
    assert reply["cache"] == "disk" and reply["prefilled_tokens"] <= SHORT_ROWS  # only the message was prefilled
    assert second["fp32_layers"] == 0  # the 4-bit kernels served it: no weight was expanded
    assert memo.stat().st_mtime_ns == hashed  # the fingerprint came from the memo
    long = " ".join(["word"] * (2 * SHORT_ROWS))
    reply, third = chat(tiny_model_dir, parley_home, trace, long, "--new")
    assert reply["prefilled_tokens"] > SHORT_ROWS and third["fp32_layers"] > 0  # a long prefill does build them


def test_bench_startup_runs_fresh_processes_and_reports_medians(tiny_model_dir, parley_home):
    from app.bench import startup

    result = startup.run(None, Namespace(model=str(tiny_model_dir), rounds=2, quick=False, json=None))
    json.dumps(result)
    assert result["rounds"] == 2 and len(result["samples"]) == 2
    for key in ("wall_s", "ttft_s", "startup_s", "cpu_s", "to_main_s"):
        assert result[key] > 0, key
    assert result["startup_s"] < result["wall_s"]
    assert result["fp32_layers"] == 0 and all(s["cache"] == "disk" for s in result["samples"])
    assert "blas" in result["setup"] and isinstance(result["bytecode_cache"], bool)
    text = startup.report(result)
    assert "wall - ttft" in text and "fp32 weight copies built" in text
