"""`python -m app.bench.rss` measures the lean CPU path as `parley` runs it: with the BLAS `parley` preloads.

Without the preload the measuring process ran every prefill matmul on the reference BLAS (minutes for the
0.5B model's 512-token prefill), which is not the process whose memory the figure claims to describe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import fastblas


def test_rss_bench_measures_with_parleys_blas_and_within_budget(tiny_model_dir):
    if fastblas.loaded is None:
        pytest.skip("no optimized BLAS on this machine: nothing for the bench to preload")
    env = {**os.environ, "PARLEY_LEAN_MB": "0"}  # the tiny model is lean too
    out = subprocess.run([sys.executable, "-m", "app.bench.rss", "--folder", str(tiny_model_dir), "--prefill", "40",
                          "--decode", "3"], capture_output=True, text=True, check=True, env=env, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blas"] == Path(fastblas.loaded).name
    assert 0 < result["peak_rss_mb"] <= result["budget_mb"]
    assert result["kv_working_copy_mb"] > 0 and result["prefill_tps"] > 0


def test_rss_bench_reports_its_own_peak_not_its_parents(tiny_model_dir):
    """The bench runs the measurement in a child of a process that has just built a 0.5B model; the child's
    figure must not include the parent's memory (getrusage's ru_maxrss carries it across fork and exec)."""
    import numpy as np

    parent = np.ones(1200 * 2**20, dtype=np.uint8)  # 1.2 GB resident in this (the parent) process
    env = {**os.environ, "PARLEY_LEAN_MB": "0"}
    out = subprocess.run([sys.executable, "-m", "app.bench.rss", "--folder", str(tiny_model_dir), "--prefill", "16",
                          "--decode", "2"], capture_output=True, text=True, check=True, env=env, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert parent.sum() == parent.size
    assert result["peak_rss_mb"] < 800
