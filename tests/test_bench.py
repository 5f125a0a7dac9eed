"""The cache benchmark parts run end to end in their smallest form on the tiny model (no timing assertions)."""

from __future__ import annotations

import json
import os
from argparse import Namespace

import pytest

from app.bench import PARTS, get_part, get_table


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from app.model.loader import load_model

    return load_model(str(tiny_model_dir))


def _args(**kw) -> Namespace:
    base = dict(quick=True, json=None, repeats=1, ttft_contexts=(300,), restore_contexts=(300, 1100),
                capacity_context=512, capacity_budget_bytes=64 << 20, save_contexts=(260, 520), save_turns=2,
                agents_personas=2, agents_rounds=2)
    base.update(kw)
    return Namespace(**base)


def _check(part: str, result: dict, keys: set[str]) -> None:
    assert keys <= set(result), (part, set(result))
    json.dumps(result)  # JSON-serialisable
    text = get_table(part)(result)
    assert text.strip()


def test_parts_registered():
    assert {"ttft", "restore", "capacity", "save", "agents", "peer"} <= set(PARTS)


def test_ttft(tiny_lm, parley_home):
    result = get_part("ttft")(tiny_lm, _args())
    _check("ttft", result, {"rows", "repeats", "scheme"})
    row = result["rows"][0]
    assert {"context_tokens", "cold_ms", "warm_ms", "warm_pagecache_ms", "hot_ms", "speedup_warm", "speedup_hot"} <= set(row)
    assert row["context_tokens"] <= 300 and row["cached_tokens"] < row["context_tokens"]
    assert row["reused_tokens"]["cold"] == 0 and row["reused_tokens"]["warm"] == row["cached_tokens"]
    assert os.environ["PARLEY_HOME"] == str(parley_home)  # the temporary home was undone
    assert not (parley_home / "caches").exists()  # nothing written to the (test's) PARLEY_HOME


def test_restore(tiny_lm):
    result = get_part("restore")(tiny_lm, _args())
    _check("restore", result, {"rows", "target_restore_over_raw"})
    assert {"raw_read_disk_ms", "restore_disk_ms", "restore_over_raw_disk", "reprefill_ms", "stored_bytes"} <= set(result["rows"][0])


def test_capacity(tiny_lm):
    result = get_part("capacity")(tiny_lm, _args())
    _check("capacity", result, {"rows", "budget_bytes", "context_tokens"})
    by = {r["scheme"]: r for r in result["rows"]}
    assert {"q4", "k8v4", "q8", "f16"} <= set(by)
    assert by["q4"]["idle_bytes"] < by["q8"]["idle_bytes"] < by["f16"]["idle_bytes"]
    assert by["q4"]["fit_idle"] >= by["f16"]["fit_idle"]


def test_save(tiny_lm):
    result = get_part("save")(tiny_lm, _args())
    _check("save", result, {"rows", "ms_ratio_largest_to_smallest", "bytes_ratio_largest_to_smallest"})
    assert all(r["turns"] == 2 and len(r["per_turn"]) == 2 for r in result["rows"])


def test_agents(tiny_lm):
    result = get_part("agents")(tiny_lm, _args())
    _check("agents", result, {"modes", "budget_bytes", "personas", "rounds"})
    assert set(result["modes"]) == {"persistence", "persistence_all_ram", "reprefill"}
    assert result["modes"]["persistence"]["turns"] == 4
    assert result["modes"]["persistence"]["cache_sources"]["none"] >= 2  # round 1 is cold


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from app.bench.plot import write

    results = {
        "capacity": {"context_tokens": 512, "budget_bytes": 1 << 30, "rows": [{"scheme": "q4", "fit_idle": 3}, {"scheme": "f16", "fit_idle": 1}]},
        "save": {"rows": [{"context_tokens": 1024, "turn_ms_median": 3.0, "first_save_ms": 9.0}]},
    }
    path = write(results, tmp_path / "b.png")
    assert path and path.stat().st_size > 1000


def test_memory(tiny_lm):
    result = get_part("memory")(tiny_lm, _args(memory_turns=40, window=None))
    _check("memory", result, {"parley", "at_depth", "at_depth_sliding", "overflow_turns", "per_turn"})
    assert len(result["overflow_turns"]) == 1 and result["lore_turns"]  # the window is chosen for one overflow
    per = result["per_turn"]
    after = [r for r in per if r["turn"] > result["overflow_turns"][0]]
    # after the drop Parley appends again; the at-depth figures are computed from the same transcript
    assert all(r["prefilled"] < 400 for r in after)
    assert result["at_depth_sliding"]["total"] > result["parley"]["total"]


def test_serve(tiny_model_dir, tiny_lm, parley_home):
    """K clients against a live server, fresh and after a restart: the restart turn's prompt comes from disk."""
    result = get_part("serve")(tiny_lm, _args(model=str(tiny_model_dir), serve_clients=(2,)))
    _check("serve", result, {"k2_fresh_ttft_ms", "k2_restart_cached_tokens", "k2_fresh_aggregate_tps"})
    assert result["k2_fresh_turns"] == 4 and result["k2_restart_turns"] == 2
    assert result["k2_restart_cached_tokens"] > result["k2_fresh_cached_tokens"] > 0


def test_bench_serve_takes_the_client_counts_from_the_command_line():
    from app.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--clients", "1", "4"])
    assert args.parts == ["serve"] and args.serve_clients == [1, 4]
