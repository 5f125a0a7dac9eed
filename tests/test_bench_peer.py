"""`parley bench peer`: Parley's half end to end on the tiny model, the llama.cpp half skipped cleanly without
llama-cpp-python (and run where it is importable), the medians and ratios of the table."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from argparse import Namespace

import pytest

from app.bench import peer


def test_parley_half_runs_in_fresh_processes_and_the_missing_peer_is_skipped(tiny_model_dir, parley_home, tmp_path):
    args = Namespace(model=str(tiny_model_dir), rounds=1, peer_contexts=(256, 384), peer_decode_tokens=4,
                     peer_python=str(tmp_path / "no-such-python"), json=None)
    result = peer.run(None, args)
    json.dumps(result)
    rows = {r["figure"]: r for r in result["rows"]}
    for key in ("prefill_small", "prefill_big", "decode_small", "decode_big", "resume_q4_0", "resume_floor", "state_q4_0",
                "startup", "startup_printed"):
        assert rows[key]["parley"] > 0, rows[key]
        assert rows[key]["llama_cpp"] is None and rows[key]["ratio"] is None
    samples = result["samples"]["parley"]
    assert samples["prompt_tokens_256"][0] == pytest.approx(256, abs=8)  # the context asked for, give or take re-tokenizing
    assert samples["resume_reused_tokens"][0] >= samples["prompt_tokens_384"][0]  # resumed from the 384-token cache
    assert "no-such-python" in result["peer_skipped"] and result["samples"]["peer"] == {}
    assert "blas" in result["setup"]
    text = peer.report(result)
    assert "llama.cpp half skipped" in text and "prefill tok/s at 256" in text


def test_only_resume_resumes_the_same_conversation_every_round(tiny_model_dir, parley_home, tmp_path):
    """`--only resume`: the conversation is stored once, untimed; each round resumes that same conversation (its
    home put back), so every round reuses the same tokens; only the resume rows are in the table."""
    args = Namespace(model=str(tiny_model_dir), rounds=2, peer_contexts=(256, 384), peer_decode_tokens=4,
                     peer_python=str(tmp_path / "no-such-python"), json=None, only=["resume"])
    result = peer.run(None, args)
    assert result["groups"] == ["resume"]
    assert {r["figure"] for r in result["rows"]} == {"resume_q4_0", "resume_f16", "resume_floor", "state_q4_0", "state_f16"}
    samples = result["samples"]["parley"]
    assert len(samples["resume_ms"]) == 2 and all(ms > 0 for ms in samples["resume_ms"])
    reused = samples["resume_reused_tokens"]
    assert reused[0] == reused[1] >= 384 - 8  # the same stored conversation both times, not one grown by a turn
    assert "prefill_tps_384" not in samples and "startup_s" not in samples


def test_only_names_a_known_group():
    assert peer.chosen_groups(None) == peer.GROUPS
    assert peer.chosen_groups(["resume", "startup"]) == ("startup", "resume")
    with pytest.raises(ValueError, match="choose from"):
        peer.chosen_groups(["decode"])


def test_no_llama_cpp_here_means_a_clear_reason():
    python, why = peer.peer_interpreter(None)
    if importlib.util.find_spec("llama_cpp") is not None:
        assert python == sys.executable and why is None
    else:
        assert python is None and "--peer-python" in why and "README" in why


def test_medians_and_ratios():
    samples = {"parley": {"prefill_tps_1024": [300.0, 100.0, 200.0], "startup_s": [0.9, 0.7, 0.8],
                          "decode_tps_1024": [20.0, 30.0, 25.0]},
               "peer": {"prefill_tps_1024": [100.0, 400.0, 50.0], "startup_s": [0.4, 0.5, 0.3]}}
    rows = {r["figure"]: r for r in peer.summarise(samples, (1024, 4096), 3, None)["rows"]}
    assert rows["prefill_small"]["parley"] == 200.0 and rows["prefill_small"]["llama_cpp"] == 100.0
    assert rows["prefill_small"]["ratio"] == 2.0
    assert rows["startup"]["ratio"] == 2.0
    assert rows["decode_small"]["parley"] == 25.0 and rows["decode_small"]["ratio"] is None  # no peer value
    assert rows["prefill_big"]["parley"] is None


def test_a_crashing_build_is_named():
    assert "SIGILL" in peer.describe_exit(-4) and "AVX-512" in peer.describe_exit(-4)
    assert peer.describe_exit(3) == "exit status 3"


def test_the_llama_half_imports_nothing_of_parley():
    """It runs under another venv's Python, where Parley is not installed."""
    tree = ast.parse(peer.PEER_SCRIPT.read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m and m.split(".")[0] == "app"}
    done = subprocess.run([sys.executable, str(peer.PEER_SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "prefill" in done.stdout


@pytest.mark.real_model
def test_llama_half_where_llama_cpp_is_importable(tmp_path):
    pytest.importorskip("llama_cpp")
    from app.model.loader import embedded_gguf

    half = peer.LlamaHalf(sys.executable, embedded_gguf(), tmp_path, decode=4)
    why = half.probe()
    if why and "SIGILL" in why:
        pytest.skip(f"this llama.cpp build does not run on this CPU: {why}")
    assert why is None
    got = half.prefill(128, 128, 4, save=True)
    assert got["prefill_tps_128"] > 0 and got["decode_tps_128"] > 0 and got["state_mb_f16"] > 0
    resumed = half.resume()
    assert resumed["resume_ms_q4_0"] > 0 and resumed["state_mb_q4_0"] < resumed["state_mb_f16"]


def test_only_prefill_runs_the_prefill_measurements_alone():
    """`--only prefill`: each side's prefill (and decode) at every context, nothing else (no start-up, saved state
    or resume)."""
    calls = []

    class Side:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, what):
            def measure(*args, **kwargs):
                calls.append((self.name, what, kwargs.get("save")))
                if what == "prefill" and self.name == "parley":
                    return {"figures": {f"prefill_tps_{args[0]}": 1.0}, "prompt_tokens": args[0], "generated_tokens": 1}
                return {f"{what}_{self.name}": 1.0}
            return measure

    samples = {"parley": {}, "peer": {}}
    peer.one_round(Side("parley"), Side("peer"), (256, 512), samples, groups=("prefill",))
    assert calls == [("parley", "prefill", None), ("peer", "prefill", False),
                     ("parley", "prefill", None), ("peer", "prefill", False)]
    rows = peer.summarise(samples, (256, 512), 1, None, groups=("prefill",))["rows"]
    assert {r["figure"] for r in rows} == {"prefill_small", "prefill_big", "decode_small", "decode_big"}
