"""`parley doctor` and `parley bench --json` report the same compute setup (app/diagnostics.py)."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from app.model import cpu_kernels


def test_doctor_prints_kernels_cpu_blas_device_and_versions(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    for label in ("parley", "python", "mlx", "mlx-lm", "instruction sets", "mlx device", "blas", "kernels"):
        assert any(line.startswith(label + " ") for line in text.splitlines()), label
    variant = cpu_kernels.active_variant()
    kernels_line = next(line for line in text.splitlines() if line.startswith("kernels "))
    assert (f"{variant} variant" in kernels_line) if variant else ("not built" in kernels_line or "off" in kernels_line)
    if variant:
        threads = cpu_kernels.threads()
        assert f", {threads} thread{'s' if threads != 1 else ''} (PARLEY_THREADS)" in kernels_line


def test_doctor_json_is_what_bench_writes(capsys, tiny_model_dir, tmp_path):
    assert main(["doctor", "--json"]) == 0
    doctor = json.loads(capsys.readouterr().out)
    assert doctor["kernels"]["variant"] == cpu_kernels.active_variant()
    assert doctor["kernels"]["threads"] == cpu_kernels.threads()
    assert set(doctor["kernels"]["variants"]) == (set(cpu_kernels.VARIANTS) if cpu_kernels.library_path() else set())
    assert doctor["python"] and doctor["mlx"] and doctor["mlx_lm"] and doctor["blas"] and doctor["device"]
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "bench", "speed", "--repeats", "1", "--context", "128", "--json", str(out)]) == 0
    machine = json.loads(out.read_text())["machine"]
    assert machine.keys() == doctor.keys() and machine["kernels"] == doctor["kernels"]


def test_doctor_says_when_a_forced_variant_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("PARLEY_KERNELS", "sse9")
    cpu_kernels.reset()
    try:
        assert main(["doctor"]) == 0
    finally:
        monkeypatch.delenv("PARLEY_KERNELS")
        cpu_kernels.reset()
    assert "refused: PARLEY_KERNELS='sse9' is not a kernel variant" in capsys.readouterr().out


def test_doctor_and_bench_record_the_thread_count(capsys, monkeypatch):
    """PARLEY_THREADS is what doctor prints and bench's JSON records (its `machine` is this dict)."""
    monkeypatch.setenv("PARLEY_THREADS", "3")
    cpu_kernels.reset()
    try:
        assert main(["doctor", "--json"]) == 0
        facts = json.loads(capsys.readouterr().out)["kernels"]
        assert main(["doctor"]) == 0
        text = capsys.readouterr().out
    finally:
        monkeypatch.delenv("PARLEY_THREADS")
        cpu_kernels.reset()
        cpu_kernels.kernels()  # back to the default count for the tests after this one
    if facts["state"] != "on":
        pytest.skip("the C kernels are off or not built: nothing is threaded")
    assert facts["threads"] == 3 and "3 threads (PARLEY_THREADS)" in text
